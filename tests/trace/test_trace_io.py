"""Reading and writing trace files: formats, streaming validation, atomic writes."""

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from emulator.errors import TraceError
from emulator.trace.io import describe, iter_trace_batches, read_trace, write_trace
from emulator.trace.schema import Trace


def make_trace(n: int) -> Trace:
    return Trace(np.array([f"q{i}" for i in range(n)], dtype=object),
                 np.arange(n, dtype=np.float64), np.full(n, 7, np.int32),
                 np.arange(1, n + 1, dtype=np.int32),
                 prefix_block_hashes=[np.arange(i % 3, dtype=np.int64) for i in range(n)],
                 prefix_block_size_tokens=16)


def write_raw(table: pa.Table, path, batch_rows: int | None = None) -> None:
    """Write without validation, to put bad rows on disk."""
    with ipc.new_file(str(path), table.schema) as w:
        w.write_table(table, max_chunksize=batch_rows)


@pytest.mark.parametrize("suffix", [".arrow", ".parquet"])
def test_write_read_round_trip(tmp_path, suffix):
    t = make_trace(100)
    path = write_trace(t, tmp_path / f"t{suffix}")
    back = read_trace(path)
    assert back.request_id.tolist() == t.request_id.tolist()
    assert np.array_equal(back.output_tokens, t.output_tokens)
    assert [h.tolist() for h in back.prefix_block_hashes] == [h.tolist() for h in
                                                              t.prefix_block_hashes]
    assert back.prefix_block_size_tokens == 16
    assert back.reasoning_tokens is None


def test_reads_arrow_stream_format(tmp_path):
    table = make_trace(5).to_arrow()
    path = tmp_path / "s.arrow"
    with ipc.new_stream(str(path), table.schema) as w:
        w.write_table(table)
    assert read_trace(path).request_id.tolist() == ["q0", "q1", "q2", "q3", "q4"]


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(TraceError, match=r"unknown trace file suffix '.csv'; use .arrow"):
        write_trace(make_trace(2), tmp_path / "t.csv")
    with pytest.raises(TraceError, match=r"no such trace file"):
        read_trace(tmp_path / "absent.arrow")


def test_garbage_file_is_a_trace_error(tmp_path):
    path = tmp_path / "junk.arrow"
    path.write_bytes(b"not arrow at all")
    with pytest.raises(TraceError, match=r"^junk.arrow: cannot read as arrow"):
        read_trace(path)


def test_schema_version_mismatch_in_file(tmp_path):
    table = make_trace(3).to_arrow()
    table = table.replace_schema_metadata({**table.schema.metadata,
                                           b"emulator.schema_version": b"9"})
    pq.write_table(table, tmp_path / "v9.parquet")
    with pytest.raises(TraceError, match=r"^v9.parquet: trace schema version '9' is not "
                                         r"supported \(this emulator reads version 1\)"):
        read_trace(tmp_path / "v9.parquet")


def test_read_names_bad_row(tmp_path):
    table = make_trace(10).to_arrow()
    tokens = table.column("prompt_tokens").to_numpy().copy()
    tokens[7] = -4
    table = table.set_column(2, "prompt_tokens", pa.array(tokens, pa.int32()))
    write_raw(table, tmp_path / "bad.arrow")
    with pytest.raises(TraceError) as exc:
        read_trace(tmp_path / "bad.arrow")
    assert str(exc.value) == ("bad.arrow: row 7, column prompt_tokens: -4 is not a positive "
                              "token count")


def test_write_validates_and_leaves_no_file(tmp_path):
    t = make_trace(5)
    t.output_tokens[2] = 0
    with pytest.raises(TraceError, match=r"row 2, column output_tokens"):
        write_trace(t, tmp_path / "out.arrow")
    assert list(tmp_path.iterdir()) == []


def test_batches_cover_all_rows_in_order(tmp_path):
    path = write_trace(make_trace(1000), tmp_path / "t.arrow")
    batches = list(iter_trace_batches(path, batch_rows=300))
    assert [len(b) for b in batches] == [300, 300, 300, 100]
    ids = np.concatenate([b.request_id for b in batches])
    assert ids.tolist() == [f"q{i}" for i in range(1000)]
    hashes = [h.tolist() for b in batches for h in b.prefix_block_hashes]
    assert hashes == [list(range(i % 3)) for i in range(1000)]


def test_batch_errors_use_global_row_numbers(tmp_path):
    table = make_trace(1000).to_arrow()
    out = table.column("output_tokens").to_numpy().copy()
    out[777] = 0
    write_raw(table.set_column(3, "output_tokens", pa.array(out, pa.int32())),
              tmp_path / "b.arrow", batch_rows=256)
    it = iter_trace_batches(tmp_path / "b.arrow", batch_rows=100)
    with pytest.raises(TraceError, match=r"^b.arrow: row 777, column output_tokens: 0 is not"):
        for _ in it:
            pass


def test_sortedness_checked_across_batch_boundary(tmp_path):
    table = make_trace(200).to_arrow()
    arr = table.column("arrival_time_s").to_numpy().copy()
    arr[100] = 50.0  # row 99 arrives at 99.0; row 100 is the first row of batch 2
    write_raw(table.set_column(1, "arrival_time_s", pa.array(arr)), tmp_path / "u.arrow")
    batches = iter_trace_batches(tmp_path / "u.arrow", batch_rows=100)
    assert len(next(batches)) == 100
    with pytest.raises(TraceError, match=r"row 100, column arrival_time_s: 50.0 arrives before "
                                         r"the previous row \(99.0\)"):
        next(batches)


def test_duplicate_id_across_batches(tmp_path):
    table = make_trace(200).to_arrow()
    ids = table.column("request_id").to_pylist()
    ids[150] = "q3"
    write_raw(table.set_column(0, "request_id", pa.array(ids)), tmp_path / "d.arrow")
    with pytest.raises(TraceError, match=r"row 150, column request_id: 'q3' repeats an earlier"):
        list(iter_trace_batches(tmp_path / "d.arrow", batch_rows=100))
    with pytest.raises(TraceError, match=r"row 150, column request_id: 'q3' repeats row 3"):
        read_trace(tmp_path / "d.arrow")


def test_describe_exact_values():
    t = Trace(np.array(["a", "b", "c", "d"], dtype=object), np.array([0.0, 1.0, 2.0, 4.0]),
              np.array([1, 2, 3, 10], np.int32), np.array([5, 5, 5, 5], np.int32),
              np.array([0, 1, 2, 3], np.int32))
    d = describe(t)
    assert d["num_requests"] == 4 and d["span_s"] == 4.0 and d["mean_rate_per_s"] == 1.0
    assert d["prompt_tokens.mean"] == 4.0 and d["prompt_tokens.p50"] == 2.5
    assert d["prompt_tokens.max"] == 10 and d["reasoning_tokens.max"] == 3
