"""What linearizing K layers should buy a serving engine, from the config alone: FLOPs, bytes and KV cache.

A roofline of the decoder (docs/method.md §11): a step that processes `tokens` new tokens at an average context
`context` costs FLOPs (2 per multiply-add of every layer weight a token passes through, attention's QK^T and AV
over the context, and the output head once per sequence) and bytes (every weight read once per step, plus the keys
and values of the context read from the KV cache), and takes max(FLOPs / peak, bytes / bandwidth). A linearized
layer swaps its attention's weights (q, k, v, o projections) for one d x d map, does no QK^T or AV, and keeps no
keys or values. benchmarks/serve_vllm.py sets the ratio this predicts beside the one vLLM measures.
Plain Python: it imports neither torch nor vLLM itself (importing it still runs nbl_dist/__init__.py, which
imports torch and transformers to register the model classes).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder that its serving cost depends on (a transformers config's fields)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> "DecoderShape":
        heads = config.num_attention_heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate=config.intermediate_size, vocab=config.vocab_size)

    # Weight matrices only: the d-sized vectors (norms, the map's bias) are under 0.2% of a layer and left out.
    @property
    def attention_weights(self) -> int:
        """q and o projections (d x heads*head_dim each), k and v (d x kv_heads*head_dim each)."""
        return 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def nbl_weights(self) -> int:
        """The linear map that replaces them: W, d x d."""
        return self.hidden * self.hidden

    @property
    def mlp_weights(self) -> int:
        """Gate, up and down projections: what every layer keeps."""
        return 3 * self.hidden * self.intermediate

    @property
    def head_weights(self) -> int:
        """The output projection to the vocabulary (read once per step, tied to the embedding or not)."""
        return self.hidden * self.vocab


@dataclasses.dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        """The roofline: the step is bound by whichever of compute and memory traffic takes longer."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def kv_bytes_per_token(shape: DecoderShape, linearized: int, dtype_bytes: int) -> int:
    """Bytes of KV cache one token of context holds: a key and a value in every layer that kept attention."""
    return 2 * shape.kv_heads * shape.head_dim * dtype_bytes * (shape.layers - linearized)


def step_cost(shape: DecoderShape, linearized: int, tokens: int, context: float, dtype_bytes: int,
              sequences: int = 1) -> StepCost:
    """One engine step over `tokens` new tokens (all sequences together) at an average context of `context`
    tokens per sequence, with `linearized` of the layers linearized.

    Args:
        tokens: new tokens the step processes (a prefill's prompt tokens, or one per sequence in decode).
        context: tokens each new token attends to, on average (prefill of T tokens: (T + 1) / 2).
        dtype_bytes: bytes per weight and per KV-cache value.
        sequences: sequences in the step; each one's context is read from the KV cache once, and each gets the
            logits of one token.
    """
    kept = shape.layers - linearized
    layer_weights = kept * shape.attention_weights + linearized * shape.nbl_weights + shape.layers * shape.mlp_weights
    attention_flops = 2 * 2 * shape.heads * shape.head_dim * context * kept  # QK^T and AV, per token
    # The head runs once per sequence: an engine computes logits only where it samples (a prefill's last token).
    flops = tokens * (2 * layer_weights + attention_flops) + sequences * 2 * shape.head_weights
    kv_read = sequences * context * kv_bytes_per_token(shape, linearized, dtype_bytes)
    return StepCost(flops=flops, bytes=(layer_weights + shape.head_weights) * dtype_bytes + kv_read)


def kv_capacity_ratio(shape: DecoderShape, linearized: int) -> float:
    """KV tokens that the same KV memory holds with `linearized` layers linearized, over the original's: L / (L - K)."""
    return shape.layers / (shape.layers - linearized)
