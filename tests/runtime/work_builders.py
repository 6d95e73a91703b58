"""Hand-built StageWork/StepWork for runtime tests (no cost model): tiny delays, exact bytes."""

from __future__ import annotations

import numpy as np

from emulator.core.work import StageWork, StepWork

DELAY_S = 1e-4
BF16_BYTES = 2


def step_work(*, tp: int, pp: int, num_layers_per_stage: int, num_tokens: int,
              hidden: int, vocab: int = 1000, num_sampled: int | None = None) -> StepWork:
    """Every TP/PP byte count as the cost model would set it for a dense model."""
    num_sampled = num_tokens if num_sampled is None else num_sampled
    act_bytes = num_tokens * hidden * BF16_BYTES
    stages = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        n = num_layers_per_stage
        stages.append(StageWork(
            stage=s, layer_ids=np.arange(s * n, (s + 1) * n, dtype=np.int64),
            attn_compute_s=np.full(n, DELAY_S), mlp_compute_s=np.full(n, DELAY_S),
            tp_allreduce_bytes=act_bytes if tp > 1 else 0,
            pre_compute_s=DELAY_S if first else 0.0,
            embed_allreduce_bytes=act_bytes if (first and tp > 1) else 0,
            post_compute_s=DELAY_S if last else 0.0,
            logits_gather_bytes=(num_sampled * vocab // tp * BF16_BYTES
                                 if (last and tp > 1) else 0),
            pp_send_bytes=0 if last else act_bytes))
    return StepWork(stages=stages, num_tokens=num_tokens, num_sampled_tokens=num_sampled)
