"""Calibration text -> token blocks, exactly as the research code builds them (docs/method.md §8).

Documents: each `.txt` file is one document (a folder of .txt files gives one per file, in sorted order);
`.jsonl` / `.json` / `.parquet` files (or folders of them) give one document per row, from --text-column.
Each document is tokenized without special tokens and followed by EOS; the streams are concatenated in document
order and cut into consecutive blocks of seq_len; the last partial block is dropped. The first N blocks are used,
or, with a seed, a seeded random choice of N.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from nbl_dist.errors import DataError

TABULAR = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def iter_documents(path: str | Path, text_column: str = "text") -> Iterator[str]:
    p = Path(path)
    if not p.exists():
        if "/" in str(path) and not str(path).startswith((".", "/")):
            yield from _hub_documents(str(path), text_column)
            return
        raise DataError(f"--data {str(path)!r} does not exist; pass a .txt/.jsonl/.json/.parquet file or folder")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    files = [f for f in files if f.suffix in (".txt", *TABULAR)]
    if not files:
        raise DataError(f"--data {str(path)!r} holds no .txt, .jsonl, .json or .parquet files")
    for f in files:
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():  # an empty file is no document (it would add a lone EOS)
                yield text
        else:
            yield from _tabular_documents(f, text_column)


def _tabular_documents(f: Path, text_column: str) -> Iterator[str]:
    from datasets import load_dataset

    ds = load_dataset(TABULAR[f.suffix], data_files=str(f), split="train")
    if text_column not in ds.column_names:
        raise DataError(f"{str(f)!r} has no column {text_column!r}; its columns are {ds.column_names}. "
                        "Pass --text-column NAME")
    for text in ds[text_column]:
        if text:
            yield text


def _hub_documents(name: str, text_column: str) -> Iterator[str]:
    import os

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"--data {name!r} is not a local path and the hub is offline (HF_DATASETS_OFFLINE=1); "
                        "download the data and pass a local file or folder")
    from datasets import load_dataset

    ds = load_dataset(name, split="validation", streaming=True)
    for row in ds:
        yield row[text_column]


def token_stream(documents: Iterable[str], tokenizer, need: int | None = None) -> list[int]:
    """Concatenated token ids, EOS after each document; stops early once `need` tokens are there."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; calibration blocks put EOS after every document")
    ids: list[int] = []
    for doc in documents:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    return ids


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
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return blocks[order[:samples]]


def load_blocks(path: str | Path, tokenizer, samples: int, seq_len: int, seed: int | None = None,
                text_column: str = "text") -> torch.Tensor:
    docs = iter_documents(path, text_column)
    # Without a seed only the first samples * seq_len tokens are needed; a seeded choice needs them all.
    ids = token_stream(docs, tokenizer, need=samples * seq_len if seed is None else None)
    if not ids:
        raise DataError(f"--data {str(path)!r} holds no text")
    return make_blocks(ids, seq_len, samples, seed, source=f"--data {str(path)!r}")
