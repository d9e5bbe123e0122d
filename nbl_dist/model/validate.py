"""The checkpoint checked before any actor starts: config.json, the safetensors files and every tensor the
architecture needs, read from the config and the file headers only (no tensor data), so that a damaged or
unsuitable --model fails in seconds with one message instead of minutes later inside an actor.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from nbl_dist.errors import CheckpointError, UnsupportedArchitectureError
from nbl_dist.model.arch import ArchAdapter, adapter_for, meta_model
from nbl_dist.model.safetensors_io import INDEX_NAME, read_header, weight_map

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CONFIG_NAME = "config.json"
# The dtypes nbl-dist computes in: a layer's weights are cast to the forward dtype as they are loaded.
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# Every dtype the checkpoint reader and writer can map (extra tensors are copied to the output as they are).
KNOWN_DTYPES = (*FLOAT_DTYPES, "I64", "I32", "I16", "I8", "U8", "BOOL")


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """Where a tensor is stored and what its header says about it."""
    file: str
    dtype: str
    shape: tuple[int, ...]


def check_checkpoint(model_dir: str | Path, flag: str = "--model") -> PretrainedConfig:
    """Check that `model_dir` is a complete float safetensors checkpoint of a supported architecture.

    Reads config.json and the safetensors headers only, never tensor data: seconds even for a 70B model.

    Args:
        model_dir: the folder passed as `flag`.
        flag: the option that named it (--model for calibrate, --baseline for heal), for the messages.
    Returns:
        The model's transformers config.
    Raises:
        CheckpointError: a missing, damaged, truncated or inconsistent file or tensor (the message names it and
            says how to fix it).
        UnsupportedArchitectureError: config.json names a model_type nbl-dist does not support.
    """
    model_dir = Path(model_dir)
    weight_map(model_dir, flag)  # a folder holding safetensors weights, else the message says what it holds instead
    read_config(model_dir, flag)
    hf_config = load_config(model_dir)
    headers = read_headers(model_dir)
    check_tensors(hf_config, headers, model_dir, flag)
    return hf_config


def config_json(model_dir: Path, flag: str = "--model") -> dict:
    """config.json of a model folder as a dict: every way it can be missing or unreadable is one CheckpointError
    naming `flag` or the file, and the fix."""
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{str(model_dir)!r} has no {CONFIG_NAME}; pass {flag} the folder the model was "
                              "saved to (save_pretrained writes config.json beside the weights)")
    try:
        raw = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              "fix the file or re-download the checkpoint") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not UTF-8 text (byte {e.start}); re-download the checkpoint") \
            from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(raw).__name__}, not an object; re-download it")
    return raw


def read_config(model_dir: Path, flag: str = "--model") -> dict:
    """config.json as a dict, checked for a supported, unquantised, not yet linearized model.

    Args:
        model_dir: the checkpoint folder.
        flag: the option that named it.
    Returns:
        The parsed config.json.
    """
    path = model_dir / CONFIG_NAME
    raw = config_json(model_dir, flag)
    try:
        adapter_for(raw)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{str(path)!r}: {e}") from None
    _refuse_quantized(path, raw, flag)
    if "nbl" in raw:
        nbl = raw["nbl"] if isinstance(raw["nbl"], dict) else {}
        _refuse_linearized(f"{str(path)!r} has an \"nbl\" section", nbl.get("linearized_layers", []), flag)
    return raw


def _refuse_quantized(path: Path, raw: dict, flag: str) -> None:
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise CheckpointError(
            f"{str(path)!r} has a quantization_config (method {method!r}): the weights are quantised, and nbl-dist "
            "reads float checkpoints (F32, F16, BF16, F64). Dequantise first (load it in transformers and "
            f"save_pretrained in bfloat16), or pass the original float checkpoint as {flag}")


def _refuse_linearized(evidence: str, layers: list[int], flag: str) -> None:
    """An nbl-dist output lacks the attention of its linearized layers: it cannot be calibrated again."""
    raise CheckpointError(
        f"{evidence}: the folder is an nbl-dist output, already linearized (layers {layers} hold an nbl_linear map "
        f"instead of attention); pass the original checkpoint as {flag}")


def load_config(model_dir: Path) -> PretrainedConfig:
    """transformers' config of the checkpoint; its validation errors become one CheckpointError.

    Args:
        model_dir: the checkpoint folder (config.json already parsed by read_config).
    Returns:
        The transformers config.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:
        reason = " ".join(str(e).split()).rstrip(".")  # transformers' messages span several indented lines
        raise CheckpointError(f"{str(model_dir / CONFIG_NAME)!r} is not a valid model config: {reason}. Fix it, "
                              "or re-download the checkpoint") from None


def read_headers(model_dir: Path) -> dict[str, TensorHeader]:
    """Every tensor of the checkpoint with its file, dtype and shape, from the index and the file headers.

    Args:
        model_dir: the checkpoint folder.
    Returns:
        Tensor name -> TensorHeader; with an index, exactly the tensors it names.
    """
    index = model_dir / INDEX_NAME
    wmap = weight_map(model_dir)  # the index, or the single file's header; a clear error when neither is there
    by_file: dict[str, list[str]] = {}
    for name, fname in wmap.items():
        by_file.setdefault(fname, []).append(name)
    headers = {}
    for fname, names in sorted(by_file.items()):
        path = model_dir / fname
        if not path.is_file():
            raise CheckpointError(
                f"{str(index)!r} names the shard {fname!r} ({len(names)} tensors, e.g. {names[0]!r}), but "
                f"{str(path)!r} does not exist: the download or copy is incomplete; re-download or re-copy it")
        entries = read_header(path)
        for name in names:
            if name not in entries:
                raise CheckpointError(
                    f"{str(index)!r} says tensor {name!r} is in {fname!r}, but that file's header does not hold "
                    "it: the index and the shard come from different downloads; re-download the checkpoint")
            headers[name] = TensorHeader(fname, entries[name]["dtype"], tuple(entries[name]["shape"]))
    return headers


def check_tensors(hf_config: PretrainedConfig, headers: dict[str, TensorHeader], model_dir: Path,
                  flag: str = "--model") -> None:
    """Every tensor the architecture needs is present, stored as a float, and of the shape config.json implies.

    Args:
        hf_config: the model's config.
        headers: the checkpoint's tensors (read_headers).
        model_dir: the checkpoint folder (for messages).
    """
    adapter = adapter_for(hf_config)
    linearized = sorted({i for k in headers if (i := adapter.layer_of_key(k)) is not None
                         and k.startswith(f"{adapter.layer_key_prefix(i)}{adapter.nbl_module}.")})
    if linearized:  # an output folder whose config.json lost its "nbl" section
        _refuse_linearized(f"{str(model_dir)!r} holds nbl_linear tensors", linearized, flag)
    _check_extra_layers(hf_config, adapter, headers, model_dir)
    expected = _expected_shapes(hf_config, model_dir)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [k for k in expected if k not in headers and not (tied and k == adapter.lm_head_key)]
    if missing:
        raise CheckpointError(_missing_message(missing, adapter, model_dir, flag))
    for name in expected:
        h = headers.get(name)
        if h is not None and h.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {str(model_dir / h.file)!r} is stored as {h.dtype}; nbl-dist reads float "
                f"checkpoints ({', '.join(FLOAT_DTYPES)}): dequantise the model first (load it in transformers "
                "and save_pretrained in bfloat16)")
    for name, h in headers.items():
        if name not in expected and h.dtype not in KNOWN_DTYPES:  # copied to the output, so it must be readable
            raise CheckpointError(
                f"tensor {name!r} in {str(model_dir / h.file)!r} has dtype {h.dtype!r}, which nbl-dist cannot "
                f"read or copy; it reads float checkpoints ({', '.join(FLOAT_DTYPES)}): dequantise the model first")
    _check_shapes(expected, headers, model_dir)


def _expected_shapes(hf_config: PretrainedConfig, model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every persistent tensor of the model config.json describes (built on the meta device;
    non-persistent buffers such as the rotary inverse frequencies are not in a state_dict)."""
    try:
        model = meta_model(hf_config)
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{str(model_dir / CONFIG_NAME)!r} describes a model transformers cannot build "
                              f"({type(e).__name__}: {e}); fix it, or re-download the checkpoint") from None
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def _check_extra_layers(hf_config: PretrainedConfig, adapter: ArchAdapter, headers: dict[str, TensorHeader],
                        model_dir: Path) -> None:
    """Extra tensors are allowed, but not whole layers beyond num_hidden_layers: the calibrated model would not
    be the model in the weights."""
    n = hf_config.num_hidden_layers
    beyond = sorted({i for k in headers if (i := adapter.layer_of_key(k)) is not None and i >= n})
    if beyond:
        which = f"layer {beyond[0]}" if len(beyond) == 1 else f"layers {beyond[0]}-{beyond[-1]}"
        raise CheckpointError(
            f"the weights in {str(model_dir)!r} hold tensors of {which}, but {CONFIG_NAME} says num_hidden_layers = "
            f"{n}: config.json and the weights disagree; use the config.json that came with these weights")


def _missing_message(missing: list[str], adapter: ArchAdapter, model_dir: Path, flag: str) -> str:
    name = missing[0]
    layer = adapter.layer_of_key(name)
    where = f"layer {layer}" if layer is not None else "outside the decoder layers"
    layers = sorted({i for k in missing if (i := adapter.layer_of_key(k)) is not None})
    more = f" ({len(missing)} needed tensors are missing in all, in layers {layers})" if len(missing) > 1 else ""
    return (f"tensor {name!r} ({where}) is missing from the checkpoint in {str(model_dir)!r}{more}: the checkpoint "
            f"is partial or pruned. Re-download it, or pass the complete original checkpoint as {flag} (a pruned "
            "model also needs a config.json that describes it)")


def _check_shapes(expected: dict[str, tuple[int, ...]], headers: dict[str, TensorHeader], model_dir: Path) -> None:
    wrong = [k for k, shape in expected.items() if k in headers and headers[k].shape != shape]
    if wrong:
        name, h = wrong[0], headers[wrong[0]]
        more = f" ({len(wrong)} tensors differ in all)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"tensor {name!r} in {str(model_dir / h.file)!r} has shape {list(h.shape)}, but {CONFIG_NAME} implies "
            f"{list(expected[name])}{more}: config.json and the weights disagree; use the config.json that came "
            "with these weights")
