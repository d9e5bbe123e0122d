"""The memory of one healing worker, from the configs alone (nothing loaded), checked before anything loads.

A worker holds the original model once (the teacher and the student share every frozen weight), or, with its
decoder layers' attention and MLP sharded over the W workers by FSDP2, 1/W of those plus the two layers gathered at a
time (the one running and the one prefetched) and the rest whole (norms, embedding, head), the trained maps
in float32 with their gradients and AdamW's two moments (with LoRA: the frozen map in float32 and four copies of
A and B), the activations the backward pass keeps from the first linearized layer on, for its share of the batch,
and one chunk of the vocabulary projection (student and teacher log-probs and a gradient). docs/method.md §12.
"""

from __future__ import annotations

import dataclasses
import math

from nbl_dist.core.losses import HEAD_ROWS
from nbl_dist.model.arch import layer_param_counts
from nbl_dist.runtime.resources import fmt_bytes

FLOAT32 = 4


@dataclasses.dataclass(frozen=True)
class HealPlan:
    weights: int  # the model once, in the frozen dtype (sharded: this worker's share and two gathered layers)
    maps: int  # trained tensors, gradients, AdamW moments (and LoRA's frozen float32 map)
    activations: int  # kept for the backward pass, this worker's blocks
    logits: int  # one chunk of the vocabulary projection
    budget: int | None
    budget_source: str
    sharded: bool = False  # the frozen layers split over the workers (FSDP2)
    workers: int = 1

    @property
    def total(self) -> int:
        return self.weights + self.maps + self.activations + self.logits

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def describe(self) -> str:
        model = f"model sharded over {self.workers} workers {fmt_bytes(self.weights)}" if self.sharded else \
            f"model {fmt_bytes(self.weights)}"
        parts = (f"{model} + maps and AdamW {fmt_bytes(self.maps)} + activations "
                 f"{fmt_bytes(self.activations)} + head chunk {fmt_bytes(self.logits)} = {fmt_bytes(self.total)}")
        if self.budget is None:
            return f"memory per worker: {parts} (not checked: no budget known)"
        verdict = "fits" if self.fits else "does NOT fit"
        return f"memory per worker: {parts}; {verdict} in {fmt_bytes(self.budget)} ({self.budget_source})"

    def refusal(self) -> str:
        shard = "raise --workers (with --shard-weights auto or on, each holds 1/W of the frozen layers, and a share " \
            "of the batch)" if self.sharded or self.workers == 1 else "shard the frozen layers over the workers " \
            "(--shard-weights on)"
        return (f"healing does not fit one worker: {self.describe()}. Lower --batch-size, lower --seq-len, {shard}, "
                "train a LoRA update (--lora-rank) instead of W, or give a larger --device-memory if the budget is "
                "wrong")


def activation_bytes_per_token(config, layers: list[int], dtype_bytes: int) -> int:
    """Bytes the backward pass keeps per token: from the first linearized layer on, each layer that keeps its
    attention saves its norms' inputs and outputs, q, k, v and the attention output (about 6 d + 2 (heads + kv)
    head_dim values) and its MLP's gate, up and activation (4 I); a linearized one its map's float32 input and the
    MLP's."""
    d, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kept = (6 * d + 2 * (heads + kv) * head_dim + 4 * inter) * dtype_bytes
    linear = d * FLOAT32 + (3 * d + 4 * inter) * dtype_bytes
    run = range(min(layers), config.num_hidden_layers)
    return sum(linear if i in layers else kept for i in run)


def heal_plan(config, layers: list[int], dtype_bytes: int, local_batch: int, seq_len: int, lora_rank: int | None,
              budget: int | None, budget_source: str = "", workers: int = 1, shard: str = "off") -> HealPlan:
    """The plan of one worker. With shard "on" the frozen layers are sharded over the workers; "auto" shards them
    only when the whole model does not fit one worker and there are several workers.

    Args:
        config: the baseline's transformers config.
        layers: the linearized layers.
        dtype_bytes: bytes per frozen weight and activation.
        local_batch: blocks per step on this worker (the global batch over the workers).
        seq_len: tokens per block.
        lora_rank: LoRA's rank, or None (W and b trained).
        budget, budget_source: the memory one worker has and where that number came from (None: not checked).
        workers, shard: the Ray Train workers, and --shard-weights.
    """
    per_layer, _, total_params = layer_param_counts(config)
    d = config.hidden_size
    per_map = d * d + d
    trained = 2 * lora_rank * d if lora_rank else per_map
    maps = len(layers) * FLOAT32 * (4 * trained + (per_map if lora_rank else 0))
    activations = local_batch * seq_len * activation_bytes_per_token(config, layers, dtype_bytes)
    logits = 3 * min(HEAD_ROWS, local_batch * seq_len) * config.vocab_size * FLOAT32
    whole = HealPlan(total_params * dtype_bytes, maps, activations, logits, budget, budget_source, False, workers)
    if shard == "off" or workers < 2 or (shard == "auto" and whole.fits):
        return whole
    norms = 2 * config.hidden_size  # each layer's two RMSNorm weights stay whole on every worker
    sharded = [n - norms for n in per_layer]
    weights = total_params - sum(sharded) + math.ceil(sum(sharded) / workers) + 2 * max(sharded)
    return dataclasses.replace(whole, weights=weights * dtype_bytes, sharded=True)
