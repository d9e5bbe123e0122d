"""vLLM model classes of the linearized model: the NBL<Family>ForCausalLM architectures an output's config.json names.

Each is vLLM's own <Family>ForCausalLM built with a layer factory: a layer that config.json's nbl.linearized_layers
lists becomes an NBLDecoderLayer, which has no attention module, so vLLM allocates it no KV cache; every other
layer, the embedding, the final norm and the head are vLLM's own code for that family. Weights load by name
(vLLM's AutoWeightsLoader): `model.layers.{i}.nbl_linear.{weight,bias}` fill the linear map, and a folder whose
tensors do not match its config is refused by vLLM's own check.

The linear map is one ReplicatedLinear: under tensor parallelism every rank holds the whole d x d map and applies
it to the whole residual stream, which every rank already holds (vLLM replicates the stream between layers), so a
linearized layer needs no communication. A column/row-parallel pair would cut the map's FLOPs per rank by the TP
size but add an all-reduce per linearized layer and step, the collective a decode step can least afford; the price
of replicating is memory, d^2 per rank (docs/method.md §11 gives the numbers for an 8B model at TP 8).

Imports vLLM, torch, transformers and nbl_dist.modeling_nbl (torch and transformers only, the one definition of the
config's "nbl" section); never the calibration path. docs/method.md §1 and §11 give the math and the serving layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
)
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2MLP,
    Qwen2Model,
)
from vllm.model_executor.models.qwen3 import (
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    maybe_prefix,
)

from nbl_dist.model.modeling_nbl import linearized_layers

MLPBuilder = Callable[..., nn.Module]  # (config, quant_config, prefix) -> the family's MLP


class NBLDecoderLayer(nn.Module):
    """A decoder layer whose attention sub-layer is h + W h + b, followed by its own post-attention norm and MLP.

    vLLM's decoder layers pass the residual stream as two tensors, (hidden_states, residual), whose sum is the
    stream h (residual is None at the first layer, where hidden_states is the embedding), and return (MLP output,
    stream after attention) for the next layer to add. The fused add + RMSNorm then gives h_mid = h + (W h + b)
    and norm(h_mid) in one call, as the family's own layer does after its attention.
    """

    def __init__(self, config, mlp: nn.Module, quant_config, prefix: str):
        super().__init__()
        d = config.hidden_size
        self.nbl_linear = ReplicatedLinear(d, d, bias=True, quant_config=quant_config, prefix=f"{prefix}.nbl_linear")
        self.post_attention_layernorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **layer_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        stream = hidden_states if residual is None else hidden_states + residual  # (T, d): h
        update, _ = self.nbl_linear(stream)  # (T, d): W h + b
        hidden_states, residual = self.post_attention_layernorm(update, stream)  # norm(h_mid), h_mid
        return self.mlp(hidden_states), residual


class LayerFactory:
    """Builds the decoder layer at `prefix`: an NBLDecoderLayer when config.json's nbl section lists its index, else
    the family's own layer. Called by the family's model with that family's keyword arguments (Llama's and
    Mistral's pass vllm_config; Qwen's pass config, cache_config and quant_config)."""

    def __init__(self, family_layer: type[nn.Module], build_mlp: MLPBuilder):
        self.family_layer = family_layer
        self.build_mlp = build_mlp

    def __call__(self, *, prefix: str, **kwargs) -> nn.Module:
        vllm_config = kwargs.get("vllm_config")
        config = kwargs.get("config") or vllm_config.model_config.hf_config
        if extract_layer_index(prefix) not in linearized_layers(config):
            return self.family_layer(prefix=prefix, **kwargs)
        quant_config = kwargs["quant_config"] if "quant_config" in kwargs else vllm_config.quant_config
        mlp = self.build_mlp(config, quant_config, f"{prefix}.mlp")
        return NBLDecoderLayer(config, mlp, quant_config, prefix)


def llama_mlp(config, quant_config, prefix: str) -> nn.Module:
    """The MLP LlamaDecoderLayer (and MistralDecoderLayer, its subclass) builds."""
    return LlamaMLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                    hidden_act=config.hidden_act, quant_config=quant_config,
                    bias=getattr(config, "mlp_bias", False), prefix=prefix)


def qwen_mlp(config, quant_config, prefix: str) -> nn.Module:
    """The MLP Qwen2DecoderLayer and Qwen3DecoderLayer build (Qwen3MLP is Qwen2MLP)."""
    return Qwen2MLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                    hidden_act=config.hidden_act, quant_config=quant_config, prefix=prefix)


class NBLLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=LayerFactory(LlamaDecoderLayer, llama_mlp))


class NBLMistralForCausalLM(MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=LayerFactory(MistralDecoderLayer, llama_mlp))


class NBLQwen2Model(Qwen2Model):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         decoder_layer_type=LayerFactory(Qwen2DecoderLayer, qwen_mlp))


class NBLQwen3Model(Qwen3Model):
    decoder_layer_type = LayerFactory(Qwen3DecoderLayer, qwen_mlp)  # Qwen3Model passes its class attribute


def init_qwen_causal_lm(self: nn.Module, vllm_config: VllmConfig, prefix: str, model_cls: type[nn.Module]) -> None:
    """What Qwen2ForCausalLM.__init__ and Qwen3ForCausalLM.__init__ do, with the decoder built as `model_cls`: vLLM's
    Qwen causal-LM classes build their Qwen2Model / Qwen3Model inline and take no layer type (Llama's take one)."""
    nn.Module.__init__(self)
    config = vllm_config.model_config.hf_config.get_text_config()
    self.config = config
    self.vllm_config = vllm_config
    self.quant_config = vllm_config.quant_config
    self.model = model_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
    if get_pp_group().is_last_rank:
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
    else:
        self.lm_head = PPMissingLayer()
    self.logits_processor = LogitsProcessor(config.vocab_size)
    self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors


class NBLQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        init_qwen_causal_lm(self, vllm_config, prefix, NBLQwen2Model)


class NBLQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        init_qwen_causal_lm(self, vllm_config, prefix, NBLQwen3Model)
