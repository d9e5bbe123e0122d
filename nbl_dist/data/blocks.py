"""Documents -> token blocks, exactly as the research code builds them (docs/method.md §8): each document
tokenized without special tokens and followed by EOS, the streams concatenated in document order and cut into
consecutive blocks of seq_len, the last partial block dropped. Block i of that stream is tokens
[i * seq_len, (i + 1) * seq_len). A run takes the first N blocks, or with a seed a seeded random choice of N.
Lazy: a document is tokenized only when the next block needs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from nbl_dist.data.sources import DataSource
from nbl_dist.errors import DataError


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies how a tokenizer cuts text into ids: its vocabulary, merges, normalisation and EOS id (not its
    class, its file names or its padding and truncation state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:  # a slow (Python) tokenizer
        spec = sorted(tokenizer.get_vocab().items())
    text = json.dumps([spec, tokenizer.eos_token_id], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _eos(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; calibration blocks put EOS after every document")
    return eos


def token_stream(documents: Iterable[str], tokenizer, need: int | None = None) -> list[int]:
    """Concatenated token ids, EOS after each document; stops early once `need` tokens are there."""
    eos = _eos(tokenizer)
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    return ids


class BlockStream:
    """The consecutive (seq_len,) int64 blocks of a document stream (docs/method.md §8), produced lazily: a
    document is tokenized only when the next block needs it. `tokens` counts the tokens read so far."""

    def __init__(self, documents: Iterable[str], tokenizer, seq_len: int):
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.tokens = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        eos = _eos(self.tokenizer)
        pending: list[int] = []  # tokens not yet cut into a block
        for doc in self.documents:
            ids = self.tokenizer(doc, add_special_tokens=False)["input_ids"]
            pending.extend(ids)
            pending.append(eos)
            self.tokens += len(ids) + 1
            start = 0
            while len(pending) - start >= self.seq_len:  # a long document gives many blocks: cut by offset
                yield torch.tensor(pending[start:start + self.seq_len], dtype=torch.long)
                start += self.seq_len
            del pending[:start]

    def too_few(self, available: int, needed: int, source: str, what: str = "",
                advice: str = "lower --samples or --seq-len, or add text") -> DataError:
        """The error for a stream that ran out after `available` blocks; `advice` names the fix."""
        return DataError(f"{source} gives {available} blocks of {self.seq_len} tokens{what} ({self.tokens} tokens), "
                         f"but {needed} are needed; {advice}")


@dataclasses.dataclass(frozen=True)
class ChosenBlocks:
    """Token blocks and where they come from: blocks[k] is block indices[k] of the data's block stream."""

    blocks: torch.Tensor  # (N, seq_len) int64
    indices: list[int]


def make_blocks(ids: list[int], seq_len: int, samples: int, seed: int | None = None,
                source: str = "the data", reserve: int = 0) -> torch.Tensor:
    """(samples, seq_len) int64 blocks: consecutive cuts, last partial block dropped; first N or seeded choice.

    reserve: blocks that must remain available beyond `samples` (held-out evaluation).
    """
    available = len(ids) // seq_len
    if available < samples + reserve:
        raise DataError(f"{source} gives {available} blocks of {seq_len} tokens ({len(ids)} tokens), "
                        f"but {samples + reserve} are needed; lower --samples or --seq-len, or add text")
    blocks = torch.tensor(ids[: available * seq_len], dtype=torch.long).view(available, seq_len)
    if seed is None:
        return blocks[:samples]
    return blocks[seeded_choice(available, samples, seed)]


def seeded_choice(available: int, samples: int, seed: int) -> list[int]:
    """The block indices a seed chooses: the first `samples` of a seeded permutation of all `available`."""
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return order[:samples].tolist()


def choose_blocks(source: DataSource, tokenizer, samples: int, seq_len: int,
                  seed: int | None = None) -> ChosenBlocks:
    """The run's blocks: the first `samples` of the block stream (reading only the documents they need), or with
    a seed a uniform seeded choice among all of its blocks (which tokenizes the whole data once).

    Args:
        source: --data and how to read it.
        tokenizer: the model's tokenizer.
        samples: blocks wanted.
        seq_len: tokens per block.
        seed: None for the first blocks; else the seed of the choice.
    Returns:
        The blocks (samples, seq_len) and their indices in the block stream.
    """
    where = f"--data {source.path!r}"
    if seed is not None and source.is_hub:
        raise DataError(f"--seed chooses among every block of the data, and {where} is a hub dataset read as a "
                        "stream (possibly endless): drop --seed to take its first blocks, or save a slice of it "
                        "locally (Dataset.save_to_disk) and pass that folder")
    stream = BlockStream(source.documents(), tokenizer, seq_len)
    blocks = list(itertools.islice(stream, samples) if seed is None else stream)
    if len(blocks) < samples:
        raise stream.too_few(len(blocks), samples, where)
    indices = list(range(samples)) if seed is None else seeded_choice(len(blocks), samples, seed)
    return ChosenBlocks(torch.stack([blocks[i] for i in indices]), indices)


def load_blocks(path: str | Path, tokenizer, samples: int, seq_len: int, seed: int | None = None,
                text_column: str = "text") -> torch.Tensor:
    """(samples, seq_len) token blocks of --data: the first ones, or a seeded choice (see `choose_blocks`)."""
    return choose_blocks(DataSource(str(path), text_column), tokenizer, samples, seq_len, seed).blocks
