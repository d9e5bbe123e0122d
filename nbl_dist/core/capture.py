"""Scoped hooks that stream each decoder layer's (x, a) into the caller's LayerStats.

x is the residual stream entering the layer (before its input norm), a the attention sub-layer's output (o_proj,
before the residual add). The hooks own nothing: they write into the accumulators the caller passes in, and they
are removed when the `with` block ends, whatever happens inside it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from nbl_dist.core.stats import LayerStats
from nbl_dist.errors import NonFiniteActivationError


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NonFiniteActivationError(
            f"non-finite values (NaN/Inf) in {what}; the model overflows in this dtype on this data. "
            "Try --dtype float32 (or bfloat16 instead of float16), or check the checkpoint.")


@contextlib.contextmanager
def capture_stats(layers: Mapping[int, nn.Module], stats: Mapping[int, LayerStats],
                  attention: Callable[[nn.Module], nn.Module],
                  tag: str = "", timer: dict | None = None, precision: str = "fp32") -> Iterator[None]:
    """Accumulate stats[i] from every forward of layers[i] inside the block.

    Args:
        layers: layer index -> decoder layer module.
        stats: layer index -> accumulator (updated in place).
        attention: decoder layer -> its attention sub-layer (the family adapter's `attention`).
        tag: text naming the current batch in error messages.
        timer: if given, timer["statistics"] accumulates the seconds spent updating statistics.
        precision: how the Gram products are formed (stats.PRECISIONS).
    """
    handles = []
    pending: dict[int, torch.Tensor] = {}

    def pre_hook(i):
        def hook(module, args, kwargs):
            pending[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def attn_hook(i):
        def hook(module, args, kwargs, output):
            x = pending.pop(i)
            a = output[0] if isinstance(output, tuple) else output
            t0 = time.perf_counter()
            check_finite(x, f"the input of layer {i}{tag}")
            check_finite(a, f"the attention output of layer {i}{tag}")
            stats[i].update(x.detach(), a.detach(), precision)
            if timer is not None:
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                timer["statistics"] = timer.get("statistics", 0.0) + time.perf_counter() - t0
        return hook

    try:
        for i, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(attention(layer).register_forward_hook(attn_hook(i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
