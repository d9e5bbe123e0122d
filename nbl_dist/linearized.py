"""The linearized model: a decoder layer whose attention sub-layer is the affine map h + W h + b.

The output folder is a standard Hugging Face checkpoint: every tensor of the source except a linearized layer's
`self_attn.*` and `input_layernorm.*`, plus `model.layers.{i}.nbl_linear.{weight,bias}`, and config.json with an
"nbl" section. `load_linearized` rebuilds the transformers model from it without trust_remote_code.
Every place that swaps a decoder layer for its linearized form goes through `linearize_layer`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from nbl_dist.arch import ArchAdapter, adapter_for
from nbl_dist.errors import CheckpointError
from nbl_dist.safetensors_io import (
    INDEX_NAME,
    TensorSource,
    load_tensors,
    tensor_specs,
    torch_dtype,
    weight_map,
    write_safetensors_streaming,
)

NBL_FILE = "model-nbl.safetensors"
FORMAT_VERSION = 1


class NBLDecoderLayer(nn.Module):
    """Decoder layer with its attention (and input norm) replaced: h_mid = h + W h + b, then the original MLP.

    Holds no KV cache of its own, but writes a (batch, 1, seq, 1) placeholder into its cache slot: transformers
    reads the sequence length from layer 0's cache (positions, masks), so a linearized layer 0 must keep counting.
    """

    def __init__(self, hidden_size: int, post_attention_layernorm: nn.Module, mlp: nn.Module, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nbl_linear = nn.Linear(hidden_size, hidden_size, bias=True)
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, **kwargs) -> torch.Tensor:
        if past_key_values is not None:
            b, t, _ = hidden_states.shape
            stub = hidden_states.new_zeros(b, 1, t, 1)
            past_key_values.update(stub, stub, self.layer_idx)
        h = hidden_states + self.nbl_linear(hidden_states)  # (B, T, d)
        return h + self.mlp(self.post_attention_layernorm(h))


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
    _record_nbl(model.config, sorted(set(fits) | set(_linearized_of(model.config))))
    return model


def _linearized_of(config) -> list[int]:
    nbl = getattr(config, "nbl", None) or {}
    return list(nbl.get("linearized_layers", []))


def nbl_section(layers: list[int], extra: dict | None = None) -> dict:
    """config.json's "nbl" section: which layers are linearized, in which format version, and by what."""
    return {"linearized_layers": sorted(layers), "format_version": FORMAT_VERSION, **(extra or {})}


def _record_nbl(config, layers: list[int]) -> None:
    config.nbl = nbl_section(layers)


def write_linearized(src_dir: str | Path, out_dir: str | Path, layers: list[int],
                     get_fit: Callable[[int], Fit], nbl_meta: dict | None = None,
                     dtype: torch.dtype | None = None) -> dict:
    """Write the linearized checkpoint by streaming: unchanged tensors are copied file by file from the source,
    the new ones are fetched with get_fit(layer) one layer at a time, in the checkpoint's dtype.

    Args:
        src_dir: the original checkpoint folder (never modified).
        out_dir: the folder to create (must not exist or be empty).
        layers: the layers to linearize.
        get_fit: layer -> (W (d, d), b (d,)); called once per layer, in order.
        nbl_meta: extra fields for config.json's "nbl" section.
        dtype: storage dtype of the new tensors (default: that of the source's embedding).
    Returns:
        {"files": [...], "total_size": bytes, "removed_bytes": bytes, "added_bytes": bytes}.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = json.loads((src_dir / "config.json").read_text())
    from transformers import AutoConfig

    adapter = adapter_for(AutoConfig.from_pretrained(src_dir))
    specs = tensor_specs(src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise CheckpointError(f"output folder {str(out_dir)!r} is not empty")
    selected = set(layers)
    new_map, total, removed = _copy_kept_tensors(src_dir, out_dir, adapter, specs, selected)
    nbl_names, added = _write_nbl_tensors(out_dir / NBL_FILE, adapter, sorted(selected), get_fit,
                                          dtype or specs[adapter.embed_key][0], int(config["hidden_size"]))
    new_map.update({name: NBL_FILE for name in nbl_names})
    total += added
    (out_dir / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}, indent=2))
    config["nbl"] = nbl_section(sorted(selected), nbl_meta)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _copy_side_files(src_dir, out_dir)
    return {"files": sorted(set(new_map.values())), "total_size": total, "removed_bytes": removed,
            "added_bytes": added}


def _copy_kept_tensors(src_dir: Path, out_dir: Path, adapter: ArchAdapter, specs: dict,
                       selected: set[int]) -> tuple[dict[str, str], int, int]:
    """Copy every tensor a linearized layer keeps, file by file, one tensor in memory at a time.

    Returns:
        (weight map of the copied tensors, bytes written, bytes of the tensors left out).
    """
    wmap = weight_map(src_dir)
    new_map: dict[str, str] = {}
    total = removed = 0
    for fname in sorted(set(wmap.values())):
        mine = [k for k, f in wmap.items() if f == fname]
        keep = [k for k in mine if not adapter.is_replaced_key(k, selected)]
        removed += sum(_nbytes(*specs[k]) for k in mine if adapter.is_replaced_key(k, selected))
        if not keep:
            continue
        with safe_open(str(src_dir / fname), framework="pt") as f:
            sources: list[TensorSource] = [(k, *specs[k], (lambda k=k: f.get_tensor(k))) for k in keep]
            total += write_safetensors_streaming(out_dir / fname, sources)
        new_map.update({k: fname for k in keep})
    return new_map, total, removed


def _write_nbl_tensors(path: Path, adapter: ArchAdapter, layers: list[int], get_fit: Callable[[int], Fit],
                       dtype: torch.dtype, d: int) -> tuple[list[str], int]:
    """Write every layer's W and b into one file, fetching one layer's fit at a time. Returns (names, bytes)."""
    sources: list[TensorSource] = []
    bias_of: dict[int, torch.Tensor] = {}  # holds one layer's bias between its two tensors, nothing more

    def weight_of(i):
        w, bias_of[i] = get_fit(i)
        return w.to(dtype)

    for i in layers:
        wn, bn = adapter.nbl_keys(i)
        sources.append((wn, dtype, (d, d), lambda i=i: weight_of(i)))
        sources.append((bn, dtype, (d,), lambda i=i: bias_of.pop(i).to(dtype)))
    added = write_safetensors_streaming(path, sources) if sources else 0
    return [name for name, *_ in sources], added


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _copy_side_files(src_dir: Path, out_dir: Path) -> None:
    """Tokenizer files, generation config and anything else that is not weights, index or config."""
    for p in src_dir.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (INDEX_NAME, "config.json") \
                and not p.name.endswith((".bin", ".pt", ".gguf")):
            shutil.copy2(p, out_dir / p.name)


def read_nbl_section(model_dir: str | Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("nbl") or {}


def load_linearized(model_dir: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Load an nbl-dist output folder (or any plain checkpoint) as a working transformers model.

    The model is built on the meta device, the linearized layers are swapped for NBLDecoderLayers, and the
    tensors are assigned from the safetensors files: nothing is initialised twice, no remote code runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(config)
    nbl = read_nbl_section(model_dir)
    linearized = sorted(nbl.get("linearized_layers", []))
    wmap = weight_map(model_dir)
    dtype = torch_dtype(dtype) if dtype is not None else tensor_specs(model_dir)[adapter.embed_key][0]

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = adapter.layers(model)
    for i in linearized:
        with torch.device("meta"):
            layers[i] = linearize_layer(layers[i], i, adapter, config.hidden_size)
    state, _ = load_tensors(model_dir, list(wmap), device=device, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == adapter.lm_head_key)]
    if missing or unexpected:
        raise CheckpointError(f"{str(model_dir)!r} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if tied:
        adapter.tie_head(model)
    # Non-persistent buffers (rotary inverse frequencies) are not in the checkpoint: rebuild them for real.
    adapter.rebuild_rotary(adapter.decoder(model), config, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left uninitialised after loading {str(model_dir)!r}: {leftover[:5]}")
    config.nbl = nbl or None
    if (model_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model.eval()


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temporary folder into place (same filesystem: a rename)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
