"""The linearized model as transformers classes: NBLDecoderLayer and, per family, a config and a causal-LM class.

This file is the one definition of the linearized model, used two ways:
- nbl-dist registers these classes with transformers' Auto classes when `nbl_dist` is imported;
- write_linearized copies this file verbatim into every output folder as modeling_nbl.py, and config.json's
  auto_map names its classes, so `from_pretrained(OUT, trust_remote_code=True)` loads the output without nbl-dist.
It therefore imports only torch and transformers, never nbl_dist. docs/method.md §1 gives the math.

An output folder's config.json has model_type "nbl_<family>" (e.g. "nbl_llama"), architectures
["NBL<Family>ForCausalLM"] and an "nbl" section whose "linearized_layers" lists the layers built as NBLDecoderLayer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

NBL_MODEL_TYPE_PREFIX = "nbl_"


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


def linearized_layers(config) -> list[int]:
    """The layer indices config.nbl["linearized_layers"] names, sorted (none when the config has no "nbl"
    section): the one reading of them, for a transformers config and for config.json as a dict alike."""
    nbl = (config.get("nbl") if isinstance(config, dict) else getattr(config, "nbl", None)) or {}
    return sorted(int(i) for i in nbl.get("linearized_layers", []))


class NBLCausalLMMixin:
    """Builds the layers config.nbl lists as NBLDecoderLayers, keeping their post-attention norm and MLP.

    The swap happens in post_init, which the family's causal-LM __init__ calls last: weight initialisation, weight
    tying and the parallel plans then see the final modules, and from_pretrained's ordinary loading fills
    nbl_linear and finds no attention or input-norm parameters in the linearized layers.
    """

    def post_init(self):
        layers = self.model.layers
        for i in linearized_layers(self.config):
            if not 0 <= i < len(layers):
                raise ValueError(f"config.json's nbl.linearized_layers names layer {i}, but the model has "
                                 f"{len(layers)} layers; the folder is damaged: write it again from the original")
            if not isinstance(layers[i], NBLDecoderLayer):
                old = layers[i]
                layers[i] = NBLDecoderLayer(self.config.hidden_size, old.post_attention_layernorm, old.mlp, i)
        super().post_init()


def _family(name: str, base_config: type, base_model: type) -> tuple[type, type]:
    """The config and causal-LM classes of one family's linearized form, e.g. NBLLlamaConfig (model_type
    "nbl_llama") and NBLLlamaForCausalLM. They are module attributes (below): auto_map names them."""
    config = type(f"NBL{name}Config", (base_config,), {
        "__doc__": f"A {name} config whose \"nbl\" section lists linearized layers.",
        "model_type": f"{NBL_MODEL_TYPE_PREFIX}{name.lower()}"})
    model = type(f"NBL{name}ForCausalLM", (NBLCausalLMMixin, base_model), {
        "__doc__": f"{base_model.__name__} with the layers config.nbl lists linearized.",
        "config_class": config, "_no_split_modules": [f"{name}DecoderLayer", "NBLDecoderLayer"]})
    return config, model


NBLLlamaConfig, NBLLlamaForCausalLM = _family("Llama", LlamaConfig, LlamaForCausalLM)
NBLMistralConfig, NBLMistralForCausalLM = _family("Mistral", MistralConfig, MistralForCausalLM)
NBLQwen2Config, NBLQwen2ForCausalLM = _family("Qwen2", Qwen2Config, Qwen2ForCausalLM)
NBLQwen3Config, NBLQwen3ForCausalLM = _family("Qwen3", Qwen3Config, Qwen3ForCausalLM)

# The source family's model_type -> (config class, causal-LM class) of its linearized form.
NBL_FAMILIES = {
    "llama": (NBLLlamaConfig, NBLLlamaForCausalLM),
    "mistral": (NBLMistralConfig, NBLMistralForCausalLM),
    "qwen2": (NBLQwen2Config, NBLQwen2ForCausalLM),
    "qwen3": (NBLQwen3Config, NBLQwen3ForCausalLM),
}


def base_model_type(model_type: str | None) -> str | None:
    """The source family of a model_type: "nbl_llama" -> "llama"; any other model_type is returned as it is."""
    if model_type and model_type.startswith(NBL_MODEL_TYPE_PREFIX):
        base = model_type[len(NBL_MODEL_TYPE_PREFIX):]
        if base in NBL_FAMILIES:
            return base
    return model_type
