"""What a draft trains on: the target's own greedy continuations of prompts cut from --data, and the draft's
vocabulary, the target's most frequent tokens in them (docs/method.md §14).

Prompts are blocks of --prompt-len tokens of --data (data/blocks.py: documents tokenized without special tokens, EOS
after each, cut into consecutive blocks), a seeded choice among the blocks no recorded run used (data/ledger.py: the
target's calibration and healing, an --init draft's own prompts); the draft's record lists them as
"draft_prompt_blocks" (trained on) and "draft_heldout_blocks" (its held-out accuracy), so a later draft skips them.
The target continues each prompt greedily for --continuation tokens, in vLLM where it is installed (the engine the
draft will serve in), else in transformers; a continuation that reaches EOS stops there and the rest of its row is
padding, never trained on. Plain torch; vLLM and transformers are imported where they generate.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from nbl_dist.data.ledger import heldout_blocks, usage_record
from nbl_dist.data.sources import DataSource

GENERATE_CHUNK = 64  # prompts per generate call (a progress line after each)
VLLM_MAX_SEQS = 64


@dataclasses.dataclass(frozen=True)
class DraftPrompts:
    """train (N, P) and heldout (M, P) prompt blocks, with their indices in --data's block stream."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_indices: list[int]
    heldout_indices: list[int]
    relation: str  # how --data relates to the recorded runs' (data.ledger.SAME_DATA, ...)
    excluded: int  # blocks skipped because a recorded run used them

    def record(self, source: DataSource, tokenizer, seed: int) -> dict:
        """The draft's data record (nbl_draft.json's "data"; data.ledger.USED_BLOCK_KEYS names both lists)."""
        prompt_len = self.train.shape[1]
        return usage_record(source, tokenizer, prompt_len, seed, {"draft_prompt_blocks": self.train_indices,
                                                                   "draft_heldout_blocks": self.heldout_indices})


def choose_prompts(source: DataSource, tokenizer, prompt_len: int, records: list[dict], train: int, heldout: int,
                   seed: int) -> DraftPrompts:
    """A seeded choice of train + heldout prompt blocks among the blocks of --data no recorded run used: the first
    `train` of the choice prompt the training sequences, the last `heldout` the held-out ones.

    Raises:
        DataError: too few such blocks; the message says how many there are and what to lower.
    """
    held = heldout_blocks(source, tokenizer, prompt_len, train + heldout, records,
                          advice=f"it needs {train} training prompts (the budget: --tokens or --steps times "
                                 f"--batch-size) + --heldout-samples {heldout}: lower the budget or --prompt-len, or "
                                 "add text", seed=seed)
    idx = held.indices
    return DraftPrompts(train=held.blocks[:train], heldout=held.blocks[train:], train_indices=idx[:train],
                        heldout_indices=idx[train:], relation=held.relation, excluded=held.excluded)


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Prompts and the target's continuations: ids (N, P + C), of which the first lengths[n] are real (the prompt,
    then what the target generated, EOS included); the rest of a row is padding."""

    ids: torch.Tensor  # (N, T) int64
    lengths: torch.Tensor  # (N,) int64
    prompt_len: int

    def loss_mask(self) -> torch.Tensor:
        """(N, T) bool: position t trains the draft iff the token after it is one the target generated (the target's
        next-token distribution there is the one it continued with)."""
        t = torch.arange(self.ids.shape[1]).unsqueeze(0)  # (1, T)
        return (t >= self.prompt_len - 1) & (t < self.lengths.unsqueeze(1) - 1)

    def generated_tokens(self) -> torch.Tensor:
        """The tokens the target generated, flat."""
        return self.ids[:, 1:][self.loss_mask()[:, :-1]]

    def to_dict(self) -> dict:
        return {"ids": self.ids, "lengths": self.lengths, "prompt_len": self.prompt_len}

    @classmethod
    def from_dict(cls, d: dict) -> Sequences:
        return cls(d["ids"], d["lengths"], int(d["prompt_len"]))

    def split(self, n: int) -> tuple[Sequences, Sequences]:
        """(the first n rows, the rest)."""
        return (Sequences(self.ids[:n], self.lengths[:n], self.prompt_len),
                Sequences(self.ids[n:], self.lengths[n:], self.prompt_len))


def resolve_generator(generator: str) -> str:
    """--generator auto: vLLM where it is installed, else transformers."""
    if generator != "auto":
        return generator
    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


def generate(target_dir: str | Path, prompts: torch.Tensor, new_tokens: int, eos: int, generator: str,
             dtype: str) -> Sequences:
    """The target's greedy continuations of prompts (N, P), at most new_tokens each, stopping at EOS.

    Args:
        target_dir: the target folder (an nbl-dist output loads in both engines).
        generator: "vllm" or "transformers".
        dtype: the generation dtype ("float32", ...).
    A progress line (stderr) follows each chunk of GENERATE_CHUNK prompts.
    """
    from nbl_dist.runtime.progress import Progress

    progress = Progress(prompts.shape[0] * new_tokens, label=f"generating continuations ({generator})")
    run = _vllm_chunks if generator == "vllm" else _transformers_chunks
    rows: list[list[int]] = []
    for generated in run(str(target_dir), prompts, new_tokens, eos, dtype):
        rows.extend(generated)
        progress(new_tokens * len(generated))  # slots: a continuation that stopped at EOS counts whole
    n, p = prompts.shape
    ids = torch.full((n, p + new_tokens), eos, dtype=torch.long)
    ids[:, :p] = prompts
    lengths = torch.empty(n, dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, p:p + len(row)] = torch.tensor(row, dtype=torch.long)
        lengths[k] = p + len(row)
    return Sequences(ids, lengths, p)


def _vllm_chunks(target_dir: str, prompts: torch.Tensor, new_tokens: int, eos: int, dtype: str):
    """vLLM's greedy continuations, GENERATE_CHUNK prompts at a time (lists of generated ids, EOS included)."""
    from vllm import SamplingParams, TokensPrompt

    from nbl_dist.runtime.vllm_engine import open_llm

    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    with open_llm(target_dir, dtype=dtype, max_model_len=prompts.shape[1] + new_tokens, seed=0,
                  max_num_seqs=VLLM_MAX_SEQS, enable_prefix_caching=False) as llm:
        for start in range(0, prompts.shape[0], GENERATE_CHUNK):
            chunk = prompts[start:start + GENERATE_CHUNK].tolist()
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in chunk], params, use_tqdm=False)
            yield [list(o.outputs[0].token_ids) for o in outs]


def _transformers_chunks(target_dir: str, prompts: torch.Tensor, new_tokens: int, eos: int, dtype: str):
    """transformers' greedy continuations (the target loaded whole; an nbl-dist output through load_model)."""
    from nbl_dist.artifact.loading import load_model

    model = load_model(target_dir, "auto", dtype)
    device = next(model.parameters()).device
    for start in range(0, prompts.shape[0], GENERATE_CHUNK):  # prompts of one length: a batch needs no padding
        chunk = prompts[start:start + GENERATE_CHUNK].to(device)
        with torch.no_grad():
            out = model.generate(chunk, attention_mask=torch.ones_like(chunk), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos)
        rows = []
        for row in out[:, chunk.shape[1]:].tolist():
            rows.append(row[:row.index(eos) + 1] if eos in row else row)
        yield rows


def draft_vocabulary(sequences: Sequences, vocab: int, size: int) -> tuple[torch.Tensor, float]:
    """The draft's vocabulary: the `size` tokens the target generated most often (ties: lower id first), as sorted
    target ids (size,), and the share of the generated tokens they cover."""
    tokens = sequences.generated_tokens()
    counts = torch.bincount(tokens, minlength=vocab)[:vocab]
    order = torch.sort(-counts, stable=True).indices  # most frequent first, lower id first among equals
    keep = order[:size].sort().values
    return keep, float(counts[keep].sum()) / max(1, int(counts.sum()))


def vocab_maps(draft_ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2d (vocab,) bool: the target ids the draft can propose; d2t (size,) int64: draft id k is target id
    k + d2t[k]), the speculators format's two tensors."""
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    return t2d, draft_ids - torch.arange(draft_ids.shape[0])
