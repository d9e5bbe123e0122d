"""Synthetic models and tokenizers built from configs alone (tests, benchmarks, scaling studies; no model hub)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# What decides a checkpoint's tensors' shapes: a saved model with the same values can be reused.
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def tiny_config(family: str = "llama", *, hidden_size: int = 32, num_hidden_layers: int = 4,
                num_attention_heads: int = 4, num_key_value_heads: int = 2, intermediate_size: int = 64,
                vocab_size: int = 320, max_position_embeddings: int = 512, **overrides):
    """A small config of one of the supported families (random weights come from the model's own init)."""
    from transformers import AutoConfig

    kwargs = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                  num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                  intermediate_size=intermediate_size, vocab_size=vocab_size,
                  max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen3":
        kwargs["head_dim"] = hidden_size // num_attention_heads
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def llama_like(hidden: int, layers: int, *, intermediate: int | None = None, heads: int | None = None,
               kv_heads: int | None = None, vocab_size: int = 32000, max_position_embeddings: int = 4096):
    """A Llama config shaped like the real ones at hidden size `hidden` (benchmarks and scaling studies):
    MLP 4 d wide, 64-wide heads, grouped-query attention with half as many key/value heads, a 32k vocabulary."""
    return tiny_config("llama", hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads or max(1, hidden // 64),
                       num_key_value_heads=kv_heads or max(1, hidden // 128), vocab_size=vocab_size,
                       max_position_embeddings=max_position_embeddings)


def random_model(config, dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_model(model, out_dir: str | Path, tokenizer=None, max_shard_size: str | int = "5GB") -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def train_tokenizer(texts: list[str], vocab_size: int = 320, eos_token: str = "</s>"):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos_token, pad_token="<pad>")


def write_random_checkpoint(config, out_dir: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0,
                            std: float = 0.02, tokenizer=None) -> Path:
    """A random checkpoint of any size, written one tensor at a time (never the whole model in memory).

    Shapes come from the meta-device model; linear weights are N(0, std^2), norm weights 1 (as a real model's
    init), so activations stay finite through many layers.
    """
    from nbl_dist.model.arch import adapter_for, meta_model
    from nbl_dist.model.safetensors_io import write_safetensors_streaming

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = meta_model(config)
    tied = {adapter_for(config).lm_head_key} if config.tie_word_embeddings else set()
    gen = torch.Generator().manual_seed(seed)

    def produce(name, shape):
        def make():
            if name.endswith("norm.weight"):
                return torch.ones(shape, dtype=dtype)
            return (torch.randn(shape, generator=gen) * std).to(dtype)
        return make

    sources = [(n, dtype, tuple(p.shape), produce(n, tuple(p.shape)))
               for n, p in model.state_dict().items() if n not in tied]
    write_safetensors_streaming(out_dir / "model.safetensors", sources)
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def cached_random_checkpoint(config, out_dir: str | Path) -> tuple[Path, bool]:
    """A random checkpoint of `config` in out_dir, written only if out_dir does not already hold one of the same
    shapes (benchmarks and studies write models of several GB once and reuse them).

    Returns (out_dir, whether it was written now)."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists():
        old = type(config).from_pretrained(out_dir)  # defaults filled in: config.json omits them
        if all(getattr(old, k, None) == getattr(config, k, None) for k in SHAPE_KEYS):
            return out_dir, False
    return write_random_checkpoint(config, out_dir), True
