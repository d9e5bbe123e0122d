"""The linearized model: a decoder layer whose attention sub-layer is the affine map h + W h + b.

The output folder is a standard Hugging Face checkpoint: every tensor of the source except a linearized layer's
`self_attn.*` and `input_layernorm.*`, plus `model.layers.{i}.nbl_linear.{weight,bias}`; config.json with a
model_type of its own ("nbl_llama", ...), an "nbl" section and an auto_map naming modeling_nbl.py, a verbatim copy
of nbl_dist/modeling_nbl.py, which defines the model classes. `import nbl_dist` registers those classes with
transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(OUT)` loads it (so does
`trust_remote_code=True` without nbl-dist, and `load_linearized`, an alias of the former).
Every place that swaps a decoder layer for its linearized form in memory goes through `linearize_layer`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn

from nbl_dist import modeling_nbl
from nbl_dist.arch import ArchAdapter, adapter_for
from nbl_dist.errors import CheckpointError
from nbl_dist.modeling_nbl import NBL_FAMILIES, NBLDecoderLayer
from nbl_dist.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    TensorSource,
    tensor_specs,
    torch_dtype,
    weight_map,
    write_safetensors_streaming,
)

__all__ = ["NBLDecoderLayer", "apply_linearization", "linearize_layer", "load_linearized", "register_auto_classes",
           "write_linearized"]

NBL_FILE = "model-nbl.safetensors"
# A single-file source's tensors go here: the output always has an index, and transformers reads
# model.safetensors alone, ignoring the index, when both are there.
KEPT_NAME = "model-kept.safetensors"
# 2: config.json has model_type "nbl_<family>" and an auto_map; 1 kept the source's model_type (load_linearized
# refuses it: transformers would build the linearized layers with attention).
FORMAT_VERSION = 2
MODELING_FILE = Path(modeling_nbl.__file__)
MODELING_MODULE = MODELING_FILE.stem  # "modeling_nbl": the module name auto_map entries start with


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
                     dtype: torch.dtype | None = None,
                     progress: Callable[[int], Callable[[int], None]] | None = None) -> dict:
    """Write the linearized checkpoint by streaming: unchanged tensors are copied file by file from the source,
    the new ones are fetched with get_fit(layer) one layer at a time, in the checkpoint's dtype.

    Args:
        src_dir: the original checkpoint folder (never modified).
        out_dir: the folder to create (must not exist or be empty).
        layers: the layers to linearize.
        get_fit: layer -> (W (d, d), b (d,)); called once per layer, in order.
        nbl_meta: extra fields for config.json's "nbl" section.
        dtype: storage dtype of the new tensors (default: that of the source's embedding).
        progress: given the bytes to write, returns a callable then told the bytes of every file copied and of
            every new layer written (a progress line).
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
    dtype = dtype or specs[adapter.embed_key][0]
    d = int(config["hidden_size"])
    tick = progress(written_bytes(specs, adapter, selected, dtype, d)) if progress else (lambda n: None)
    new_map, total, removed = _copy_kept_tensors(src_dir, out_dir, adapter, specs, selected, tick)
    nbl_names, added = _write_nbl_tensors(out_dir / NBL_FILE, adapter, sorted(selected), get_fit, dtype, d, tick)
    new_map.update({name: NBL_FILE for name in nbl_names})
    total += added
    (out_dir / INDEX_NAME).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}, indent=2))
    config.update(nbl_config_fields(adapter.model_type))
    config["nbl"] = nbl_section(sorted(selected), {"base_model_type": adapter.model_type, **(nbl_meta or {})})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _copy_side_files(src_dir, out_dir)
    # After the side files, so that this file wins over any file of the same name in the source.
    shutil.copyfile(MODELING_FILE, out_dir / MODELING_FILE.name)
    return {"files": sorted(set(new_map.values())), "total_size": total, "removed_bytes": removed,
            "added_bytes": added}


def nbl_config_fields(family: str) -> dict:
    """The config.json fields that make transformers build the linearized model of `family` ("llama", ...).

    Args:
        family: the source's model_type.
    Returns:
        {"model_type": "nbl_<family>", "architectures": [class name], "auto_map": {...}}; auto_map names the
        classes in modeling_nbl.py for loaders that run without nbl-dist (trust_remote_code=True).
    """
    config_cls, model_cls = NBL_FAMILIES[family]
    return {"model_type": config_cls.model_type, "architectures": [model_cls.__name__],
            "auto_map": {"AutoConfig": f"{MODELING_MODULE}.{config_cls.__name__}",
                         "AutoModelForCausalLM": f"{MODELING_MODULE}.{model_cls.__name__}"}}


def written_bytes(specs: dict, adapter: ArchAdapter, selected: set[int], dtype: torch.dtype, d: int) -> int:
    """Bytes of tensors write_linearized writes: the kept ones, and W (d, d) and b (d,) of each selected layer."""
    kept = sum(_nbytes(*spec) for k, spec in specs.items() if not adapter.is_replaced_key(k, selected))
    return kept + len(selected) * _nbytes(dtype, (d * d + d,))


def _copy_kept_tensors(src_dir: Path, out_dir: Path, adapter: ArchAdapter, specs: dict, selected: set[int],
                       tick: Callable[[int], None]) -> tuple[dict[str, str], int, int]:
    """Copy every tensor a linearized layer keeps, file by file, one tensor in memory at a time; tick(bytes)
    after each file.

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
        out_name = KEPT_NAME if fname == SINGLE_NAME else fname
        with safe_open(str(src_dir / fname), framework="pt") as f:
            sources: list[TensorSource] = [(k, *specs[k], (lambda k=k: f.get_tensor(k))) for k in keep]
            written = write_safetensors_streaming(out_dir / out_name, sources)
        total += written
        tick(written)
        new_map.update({k: out_name for k in keep})
    return new_map, total, removed


def _write_nbl_tensors(path: Path, adapter: ArchAdapter, layers: list[int], get_fit: Callable[[int], Fit],
                       dtype: torch.dtype, d: int, tick: Callable[[int], None]) -> tuple[list[str], int]:
    """Write every layer's W and b into one file, fetching one layer's fit at a time; tick(bytes) per layer.
    Returns (names, bytes)."""
    sources: list[TensorSource] = []
    bias_of: dict[int, torch.Tensor] = {}  # holds one layer's bias between its two tensors, nothing more

    def weight_of(i):
        w, bias_of[i] = get_fit(i)
        tick(_nbytes(dtype, (d * d + d,)))
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
    """config.json's "nbl" section ({} for a plain checkpoint)."""
    return _read_config(Path(model_dir)).get("nbl") or {}


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

    model_dir = Path(model_dir)
    raw = _read_config(model_dir)
    adapter = adapter_for(SimpleNamespace(model_type=raw.get("model_type")))
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


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{str(model_dir)!r} has no config.json: pass a folder nbl-dist calibrate wrote, "
                              "or a Hugging Face checkpoint folder")
    return json.loads(path.read_text())


def register_auto_classes() -> None:
    """Register the linearized model classes (modeling_nbl.py) with transformers' Auto classes; `import nbl_dist`
    calls it. Afterwards AutoConfig / AutoModelForCausalLM.from_pretrained load "nbl_<family>" folders, and
    save_pretrained of such a model writes modeling_nbl.py and its auto_map beside the weights. Idempotent."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_cls, model_cls in NBL_FAMILIES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        config_cls.register_for_auto_class("AutoConfig")
        model_cls.register_for_auto_class("AutoModelForCausalLM")


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temporary folder into place (same filesystem: a rename)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
