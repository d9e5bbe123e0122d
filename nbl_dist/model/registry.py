"""transformers' Auto classes told about the linearized model classes (modeling_nbl.py): `import nbl_dist` and
the vLLM plugin register them, so that AutoConfig / AutoModelForCausalLM load "nbl_<family>" folders."""

from __future__ import annotations

from nbl_dist.model.modeling_nbl import NBL_FAMILIES


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
