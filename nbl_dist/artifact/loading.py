"""Loading an output folder (or any checkpoint of a supported family) as a working transformers model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nbl_dist.artifact.folder import ModelFolder
from nbl_dist.errors import CheckpointError
from nbl_dist.model.safetensors_io import tensor_specs, torch_dtype


def load_linearized(model_dir: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Load an nbl-dist output folder (or any plain checkpoint) as a working transformers model.

    An alias of `AutoModelForCausalLM.from_pretrained` (the classes `import nbl_dist` registers), with the
    checkpoint's stored dtype as default and a refusal of missing or unexpected tensors.

    Args:
        model_dir: an nbl-dist output folder, or a plain checkpoint of a supported family.
        dtype: the dtype to load in (default: that of the stored embedding).
        device: where to put the weights.
    Returns:
        The model in eval mode; `model.config.nbl` is the "nbl" section, None for a plain checkpoint.
    """
    from transformers import AutoModelForCausalLM

    folder = ModelFolder.open(model_dir)
    model_dir, raw, adapter = folder.path, folder.config, folder.adapter
    dtype = torch_dtype(dtype) if dtype is not None else tensor_specs(model_dir)[adapter.embed_key][0]
    if raw.get("nbl") and raw.get("model_type") == adapter.model_type:
        raise CheckpointError(
            f"{str(model_dir)!r} was written by an older nbl-dist (config.json's model_type is still "
            f"{adapter.model_type!r}, format {raw['nbl'].get('format_version')}), which transformers would load with "
            "random attention in the linearized layers; calibrate again to write the current format")
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=str(device),
                                                       output_loading_info=True)
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise CheckpointError(f"{str(model_dir)!r} does not match its config: missing {bad['missing_keys'][:5]}, "
                              f"unexpected {bad['unexpected_keys'][:5]}, wrong shape {bad['mismatched_keys'][:5]}; "
                              "the folder is incomplete or was edited: copy or write it again")
    if getattr(model.config, "nbl", None) is None:
        model.config.nbl = None  # callers read config.nbl on every loaded model, plain ones included
    return model.eval()


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "auto") -> nn.Module:
    """A model folder (linearized or plain) on --device in --dtype (auto: float32 on CPU, the stored dtype on GPU):
    how `nbl-dist eval` and `bench` load what they measure."""
    from transformers import AutoConfig

    from nbl_dist.runtime.resources import resolve_dtype, resolve_local_device

    device = resolve_local_device(device)
    return load_linearized(model_dir, dtype=resolve_dtype(dtype, AutoConfig.from_pretrained(model_dir), device),
                           device=device)
