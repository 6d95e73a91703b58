"""Schema v1: Arrow round trip, metadata, and every validation rule with its message."""

import ast
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from emulator.errors import TraceError, UserError
from emulator.trace.schema import SCHEMA_VERSION, Trace, arrow_schema


def make_trace(n: int = 10, **overrides) -> Trace:
    cols = dict(
        request_id=np.array([f"r{i}" for i in range(n)], dtype=object),
        arrival_time_s=np.arange(n, dtype=np.float64) * 0.5,
        prompt_tokens=np.arange(1, n + 1, dtype=np.int32) * 10,
        output_tokens=np.full(n, 20, dtype=np.int32),
    )
    cols.update(overrides)
    return Trace(**cols)


def full_trace() -> Trace:
    return make_trace(
        4,
        reasoning_tokens=np.array([0, 5, 20, 19], dtype=np.int32),
        prefix_block_hashes=[np.array([1, 2], np.int64), np.zeros(0, np.int64),
                             np.array([1, 2, 3], np.int64), np.array([-7], np.int64)],
        session_id=np.array(["a", None, "a", "b"], dtype=object),
        priority=np.array([0, 1, -1, 2], dtype=np.int16),
    )


def raw_table(**columns) -> pa.Table:
    """A table built without validation (to feed bad rows to from_arrow)."""
    return pa.table(columns)


def test_round_trip_keeps_every_column_and_value():
    t = full_trace()
    table = t.to_arrow()
    assert table.schema.names == ["request_id", "arrival_time_s", "prompt_tokens",
                                  "output_tokens", "reasoning_tokens", "prefix_block_hashes",
                                  "session_id", "priority"]
    assert table.schema.field("prefix_block_hashes").type == pa.list_(pa.int64())
    assert table.schema.field("priority").type == pa.int16()
    back = Trace.from_arrow(table)
    assert back.request_id.tolist() == ["r0", "r1", "r2", "r3"]
    assert back.prompt_tokens.dtype == np.int32 and back.prompt_tokens.tolist() == [10, 20, 30, 40]
    assert back.reasoning_tokens.tolist() == [0, 5, 20, 19]
    assert [h.tolist() for h in back.prefix_block_hashes] == [[1, 2], [], [1, 2, 3], [-7]]
    assert back.session_id.tolist() == ["a", None, "a", "b"]
    assert back.priority.dtype == np.int16 and back.priority.tolist() == [0, 1, -1, 2]


def test_metadata_has_version_and_units():
    meta = full_trace().to_arrow().schema.metadata
    assert meta[b"emulator.schema_version"] == b"1" == SCHEMA_VERSION.encode()
    units = json.loads(meta[b"emulator.units"])
    assert units["arrival_time_s"] == "s" and units["prompt_tokens"] == "tokens"


def test_block_size_round_trips_in_metadata():
    t = full_trace()
    t.prefix_block_size_tokens = 512
    assert Trace.from_arrow(t.to_arrow()).prefix_block_size_tokens == 512


def test_len_slice_head_take():
    t = full_trace()
    assert len(t) == 4
    s = t.slice(1, 3)
    assert len(s) == 2 and s.request_id.tolist() == ["r1", "r2"]
    assert [h.tolist() for h in s.prefix_block_hashes] == [[], [1, 2, 3]]
    assert t.head(1).session_id.tolist() == ["a"]
    assert t.take(np.array([3, 0])).priority.tolist() == [2, 0]


def test_sorted_by_arrival_is_stable():
    t = make_trace(4, arrival_time_s=np.array([2.0, 1.0, 2.0, 1.0]))
    assert t.sorted_by_arrival().request_id.tolist() == ["r1", "r3", "r0", "r2"]


def test_wider_integer_columns_are_accepted_when_values_fit():
    table = raw_table(request_id=["a", "b"], arrival_time_s=[0.0, 1.0],
                      prompt_tokens=pa.array([5, 6], pa.int64()),
                      output_tokens=pa.array([1, 2], pa.int64()))
    t = Trace.from_arrow(table)
    assert t.prompt_tokens.dtype == np.int32 and t.prompt_tokens.tolist() == [5, 6]


def test_integer_overflow_is_named():
    table = raw_table(request_id=["a", "b"], arrival_time_s=[0.0, 1.0],
                      prompt_tokens=pa.array([5, 2**40], pa.int64()), output_tokens=[1, 2])
    with pytest.raises(TraceError, match=r"^f.arrow: row 1, column prompt_tokens: 1099511627776 "
                                         r"does not fit int32"):
        Trace.from_arrow(table, source="f.arrow")


def test_missing_column():
    table = raw_table(request_id=["a"], arrival_time_s=[0.0], prompt_tokens=[1])
    with pytest.raises(TraceError, match=r"^t.arrow: missing required column\(s\) output_tokens"):
        Trace.from_arrow(table, source="t.arrow")


def test_mistyped_column():
    table = raw_table(request_id=["a"], arrival_time_s=[0.0], prompt_tokens=["12"],
                      output_tokens=[1])
    with pytest.raises(TraceError, match=r"^t.arrow: column prompt_tokens has type string, "
                                         r"expected int32$"):
        Trace.from_arrow(table, source="t.arrow")


def test_unknown_column_is_rejected_as_likely_typo():
    table = raw_table(request_id=["a"], arrival_time_s=[0.0], prompt_tokens=[1],
                      output_tokens=[1], reasoning_token=[0])
    with pytest.raises(TraceError, match=r"unknown column\(s\) reasoning_token"):
        Trace.from_arrow(table, source="t.arrow")


def test_schema_version_mismatch():
    table = full_trace().to_arrow()
    table = table.replace_schema_metadata({b"emulator.schema_version": b"2"})
    with pytest.raises(TraceError, match=r"^x.arrow: trace schema version '2' is not supported"):
        Trace.from_arrow(table, source="x.arrow")


def test_missing_version_is_read_as_v1():
    table = full_trace().to_arrow().replace_schema_metadata(None)
    assert len(Trace.from_arrow(table)) == 4


def test_null_in_required_column():
    table = raw_table(request_id=["a", "b"], arrival_time_s=[0.0, 1.0],
                      prompt_tokens=pa.array([1, None], pa.int32()), output_tokens=[1, 1])
    with pytest.raises(TraceError, match=r"^t: row 1, column prompt_tokens: value is null"):
        Trace.from_arrow(table, source="t")


@pytest.mark.parametrize("column,value,reason", [
    ("prompt_tokens", 0, "0 is not a positive token count"),
    ("prompt_tokens", -3, "-3 is not a positive token count"),
    ("output_tokens", 0, "0 is not a positive token count"),
    ("arrival_time_s", np.nan, "nan is not a finite time"),
    ("arrival_time_s", np.inf, "inf is not a finite time"),
])
def test_bad_value_names_file_row_column_and_reason(column, value, reason):
    t = make_trace()
    getattr(t, column)[7] = value
    if column == "arrival_time_s":  # keep the rest sorted so only this check fires
        t.arrival_time_s[8:] += 100
    with pytest.raises(TraceError) as exc:
        t.validate("bad.arrow")
    assert str(exc.value) == f"bad.arrow: row 7, column {column}: {reason}"


def test_negative_time_is_reported_with_unsorted_when_it_breaks_order():
    t = make_trace(3, arrival_time_s=np.array([-1.0, 0.0, 1.0]))
    with pytest.raises(TraceError, match=r"^t: row 0, column arrival_time_s: -1.0 is negative$"):
        t.validate("t")


def test_unsorted_arrivals_name_first_offending_row():
    t = make_trace(5, arrival_time_s=np.array([0.0, 1.0, 3.0, 2.0, 4.0]))
    with pytest.raises(TraceError) as exc:
        t.validate("u.arrow")
    assert str(exc.value) == ("u.arrow: row 3, column arrival_time_s: 2.0 arrives before the "
                              "previous row (3.0); sort by arrival")
    t.validate("u.arrow", check_sorted=False)  # importers check order separately


def test_duplicate_request_ids():
    t = make_trace(5, request_id=np.array(["a", "b", "a", "c", "b"], dtype=object))
    with pytest.raises(TraceError) as exc:
        t.validate("d")
    assert str(exc.value) == ("d: row 2, column request_id: 'a' repeats row 0; "
                              "row 4, column request_id: 'b' repeats row 1")


def test_reasoning_exceeding_output_or_negative():
    t = make_trace(3, reasoning_tokens=np.array([20, 21, -1], dtype=np.int32))
    with pytest.raises(TraceError) as exc:
        t.validate("r")
    assert str(exc.value) == ("r: row 1, column reasoning_tokens: 21 exceeds output_tokens 20 "
                              "(reasoning is part of the output); "
                              "row 2, column reasoning_tokens: -1 is negative")


def test_many_bad_rows_report_first_five_and_count_the_rest():
    t = make_trace(20)
    t.output_tokens[[2, 4, 6, 8, 10, 12, 14]] = 0
    t.prompt_tokens[3] = -1
    with pytest.raises(TraceError) as exc:
        t.validate("m")
    msg = str(exc.value)
    assert msg.startswith("m: row 2, column output_tokens: 0 is not a positive token count; "
                          "row 3, column prompt_tokens: -1 is not")
    assert "row 8," in msg and "row 10" not in msg  # rows 2, 3, 4, 6, 8 shown
    assert msg.endswith("; and 3 more bad value(s)")
    assert "\n" not in msg


def test_trace_error_is_a_user_error():
    assert issubclass(TraceError, UserError)


def test_arrow_schema_orders_columns_canonically():
    schema = arrow_schema(["priority", "request_id", "arrival_time_s"])
    assert schema.names == ["request_id", "arrival_time_s", "priority"]


def test_schema_module_is_pure():
    """schema.py touches no files and imports neither ray nor torch (DEVELOPING.md)."""
    source = Path(__file__).parents[2] / "emulator" / "trace" / "schema.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "json", "collections", "dataclasses", "numpy",
                        "pyarrow", "emulator"}, imported
    assert "open(" not in source.read_text()
