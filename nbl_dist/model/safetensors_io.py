"""Safetensors checkpoints: find which file holds which tensor, read only the tensors asked for, and write a
checkpoint one tensor at a time (the header is computed from shapes first, so nothing is held in full).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from nbl_dist.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
# The safetensors format caps its header at 100 MB; a larger length field means the file is something else.
MAX_HEADER_BYTES = 100_000_000
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPE_NAMES)}") from None


def weight_map(model_dir: str | Path, flag: str = "--model") -> dict[str, str]:
    """Tensor name -> safetensors file name (relative), from the index or the single file (`flag` names the option
    the folder came from, in the refusal of a missing one)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {str(model_dir)!r} does not exist; pass {flag} a checkpoint folder")
    index = model_dir / INDEX_NAME
    if index.exists():
        return read_index(index)
    single = model_dir / SINGLE_NAME
    if single.exists():
        return {k: SINGLE_NAME for k in read_header(single)}
    raise CheckpointError(
        f"{str(model_dir)!r} has no {SINGLE_NAME} or {INDEX_NAME}; nbl-dist reads safetensors checkpoints. "
        "Re-save the model with `model.save_pretrained(dir, safe_serialization=True)`.")


def read_index(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a model.safetensors.index.json; a clear error if it is damaged.

    Args:
        index: path of the index file.
    Returns:
        The index's "weight_map".
    """
    try:
        data = json.loads(index.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CheckpointError(f"{str(index)!r} is not valid JSON{where}: the index is damaged; re-download or "
                              "re-copy it") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise CheckpointError(f"{str(index)!r} has no \"weight_map\" object (tensor name -> shard file): it is not "
                              "a safetensors index; re-download or re-copy it")
    return dict(wmap)


def load_tensors(model_dir: str | Path, keys: Iterable[str], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Read only `keys` from the checkpoint (each file opened once, memory-mapped).

    Returns:
        (tensors, bytes_read): bytes_read counts the stored bytes of the tensors read.
    """
    wmap = weight_map(model_dir)
    by_file: dict[str, list[str]] = {}
    for k in keys:
        if k not in wmap:
            raise CheckpointError(f"tensor {k!r} is missing from the checkpoint in {str(model_dir)!r}")
        by_file.setdefault(wmap[k], []).append(k)
    out, nbytes = {}, 0
    for fname, ks in by_file.items():
        with safe_open(str(Path(model_dir) / fname), framework="pt", device="cpu") as f:
            for k in ks:
                t = f.get_tensor(k)
                nbytes += t.numel() * t.element_size()
                out[k] = t.to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else t.dtype)
    return out, nbytes


def tensor_specs(model_dir: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor, read from the headers only."""
    model_dir = Path(model_dir)
    specs = {}
    for fname in sorted(set(weight_map(model_dir).values())):
        specs.update(_file_specs(model_dir / fname))
    return specs


def _file_specs(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    header = read_header(path)
    for k, v in header.items():
        if v["dtype"] not in _ST_TO_DTYPE:  # e.g. F8_E4M3 from a quantised export
            raise CheckpointError(f"tensor {k!r} in {str(path)!r} has dtype {v['dtype']!r}, which nbl-dist cannot "
                                  "read; it reads float checkpoints (F32, F16, BF16, F64): dequantise it first")
    return {k: (_ST_TO_DTYPE[v["dtype"]], tuple(v["shape"])) for k, v in header.items()}


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's header, checked for readability and for a file long enough to hold its tensors.

    Reads only the 8-byte length and the JSON header.

    Args:
        path: the safetensors file.
    Returns:
        Tensor name -> {"dtype", "shape", "data_offsets"} (the "__metadata__" entry removed).
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{str(path)!r} is {size} bytes, too short to be a safetensors file: the download "
                                  "or copy stopped early; re-download or re-copy it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{str(path)!r} is not a safetensors file (its header length field reads {n:,} bytes): a Git LFS "
                "pointer, another format or a corrupt file; re-download or re-copy it")
        if 8 + n > size:
            raise CheckpointError(_truncated(path, size, 8 + n))
        header = _parse_header(path, fh.read(n))
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if size < 8 + n + end:
        raise CheckpointError(_truncated(path, size, 8 + n + end))
    return header


def _truncated(path: Path, size: int, needed: int) -> str:
    return (f"{str(path)!r} is truncated: it is {size:,} bytes, but its header implies {needed:,} bytes; the "
            "download or copy stopped early. Re-download or re-copy it")


def _parse_header(path: Path, raw: bytes) -> dict[str, dict]:
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r} has a corrupt header (not a JSON object); re-download or re-copy it")
    header.pop("__metadata__", None)
    for name, e in header.items():
        if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and _ints(e.get("shape"))
                and _ints(e.get("data_offsets")) and len(e["data_offsets"]) == 2):
            raise CheckpointError(f"{str(path)!r} has a corrupt header entry for tensor {name!r} ({e!r}); "
                                  "re-download or re-copy it")
    return header


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)


# A tensor to write: its name, dtype, shape, and a function producing it when its turn comes.
TensorSource = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_safetensors_streaming(path: str | Path, sources: list[TensorSource],
                                metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file holding one tensor in memory at a time. Returns the data bytes written."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in sources:
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, dtype, shape, produce in sources:
            t = produce()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name}: produced {t.dtype} {tuple(t.shape)}, "
                                      f"header says {dtype} {tuple(shape)}")
            fh.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            del t
        fh.flush()
        os.fsync(fh.fileno())
    return offset
