"""The `vllm.general_plugins` entry point: with nbl-dist installed beside vLLM, `vllm serve OUT` and `LLM(model=OUT)`
serve an nbl-dist output folder as it is.

vLLM calls `register` in every process it starts (front end, engine core, workers; they start with `spawn`, so a
registration inside a user's script would not reach them: it has to be an installed entry point). It registers the
nbl_<family> configs with transformers' AutoConfig (vLLM parses config.json with it) and the NBL<Family>ForCausalLM
architectures with vLLM's ModelRegistry, lazily, as "module:Class" strings: the model classes (vllm_models.py) are
imported only when a folder names them. It also puts a float32 W4A16 kernel in front of vLLM's CPU ones
(wna16_float32.py): vLLM's CPU build has none, so a quantized folder would fail in float32 at the first request.
Safe to call any number of times.
"""

from __future__ import annotations

import logging

from nbl_dist.model.modeling_nbl import NBL_FAMILIES, linearized_layers

MODELS_MODULE = "nbl_dist.serving.vllm_models"
ARCHITECTURES = tuple(model_cls.__name__ for _, model_cls in NBL_FAMILIES.values())
log = logging.getLogger(__name__)


def register_float32_wna16() -> None:
    """The float32 W4A16 kernel (CPU only; vLLM's CPU build has none), in front of vLLM's CPU kernels."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from nbl_dist.serving.wna16_float32 import register

        register()


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from nbl_dist.model.registry import register_auto_classes

    register_auto_classes()
    register_float32_wna16()
    supported = ModelRegistry.get_supported_archs()
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
        MODELS_CONFIG_MAP.setdefault(arch, AttentionFreeWhenFullyLinearized)


class AttentionFreeWhenFullyLinearized:
    """vLLM's per-architecture config hook (the VerifyAndUpdateConfig interface of vllm.model_executor.models.config).

    A folder with every layer linearized has no attention module at all, so vLLM allocates no KV cache; prefix
    caching, on by default, would then manage no cache group and the engine would fail to start. It is switched
    off, as vLLM does for its other instances without a KV cache. Nothing changes for any other folder.
    """

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        config = vllm_config.model_config.hf_config
        if len(linearized_layers(config)) == config.num_hidden_layers and vllm_config.cache_config.enable_prefix_caching:
            log.info("Disabling prefix caching: every layer of this nbl-dist model is linearized, so it has no "
                     "attention and no KV cache for prefix caching to reuse.")
            vllm_config.cache_config.enable_prefix_caching = False

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
