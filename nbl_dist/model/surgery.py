"""The linearized model in memory: swapping a decoder layer for its linearized form (an NBLDecoderLayer whose
attention sub-layer is the affine map h + W h + b, docs/method.md §1) goes through `linearize_layer`, and only
there; `apply_linearization` does it for good (and records the layers in config.nbl, as an output folder's
config.json does), `linearized_in_place` for the duration of a measurement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from nbl_dist.model.arch import ArchAdapter, adapter_for
from nbl_dist.model.modeling_nbl import NBLDecoderLayer, linearized_layers

# 2: config.json has model_type "nbl_<family>" and an auto_map; 1 kept the source's model_type (load_linearized
# refuses it: transformers would build the linearized layers with attention).
FORMAT_VERSION = 2


Fit = tuple[torch.Tensor, torch.Tensor]  # (W (d, d), b (d,)) of one layer


@torch.no_grad()
def linearize_layer(layer: nn.Module, layer_idx: int, adapter: ArchAdapter, hidden_size: int,
                    fit: Fit | None = None) -> NBLDecoderLayer:
    """An NBLDecoderLayer sharing `layer`'s MLP and post-attention norm, on their device and in their dtype.

    Args:
        fit: (W, b) copied into the linear map; None leaves it to be filled (a checkpoint load assigns it).
    """
    norm, mlp = adapter.kept_blocks(layer)
    p = next(mlp.parameters())
    new = NBLDecoderLayer(hidden_size, norm, mlp, layer_idx)
    new.nbl_linear.to(device=p.device, dtype=p.dtype)
    if fit is not None:
        new.nbl_linear.weight.copy_(fit[0])
        new.nbl_linear.bias.copy_(fit[1])
    return new


def zero_fits(layers: list[int], d: int) -> dict[int, Fit]:
    """Attention-drop as a degenerate linearization: W = 0, b = 0 leaves h_mid = h."""
    return {i: (torch.zeros(d, d), torch.zeros(d)) for i in layers}


def apply_linearization(model: nn.Module, fits: Mapping[int, Fit]) -> nn.Module:
    """Replace, in place, the layers in `fits` (index -> (W (d, d), b (d,))) by NBLDecoderLayers."""
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    d = model.config.hidden_size
    for i, fit in sorted(fits.items()):
        layers[i] = linearize_layer(layers[i], i, adapter, d, fit)
    model.config.nbl = nbl_section(sorted(set(fits) | set(linearized_layers(model.config))))
    return model


@contextlib.contextmanager
def linearized_in_place(model: nn.Module, fits: Mapping[int, Fit]) -> Iterator[nn.Module]:
    """The model with the layers in `fits` (index -> (W, b)) linearized for the duration of the block, and its
    own layers back afterwards (a measurement or evaluation of one set of layers without reloading the model)."""
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    originals = {i: layers[i] for i in fits}
    try:
        for i, fit in fits.items():
            layers[i] = linearize_layer(originals[i], i, adapter, model.config.hidden_size, fit)
        yield model
    finally:
        for i, original in originals.items():
            layers[i] = original


def nbl_section(layers: list[int], extra: dict | None = None) -> dict:
    """config.json's "nbl" section: which layers are linearized, in which format version, and by what."""
    return {"linearized_layers": sorted(layers), "format_version": FORMAT_VERSION, **(extra or {})}
