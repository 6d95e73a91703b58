"""A step's records packed on the rank and unpacked on the driver equal the frozen ones."""

from __future__ import annotations

import numpy as np

from emulator.runtime.records import OPS, StepRecorder, StepRecords

META = dict(rank=3, stage=1, step_key=(0, 7, 1), start_s=12.5, end_s=13.25, num_tokens=32,
            num_sampled_tokens=30, num_kv_rows_written=32)


def recorder() -> StepRecorder:
    r = StepRecorder()
    r.add_compute(1, 0, 12.5, 12.6)
    r.add_collective(OPS.index("all_reduce"), 0, 0, -1, 262_144, 12.6000001, 12.6003)
    r.add_compute(2, 0, 12.6003, 12.7)
    r.add_collective(OPS.index("send"), 1, -1, 5, 2**40 + 1, 12.7, 13.2)
    return r


def test_pack_round_trip_equals_freeze():
    frozen = recorder().freeze(**META)
    unpacked = StepRecords.unpack(recorder().pack(**META))
    for name in StepRecords.__slots__:
        a, b = getattr(frozen, name), getattr(unpacked, name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        else:
            assert a == b, name
    assert unpacked.coll_bytes.tolist() == [262_144, 2**40 + 1]
    assert unpacked.coll_entry_s[0] == 12.6000001
    assert unpacked.compute_s == (12.6 - 12.5) + (12.7 - 12.6003)
    assert unpacked.count("send", "pp") == 1


def test_empty_step_packs():
    rec = StepRecords.unpack(StepRecorder().pack(**META))
    assert rec.num_collectives == 0 and rec.comp_kind.shape == (0,) and rec.compute_s == 0.0
