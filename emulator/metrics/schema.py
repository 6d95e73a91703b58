"""Arrow schemas of the run output tables (DESIGN section 7: the column names are the contract).

Every table carries ``emulator.schema_version`` and ``emulator.table`` in its schema
metadata, and every column a ``description`` (with its unit) in its field metadata, so a
Parquet file read years later still says what it holds.

Units: times are seconds (``_s``) of *target* time — host wall time divided by
``dilation`` in the emulator, predicted time in the simulator — measured from the start of
the run; sizes are bytes; token counts are tokens. Integer ids (replica, step, stage, rank,
layer) start at 0; ``layer = -1`` marks a collective that belongs to no decoder layer
(embedding all-reduce, logits gather, pipeline send/recv), ``layer = -2`` a thermometer
probe (a back-to-back collective that `validate` adds to measure the host during the run).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1"
"""Bumped whenever a column is renamed, removed or changes type or unit. Adding a column
does not bump it (readers select columns by name)."""

VERSION_KEY = b"emulator.schema_version"
TABLE_KEY = b"emulator.table"

AXES = ("tp", "pp", "ep", "dp", "world")
"""Mesh axes a collective can run on (closed set)."""
OPS = ("all_reduce", "send", "recv", "all_to_all", "all_gather", "reduce_scatter",
       "broadcast", "barrier")
"""Communication ops (closed set, as in Chakra's execution-trace schema)."""
P2P_OPS = ("send", "recv")

# (name, arrow type, numpy dtype or None for strings, description with unit)
Column = tuple[str, pa.DataType, "np.dtype | None", str]

REQUEST_COLUMNS: tuple[Column, ...] = (
    ("request_id", pa.string(), None, "request id from the trace"),
    ("replica", pa.int32(), np.dtype(np.int32), "DP replica that served the request"),
    ("arrival_s", pa.float64(), np.dtype(np.float64), "arrival time, s"),
    ("first_token_s", pa.float64(), np.dtype(np.float64),
     "time the first output token was emitted, s; NaN if never"),
    ("finish_s", pa.float64(), np.dtype(np.float64),
     "time the last output token was emitted, s; NaN if unfinished"),
    ("ttft_s", pa.float64(), np.dtype(np.float64),
     "time to first token = first_token - arrival, s"),
    ("tpot_s", pa.float64(), np.dtype(np.float64),
     "time per output token after the first = (finish - first_token) / (output_tokens - 1), s; "
     "NaN when output_tokens <= 1"),
    ("e2e_s", pa.float64(), np.dtype(np.float64), "end-to-end latency = finish - arrival, s"),
    ("prompt_tokens", pa.int32(), np.dtype(np.int32), "prompt length, tokens"),
    ("output_tokens", pa.int32(), np.dtype(np.int32), "output length, tokens"),
    ("num_preemptions", pa.int32(), np.dtype(np.int32), "times the request was preempted"),
)

STEP_COLUMNS: tuple[Column, ...] = (
    ("replica", pa.int32(), np.dtype(np.int32), "DP replica"),
    ("step", pa.int64(), np.dtype(np.int64), "step counter within the replica (one per plan)"),
    ("stage", pa.int32(), np.dtype(np.int32), "pipeline stage (0 without PP)"),
    ("start_s", pa.float64(), np.dtype(np.float64), "when the step (stage) began, s"),
    ("end_s", pa.float64(), np.dtype(np.float64), "when the step (stage) ended, s"),
    ("num_requests", pa.int32(), np.dtype(np.int32), "requests in the batch"),
    ("num_prefill_tokens", pa.int64(), np.dtype(np.int64), "prompt tokens computed, tokens"),
    ("num_decode_tokens", pa.int64(), np.dtype(np.int64), "decode tokens computed, tokens"),
    ("compute_s", pa.float64(), np.dtype(np.float64), "compute time, s"),
    ("comm_s", pa.float64(), np.dtype(np.float64), "communication time incl. sync-wait, s"),
    ("kv_blocks_used", pa.int64(), np.dtype(np.int64), "KV blocks in use after the step"),
    ("kv_blocks_total", pa.int64(), np.dtype(np.int64), "KV blocks in the replica's pool"),
    ("micro_batch", pa.int32(), np.dtype(np.int32), "PP micro-batch slot (0 without PP)"),
)

COLLECTIVE_COLUMNS: tuple[Column, ...] = (
    ("replica", pa.int32(), np.dtype(np.int32), "DP replica"),
    ("step", pa.int64(), np.dtype(np.int64), "step counter within the replica"),
    ("stage", pa.int32(), np.dtype(np.int32), "pipeline stage of the rank"),
    ("layer", pa.int32(), np.dtype(np.int32), "global decoder layer; -1 outside layers, -2 a thermometer probe"),
    ("rank", pa.int32(), np.dtype(np.int32), "global rank"),
    ("axis", pa.string(), None, "mesh axis: " + "|".join(AXES)),
    ("op", pa.string(), None, "op: " + "|".join(OPS)),
    ("bytes", pa.int64(), np.dtype(np.int64), "bytes this rank sent or contributed"),
    ("entry_s", pa.float64(), np.dtype(np.float64), "when this rank entered the op, s"),
    ("exit_s", pa.float64(), np.dtype(np.float64), "when this rank left the op, s"),
    ("sync_wait_s", pa.float64(), np.dtype(np.float64),
     "max(entry over the instance's ranks) - own entry: waiting for stragglers, s"),
    ("transfer_s", pa.float64(), np.dtype(np.float64),
     "own exit - max(entry over the instance's ranks), s"),
    ("micro_batch", pa.int32(), np.dtype(np.int32), "PP micro-batch slot"),
    ("group", pa.string(), None,
     "communicator the op ran on, same name on all members (a p2p link for send/recv)"),
    ("seq", pa.int64(), np.dtype(np.int64),
     "this rank's counter of ops on `group` within (replica, step), from 0"),
)


def make_schema(table: str, columns: tuple[Column, ...]) -> pa.Schema:
    fields = [pa.field(name, typ, metadata={b"description": desc.encode()})
              for name, typ, _, desc in columns]
    return pa.schema(fields, metadata={VERSION_KEY: SCHEMA_VERSION.encode(),
                                       TABLE_KEY: table.encode()})


MOE_COLUMNS: tuple[Column, ...] = (
    ("replica", pa.int32(), np.dtype(np.int32), "DP replica"),
    ("step", pa.int64(), np.dtype(np.int64), "step counter within the replica"),
    ("micro_batch", pa.int32(), np.dtype(np.int32), "PP micro-batch slot"),
    ("stage", pa.int32(), np.dtype(np.int32), "pipeline stage of the layer"),
    ("layer", pa.int32(), np.dtype(np.int32), "global decoder layer (an MoE layer)"),
    ("rank", pa.int32(), np.dtype(np.int32), "global rank"),
    ("ep_index", pa.int32(), np.dtype(np.int32), "position of the rank in its EP group"),
    ("num_tokens", pa.int64(), np.dtype(np.int64), "tokens of the step, tokens"),
    ("tokens_out", pa.int64(), np.dtype(np.int64),
     "(token, expert) pairs of this rank's tokens dispatched to experts, pairs"),
    ("tokens_in", pa.int64(), np.dtype(np.int64),
     "(token, expert) pairs this rank's experts computed, pairs"),
    ("slot_experts", pa.list_(pa.int32()), None,
     "logical expert of each expert slot on the rank (repeats = EPLB copies)"),
    ("tokens_per_expert", pa.list_(pa.int64()), None,
     "pairs computed by each expert slot on the rank, pairs"),
    ("imbalance", pa.float64(), np.dtype(np.float64),
     "max / mean of tokens_in over the layer's EP ranks (1 = balanced)"),
    ("a2a_bytes_sent", pa.int64(), np.dtype(np.int64),
     "bytes sent to other ranks in the dispatch plus the combine all-to-all"),
    ("dispatch_sync_wait_s", pa.float64(), np.dtype(np.float64),
     "dispatch all-to-all: max(entry over the EP group) - own entry, s"),
    ("combine_sync_wait_s", pa.float64(), np.dtype(np.float64),
     "combine all-to-all: max(entry over the EP group) - own entry, s"),
    ("a2a_sync_wait_s", pa.float64(), np.dtype(np.float64),
     "dispatch + combine sync-wait: time spent waiting for other ranks' experts, s"),
)

REQUESTS_SCHEMA = make_schema("requests", REQUEST_COLUMNS)
STEPS_SCHEMA = make_schema("steps", STEP_COLUMNS)
COLLECTIVES_SCHEMA = make_schema("collectives", COLLECTIVE_COLUMNS)

MOE_SCHEMA = make_schema("moe", MOE_COLUMNS)

SCHEMAS = {"requests": REQUESTS_SCHEMA, "steps": STEPS_SCHEMA, "collectives": COLLECTIVES_SCHEMA,
           "moe": MOE_SCHEMA}
