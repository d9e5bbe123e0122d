"""Synthetic models and tokenizers built from configs alone (tests, benchmarks, scaling studies; no model hub)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


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
