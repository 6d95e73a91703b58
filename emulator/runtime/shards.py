"""Per-rank weight shard shapes: what each emulated GPU really allocates (scaled by
memory_scale in the worker).

Dense attention and MLP matrices get their real per-rank shapes (column/row-parallel split
by TP, as in Megatron-LM / vLLM); the vocabulary-parallel embedding sits on the first stage
and the LM head on the last. Whatever the memory plan counts beyond those (norms, biases,
MoE experts and routers, MLA projections) is one flat tensor per stage, so the bytes a rank
represents equal ``specs.memory.stage_weight_bytes`` exactly.
"""

from __future__ import annotations

from emulator.specs import ModelSpec, ParallelLayout
from emulator.specs.memory import stage_weight_bytes

ELEMENT_BYTES = 2  # the worker allocates bf16 (2-byte) elements


def stage_weight_shapes(model: ModelSpec, layout: ParallelLayout) -> list[list[tuple[int, ...]]]:
    """Per pipeline stage, the shapes (in 2-byte elements) every TP rank of it holds."""
    tp = layout.tp
    h = model.hidden_size
    kv_heads = layout.kv_heads_per_rank(model)
    out = []
    for stage, (first, last) in enumerate(layout.stage_layers(model)):
        total_elems = stage_weight_bytes(model, layout)[stage] // ELEMENT_BYTES
        shapes: list[tuple[int, ...]] = []
        if model.weight_dtype_bytes == ELEMENT_BYTES:
            if stage == 0:
                shapes.append((model.vocab_size // tp, h))  # embedding
            if stage == layout.pp - 1 and not (model.tie_word_embeddings and layout.pp == 1):
                shapes.append((model.vocab_size // tp, h))  # LM head
            for layer in range(first, last):
                if model.attention != "mla":
                    heads = model.num_attention_heads // tp
                    shapes += [(h, (heads + 2 * kv_heads) * model.head_dim),  # QKV (column-parallel)
                               (heads * model.head_dim, h)]                   # O (row-parallel)
                if not model.is_moe_layer(layer) and model.intermediate_size:
                    shapes += [(h, 2 * model.intermediate_size // tp),        # gate+up
                               (model.intermediate_size // tp, h)]            # down
        used = sum(a * b for a, b in shapes)
        if used > total_elems:  # replicated KV heads etc.: fall back to one exact tensor
            shapes, used = [], 0
        if total_elems - used > 0:
            shapes.append((total_elems - used,))
        out.append(shapes)
    return out


def kv_row_elems(kv_block_elems: int, memory_scale: float, kv_block_size_tokens: int) -> int:
    """Elements per row (token slot) of a rank's KV pool: a block's elements scaled by
    ``memory_scale``, split into its token rows (at least one)."""
    return max(1, round(kv_block_elems * memory_scale / kv_block_size_tokens))
