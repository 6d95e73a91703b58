"""Request table construction and input checks."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.core import RequestTable, Status
from emulator.errors import TraceError
from emulator.trace.schema import Trace


def test_from_trace_copies_columns_and_starts_fresh() -> None:
    trace = Trace(np.array(["a", "b"], dtype=object), np.array([0.0, 1.5]),
                  np.array([10, 20], np.int32), np.array([3, 4], np.int32),
                  prefix_block_hashes=[np.array([7, 8], np.int64), np.array([], np.int64)],
                  prefix_block_size_tokens=512)
    t = RequestTable.from_trace(trace)
    assert t.request_id.tolist() == ["a", "b"] and t.prompt_tokens.dtype == np.int64
    assert t.prefix_block_hashes[0].tolist() == [7, 8] and t.prefix_block_hashes[1] is None
    assert np.isnan(t.first_token_s).all() and t.replica.tolist() == [-1, -1]
    assert t.status.tolist() == [Status.PENDING] * 2 and t.num_known_tokens.tolist() == [10, 20]


def test_bad_columns_name_the_row() -> None:
    with pytest.raises(TraceError, match="output_tokens: row 1 is 0"):
        RequestTable.from_columns(["a", "b"], [0.0, 0.0], [5, 5], [2, 0])
    with pytest.raises(TraceError, match="arrival_s: expected 2 values"):
        RequestTable.from_columns(["a", "b"], [0.0], [5, 5], [2, 2])
