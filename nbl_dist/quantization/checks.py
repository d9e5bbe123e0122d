"""Every refusal of `nbl-dist quantize` that its inputs alone decide, before the tokenizer, the data or any weight
is read: config.json, the safetensors headers and the options, nothing more.

- a folder that is not a model (no folder, no config.json, no safetensors, tensors that do not match the config);
- a folder already quantized (config.json has a quantization_config);
- a family nbl-dist does not support, or a folder written by an older nbl-dist;
- a scheme that vLLM cannot run on the target device (its CPU build: W4A16 needs every quantized layer's input and
  output widths to be multiples of 32 and an even group size, or one scale per channel);
- a group size that does not divide a quantized layer's input width (a group never straddles two rows).
"""

from __future__ import annotations

import dataclasses

from nbl_dist.artifact.folder import ModelFolder
from nbl_dist.errors import CheckpointError, ConfigError
from nbl_dist.model.arch import meta_model
from nbl_dist.model.validate import FLOAT_DTYPES, load_config, read_headers

GROUP_SIZES = (128, 64, 32)  # the default group size: the largest of these that divides every input width
CPU_WIDTH = 32  # vLLM's CPU W4A16 kernel (CPUWNA16LinearKernel): input and output sizes multiples of 32
LM_HEAD = "lm_head"  # never quantized: tied to the embedding in most small models, and the most sensitive layer


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the checks decided: the folder, its transformers config, the group size and the ignore list."""

    folder: ModelFolder
    hf_config: object
    group_size: int | None  # None for W8A8 (one scale per channel); -1: one scale per output channel
    ignore: list[str]  # llm-compressor's ignore list (names, or "re:" patterns)
    widths: dict[str, tuple[int, int]]  # each kind of quantized linear layer -> (input width, output width)


def check_inputs(model: str, scheme: str, group_size: int | None, maps: str, device: str) -> Plan:
    """Check everything about --model and the options that needs no weight, in the order a user fixes them.

    Args:
        model: --model.
        scheme, group_size, maps: the options (QuantizeConfig).
        device: where the quantized model will run ("cpu" or "cuda"): on "cpu" the scheme must be one vLLM's CPU
            build runs.
    Returns:
        The Plan.
    Raises:
        CheckpointError, UnsupportedArchitectureError, ConfigError: the message names the problem and the fix.
    """
    folder = ModelFolder.open(model, "--model")
    if folder.quantization:
        method = folder.quantization.get("quant_method", "unknown")
        raise CheckpointError(f"--model {model!r} is already quantized (config.json has a quantization_config, "
                              f"method {method!r}): pass the float folder it was made from")
    adapter = folder.adapter  # UnsupportedArchitectureError for another family
    if folder.nbl and folder.config.get("model_type") == adapter.model_type:
        raise CheckpointError(f"--model {model!r} was written by an older nbl-dist (config.json's model_type is "
                              f"still {adapter.model_type!r} beside an \"nbl\" section): calibrate again to write "
                              "the current format")
    hf_config = load_config(folder.path)
    widths = quantized_widths(hf_config, len(folder.linearized_layers), maps == "quantize")
    group = check_group_size(widths, scheme, group_size)
    if device == "cpu":
        check_cpu_scheme(widths, scheme)
    check_weights(folder, hf_config)
    ignore = [LM_HEAD] + ([f"re:.*{adapter.nbl_module}$"] if maps == "keep" else [])
    return Plan(folder, hf_config, group, ignore, widths)


def quantized_widths(hf_config, linearized: int, maps: bool) -> dict[str, tuple[int, int]]:
    """(input width, output width) of each kind of linear layer that gets quantized (the head never is).

    Args:
        hf_config: the model's transformers config.
        linearized: how many layers are linearized (none kept attention when it is every layer).
        maps: whether the linearized layers' maps are quantized.
    """
    d, inter = hf_config.hidden_size, hf_config.intermediate_size
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    hd = getattr(hf_config, "head_dim", None) or d // heads
    widths = {"gate_proj/up_proj": (d, inter), "down_proj": (inter, d)}
    if linearized < hf_config.num_hidden_layers:
        widths.update({"q_proj": (d, heads * hd), "k_proj/v_proj": (d, kv * hd), "o_proj": (heads * hd, d)})
    if linearized and maps:
        widths["nbl_linear"] = (d, d)
    return widths


def check_group_size(widths: dict[str, tuple[int, int]], scheme: str, group_size: int | None) -> int | None:
    """The group size: --group-size if it divides every quantized input width, else the default rule's."""
    if scheme != "W4A16":
        return None
    inputs = sorted({i for i, _ in widths.values()})
    if group_size is None:
        fits = [g for g in GROUP_SIZES if all(i % g == 0 for i in inputs)]
        if not fits:
            raise ConfigError(f"no group size of {', '.join(map(str, GROUP_SIZES))} divides every quantized layer's "
                              f"input width ({', '.join(map(str, inputs))}): pass --group-size -1 (one scale per "
                              "output channel) or an even divisor of them all")
        return fits[0]
    if group_size == -1:
        return -1
    bad = {k: i for k, (i, _) in widths.items() if i % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        raise ConfigError(f"--group-size {group_size} does not divide the input width {width} of {name} (a group "
                          f"of weights shares one scale along a row): pass an even divisor of "
                          f"{', '.join(map(str, inputs))}, or -1 for one scale per output channel")
    return group_size


def check_cpu_scheme(widths: dict[str, tuple[int, int]], scheme: str) -> None:
    """A scheme vLLM's CPU build cannot run on these layers is refused (the quantized folder would not serve)."""
    if scheme == "W4A16":
        bad = {k: w for k, w in widths.items() if w[0] % CPU_WIDTH or w[1] % CPU_WIDTH}
        if bad:
            name, (i, o) = next(iter(bad.items()))
            raise ConfigError(f"vLLM's CPU build runs W4A16 only on linear layers whose input and output widths are "
                              f"multiples of {CPU_WIDTH}, and {name} is {i} -> {o}: this model cannot be served "
                              "4-bit on a CPU; quantize it on a GPU machine for GPUs (--device cuda), or serve it "
                              "unquantized")


def check_weights(folder: ModelFolder, hf_config) -> None:
    """Every tensor the model's config implies is stored, in a float dtype and of the implied shape (headers only)."""
    headers = read_headers(folder.path)  # CheckpointError: no safetensors, a missing shard, a damaged header
    expected = {k: tuple(t.shape) for k, t in meta_model(hf_config).state_dict().items()}
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [k for k in expected if k not in headers and not (tied and k == folder.adapter.lm_head_key)]
    if missing:
        raise CheckpointError(f"--model {str(folder.path)!r} lacks {missing[0]!r} ({len(missing)} tensor(s) its "
                              "config.json implies are missing): the folder is incomplete; copy or write it again")
    for name, shape in expected.items():
        h = headers.get(name)
        if h is None:
            continue
        if h.shape != shape:
            raise CheckpointError(f"tensor {name!r} of --model {str(folder.path)!r} has shape {list(h.shape)} but "
                                  f"config.json implies {list(shape)}: use the config.json that came with the weights")
        if h.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} of --model {str(folder.path)!r} is stored as {h.dtype}: "
                                  "quantize a float checkpoint (F32, F16, BF16)")
