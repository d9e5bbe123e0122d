"""Architecture adapters: where a decoder-only model keeps its layers, attention, norms and head.

Llama, Mistral, Qwen2 and Qwen3 (transformers 5.x) share one layout: `model.model.layers[i]` with `self_attn`
(called with keyword arguments only, returns (output, weights)), `input_layernorm`, `post_attention_layernorm`
and `mlp`; `model.model.embed_tokens`, `model.model.rotary_emb`, `model.model.norm`, `model.lm_head`. An adapter
names those places once, as module paths and as checkpoint keys, so no other module spells them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from nbl_dist.errors import UnsupportedArchitectureError
from nbl_dist.model.modeling_nbl import base_model_type

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class ArchAdapter:
    model_type: str
    layer_prefix: str = "model.layers."
    embed_key: str = "model.embed_tokens.weight"
    final_norm_key: str = "model.norm.weight"
    lm_head_key: str = "lm_head.weight"
    # Parameter-name prefixes (inside a decoder layer) that linearization removes.
    replaced_prefixes: tuple[str, ...] = ("self_attn.", "input_layernorm.")
    # Name of the linear map a linearized layer holds instead (docs/method.md §1).
    nbl_module: str = "nbl_linear"

    # ---------------------------------------------------------------- modules
    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def embed_tokens(decoder: nn.Module) -> nn.Module:
        return decoder.embed_tokens

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        return layer.self_attn

    @staticmethod
    def kept_blocks(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(post-attention norm, MLP): what a linearized layer keeps of the original."""
        return layer.post_attention_layernorm, layer.mlp

    def rebuild_rotary(self, decoder: nn.Module, config, device: str | torch.device) -> nn.Module:
        """Replace the decoder's rotary embedding by a real one on `device` (see build_rotary); returns it."""
        decoder.rotary_emb = build_rotary(type(decoder.rotary_emb), config, device)
        return decoder.rotary_emb

    # ---------------------------------------------------------------- checkpoint keys
    def layer_key_prefix(self, i: int) -> str:
        return f"{self.layer_prefix}{i}."

    def layer_of_key(self, key: str) -> int | None:
        """Index of the decoder layer a checkpoint key belongs to, or None for embedding, norm, head."""
        if not key.startswith(self.layer_prefix):
            return None
        return int(key[len(self.layer_prefix):].split(".", 1)[0])

    def is_replaced_key(self, key: str, linearized: set[int]) -> bool:
        """True for the tensors a linearized layer no longer has (its attention and input norm)."""
        i = self.layer_of_key(key)
        if i is None or i not in linearized:
            return False
        rest = key[len(self.layer_key_prefix(i)):]
        return rest.startswith(self.replaced_prefixes)

    def nbl_keys(self, i: int) -> tuple[str, str]:
        """Checkpoint keys of layer i's linear map: (weight (d, d), bias (d,))."""
        prefix = f"{self.layer_key_prefix(i)}{self.nbl_module}."
        return prefix + "weight", prefix + "bias"

    def head_key(self, config) -> str:
        """The key holding the output head's weight: the embedding's when the two are tied."""
        return self.embed_key if getattr(config, "tie_word_embeddings", False) else self.lm_head_key


def adapter_for(config) -> ArchAdapter:
    """The adapter for a model's config (a transformers config, or config.json as a dict): the one place a family
    adapter is built from a config; a clear error for any other family.

    An nbl-dist output ("nbl_llama", ...) keeps its family's layout, so it gets that family's adapter.
    """
    raw = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    model_type = base_model_type(raw)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; nbl-dist supports {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(decoder-only, pre-norm). Check config.json's \"model_type\" or use one of those families.")
    return ArchAdapter(model_type=model_type)


def meta_model(config) -> nn.Module:
    """The model built on the meta device from its config alone: shapes and parameter counts, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def build_rotary(rotary_cls: type, config, device: str | torch.device) -> nn.Module:
    """A real rotary embedding (its inverse frequencies are non-persistent buffers no checkpoint holds)."""
    with torch.device(device):
        return rotary_cls(config=config)


def layer_param_counts(config) -> tuple[list[int], int, int]:
    """(params of each decoder layer, params of the embedding, total params) from the meta-device model."""
    model = meta_model(config)
    adapter = adapter_for(config)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in adapter.layers(model)]
    embed = adapter.decoder(model).embed_tokens.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    return per_layer, embed, total
