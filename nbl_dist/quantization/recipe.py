"""The llm-compressor recipe of a quantization: modifiers built from the scheme, the method, the group size and
the ignore list. Imports llmcompressor and compressed-tensors, so only the engine side (engine.py, in the
environment that has them) imports it; no quantization arithmetic of our own.

- gptq: one GPTQModifier (GPTQ's error-compensating rounding, layer by layer through the sequential pipeline).
- awq: an AWQModifier (activation-aware scales folded into the norm or linear before each balanced layer, with
  llm-compressor's default mappings: Llama's for every nbl_<family> architecture), then a QuantizationModifier
  (round-to-nearest with those scales). A linearized layer's map reads the raw residual stream, so nothing before
  it can absorb a scale: AWQ leaves it unsmoothed, and the QuantizationModifier rounds it like any other layer
  (docs/method.md §13).
"""

from __future__ import annotations

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme


def scheme_groups(scheme: str, group_size: int | None) -> dict[str, QuantizationScheme]:
    """compressed-tensors config groups: every Linear (the ignore list takes some out).

    W4A16: 4-bit symmetric integer weights, one scale per `group_size` inputs (-1: per output channel); symmetric
    because transformers 5.25 cannot load an asymmetric folder (its weight_zero_point shape), and vLLM's CPU kernel
    runs both. W8A8: llm-compressor's preset (int8 weights per channel, int8 activations per token, dynamic).
    """
    if scheme == "W8A8":
        return {"group_0": preset_name_to_scheme("W8A8", ["Linear"])}
    strategy = {"strategy": "channel"} if group_size == -1 else {"strategy": "group", "group_size": group_size}
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, **strategy)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def build_recipe(scheme: str, method: str, group_size: int | None, ignore: list[str]) -> list:
    """The modifiers oneshot applies, in order."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = scheme_groups(scheme, group_size)
    if method == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore)]
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=ignore)]
    raise ValueError(f"unknown method {method!r}")
