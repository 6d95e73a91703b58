"""The NCCL path on real GPUs: delays on the CUDA stream, collectives over NCCL.

Skipped on machines without CUDA (and the two-rank test without two GPUs); run with
`pytest -m gpu` on a GPU node.
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_stream_delay_lasts_as_asked():
    from emulator.runtime.delay import CudaStreamDelay

    delay = CudaStreamDelay()
    torch.cuda.synchronize()
    t0 = time.monotonic()
    delay.enqueue(0.02)
    torch.cuda.synchronize()
    elapsed = time.monotonic() - t0
    assert 0.015 < elapsed < 0.05


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.device_count() < 2 if torch.cuda.is_available() else True,
                    reason="needs two CUDA GPUs")
def test_tp2_step_over_nccl(ray_local):
    from work_builders import step_work

    from emulator.runtime.cluster import WorkerGroup
    from emulator.runtime.records import OPS
    from emulator.specs.layout import ParallelLayout

    work = step_work(tp=2, pp=1, num_layers_per_stage=2, num_tokens=8, hidden=64)
    with WorkerGroup(ParallelLayout(tp=2), backend="nccl", timeout_s=30) as group:
        recs = group.run_replica_step(0, work, None, dilation=1.0)
    for rec in recs:
        assert rec.count("all_reduce") == 2 * 2 + 1
        assert set(rec.coll_bytes[rec.coll_op == OPS.index("all_reduce")].tolist()) == {8 * 64 * 2}
