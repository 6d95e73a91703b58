"""Run directory writing: atomic, crash-safe, read back unchanged."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emulator.errors import UserError
from emulator.metrics.io import OutputError, RunWriter, read_run
from emulator.metrics.records import CollectiveRecords, RequestRecords, StepRecords


def records():
    requests = RequestRecords.from_arrays(
        request_id=["a", "b"], replica=[0, 0], arrival_s=[0.0, 1.0], first_token_s=[1.0, 2.0],
        finish_s=[3.0, 4.0], prompt_tokens=[8, 16], output_tokens=[3, 2],
        num_preemptions=[0, 1])
    steps = StepRecords()
    steps.append(0, 0, 0, 0.0, 1.0, 2, 24, 0, 0.75, 0.25, 2, 8)
    steps.append(0, 1, 0, 1.0, 2.0, 2, 0, 2, 0.5, 0.25, 4, 8)
    colls = CollectiveRecords()
    colls.extend(dict(replica=0, step=0, stage=0, layer=0, rank=np.array([0, 1]), axis="tp",
                      op="all_reduce", group="tp/dp0", seq=0, bytes=1024,
                      entry_s=np.array([0.5, 0.75]), exit_s=np.array([1.0, 1.0])))
    return requests, steps, colls


def test_round_trip(tmp_path):
    requests, steps, colls = records()
    out = tmp_path / "run" / "nested"
    summary = RunWriter(out).finish(requests=requests, steps=steps, collectives=colls,
                                    mode="emulate", config={"dilation": 4.0},
                                    nodes={"0": "n0", "1": "n0"})
    assert sorted(p.name for p in out.iterdir()) == [
        "collectives.parquet", "requests.parquet", "steps.parquet", "summary.json",
        "timeline.json"]
    run = read_run(out)
    assert run.requests.equals(requests.to_table())
    assert run.steps.equals(steps.to_table())
    assert run.collectives.equals(colls.finalize())
    assert run.summary == json.loads(json.dumps(summary))
    assert run.summary["complete"] is True
    assert run.summary["metrics"]["drain_time_s"] == 4.0
    assert run.summary["metrics"]["kv_peak_usage"] == 0.5
    assert run.summary["metrics"]["by_axis"]["tp"]["sync_wait_s"] == 0.125


def test_no_collectives_file_without_collectives_and_stale_one_removed(tmp_path):
    requests, steps, colls = records()
    writer = RunWriter(tmp_path)
    writer.finish(requests=requests, steps=steps, collectives=colls, mode="emulate", config={})
    writer.finish(requests=requests, steps=steps, collectives=CollectiveRecords(),
                  mode="simulate", config={})
    assert not (tmp_path / "collectives.parquet").exists()
    run = read_run(tmp_path)
    assert run.collectives is None and "by_axis" not in run.summary["metrics"]


def test_refuses_a_file_as_output_directory(tmp_path):
    path = tmp_path / "out"
    path.write_text("not a directory")
    with pytest.raises(OutputError, match="is a file") as info:
        RunWriter(path)
    assert isinstance(info.value, UserError)


def test_failed_table_write_leaves_no_file(tmp_path, monkeypatch):
    requests, steps, colls = records()
    writer = RunWriter(tmp_path)
    writer.finish(requests=requests, steps=steps, mode="simulate", config={})
    (tmp_path / "requests.parquet").unlink()

    def broken_write_table(table, where, *args, **kwargs):
        with open(where, "wb") as fh:  # a half-written file under the temporary name
            fh.write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write_table)
    with pytest.raises(OSError, match="disk full"):
        writer.finish(requests=requests, steps=steps, mode="simulate", config={})
    # Nothing at the target, no temp file left, and the old summary is gone, so the stale
    # steps.parquet is not mistaken for a finished run.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.parquet"]
    with pytest.raises(OutputError, match="summary.json is missing"):
        read_run(tmp_path)


def test_flush_partial_in_the_intended_pattern(tmp_path):
    requests, steps, colls = records()
    writer = RunWriter(tmp_path)
    with pytest.raises(RuntimeError, match="rank 3 died"):
        try:
            raise RuntimeError("rank 3 died")
        except BaseException as exc:
            writer.flush_partial(requests=requests, steps=steps, collectives=colls,
                                 mode="emulate", config={"x": 1}, error=exc)
            raise
    run = read_run(tmp_path)
    assert run.summary["complete"] is False
    assert run.summary["extra"]["error"] == "RuntimeError: rank 3 died"
    assert run.summary["metrics"]["num_finished"] == 2
    assert run.steps.num_rows == 2 and run.collectives.num_rows == 2


def test_flush_partial_survives_tables_it_cannot_summarize(tmp_path):
    requests, steps, _ = records()
    steps_table = steps.to_table()
    # a corrupt column breaks the metrics; the flush must still write what it has
    broken = steps_table.set_column(steps_table.schema.get_field_index("kv_blocks_used"),
                                    "kv_blocks_used", pa.array(["x", "y"]))
    summary = RunWriter(tmp_path).flush_partial(requests=requests, steps=broken,
                                                mode="emulate", config={}, error="stopped")
    assert summary["complete"] is False and summary["metrics"] is None
    assert "metrics_error" in summary["extra"] and summary["extra"]["error"] == "stopped"
    assert json.loads((tmp_path / "summary.json").read_text())["complete"] is False


def test_read_run_rejects_other_schema_versions(tmp_path):
    requests, steps, _ = records()
    RunWriter(tmp_path).finish(requests=requests, steps=steps, mode="simulate", config={})
    table = pq.read_table(tmp_path / "steps.parquet")
    pq.write_table(table.replace_schema_metadata({"emulator.schema_version": "0",
                                                  "emulator.table": "steps"}),
                   tmp_path / "steps.parquet")
    with pytest.raises(OutputError, match="schema version 0"):
        read_run(tmp_path)


def test_writer_rejects_tables_without_contract_columns(tmp_path):
    requests, steps, _ = records()
    with pytest.raises(ValueError, match="lacks contract columns \\['comm_s'\\]"):
        RunWriter(tmp_path).finish(requests=requests, steps=steps.to_table().drop(["comm_s"]),
                                   mode="simulate", config={})
