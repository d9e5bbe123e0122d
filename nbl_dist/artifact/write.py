"""Writing output folders. `write_linearized` writes calibration's: a standard Hugging Face checkpoint holding
every tensor of the source except a linearized layer's `self_attn.*` and `input_layernorm.*`, plus
`model.layers.{i}.nbl_linear.{weight,bias}`; config.json with a model_type of its own ("nbl_llama", ...), an "nbl"
section and an auto_map naming modeling_nbl.py, a verbatim copy of nbl_dist/model/modeling_nbl.py. `write_derived`
writes a folder derived from another (healing's): every file copied as it is but the tensors that change, which
are written again one at a time, and a section added to config.json's "nbl". Both write into a staging folder
that artifact.publish moves into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from nbl_dist.artifact.folder import ModelFolder
from nbl_dist.errors import CheckpointError
from nbl_dist.model import modeling_nbl
from nbl_dist.model.arch import ArchAdapter, adapter_for
from nbl_dist.model.modeling_nbl import NBL_FAMILIES
from nbl_dist.model.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    TensorSource,
    tensor_specs,
    weight_map,
    write_safetensors_streaming,
)
from nbl_dist.model.surgery import Fit, nbl_section

NBL_FILE = "model-nbl.safetensors"
# A single-file source's tensors go here: the output always has an index, and transformers reads
# model.safetensors alone, ignoring the index, when both are there.
KEPT_NAME = "model-kept.safetensors"
MODELING_FILE = Path(modeling_nbl.__file__)
MODELING_MODULE = MODELING_FILE.stem  # "modeling_nbl": the module name auto_map entries start with


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
    adapter = adapter_for(config)
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


def write_derived(src: ModelFolder, staging: str | Path, new_tensors: str | Path, sections: dict,
                  reports: dict[str, dict]) -> None:
    """Write into `staging` a folder derived from `src`: every file copied as it is (so every unchanged tensor is
    bit for bit the source's), except the safetensors files holding a tensor of `new_tensors`, which are written
    again one tensor at a time, the new ones in the stored dtype; config.json's "nbl" section gains `sections`, and
    each report is written as a JSON file of that name.

    Args:
        src: the folder derived from.
        staging: the (empty) folder to write into.
        new_tensors: a safetensors file of the tensors that change, under their checkpoint keys.
        sections: key -> value added to config.json's "nbl" section (e.g. {"healing": {...}}).
        reports: file name -> content, e.g. {"nbl_heal_report.json": {...}}.
    """
    staging = Path(staging)
    wmap, specs = weight_map(src.path), tensor_specs(src.path)
    with safe_open(str(new_tensors), framework="pt") as new:
        changed = set(new.keys())
        unknown = sorted(changed - set(wmap))
        if unknown:
            raise CheckpointError(f"{str(src.path)!r} holds no tensor {unknown[0]!r} to replace ({len(unknown)} in "
                                  "all): the new tensors were made for another folder")
        rewrite = {wmap[k] for k in changed}
        for p in src.path.iterdir():
            if p.is_file() and p.name not in rewrite and p.name != "config.json" and p.name not in reports:
                shutil.copy2(p, staging / p.name)
        for fname in sorted(rewrite):
            with safe_open(str(src.path / fname), framework="pt") as old:
                sources: list[TensorSource] = [
                    (k, *specs[k], (lambda k=k, old=old: (new.get_tensor(k) if k in changed
                                                          else old.get_tensor(k)).to(specs[k][0])))
                    for k in (k for k, f in wmap.items() if f == fname)]
                write_safetensors_streaming(staging / fname, sources)
    config = {**src.config, "nbl": {**src.nbl, **sections}}
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    for name, report in reports.items():
        (staging / name).write_text(json.dumps(report, indent=2, default=str))
