"""Calibration text -> token blocks, exactly as the research code builds them (docs/method.md §8).

Documents: each `.txt` file is one document (a folder of .txt files gives one per file, in sorted order);
`.jsonl` / `.json` / `.parquet` files (or folders of them) give one document per row, from --text-column.
Each document is tokenized without special tokens and followed by EOS; the streams are concatenated in document
order and cut into consecutive blocks of seq_len; the last partial block is dropped. The first N blocks are used,
or, with a seed, a seeded random choice of N.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from nbl_dist.errors import DataError

TABULAR = (".jsonl", ".json", ".parquet")
SUFFIXES = (".txt", *TABULAR)
# Formats read row by row: opening one and reading its first record is cheap, so every file of a folder is
# checked that way before the first document is tokenized (a bad file #57 fails in a second, not an hour in).
STREAMED = (".jsonl", ".parquet")


def iter_documents(path: str | Path, text_column: str = "text") -> Iterator[str]:
    """The documents of --data, in order; every way the data can be unreadable or empty is one DataError.

    A .txt file is one document; .jsonl (one JSON object per line), .json (a list of objects, or JSON Lines) and
    .parquet give one document per row, from `text_column`. The column is looked up in a file's first record;
    null and empty texts are skipped, any other non-string is an error. Every .jsonl / .parquet file is opened and
    its first record checked before this returns; other rows are checked as they are read.

    Args:
        path: a file, a folder (its files in sorted order, recursively), or a hub dataset name.
        text_column: the field or column holding the text of tabular rows.
    Returns:
        An iterator of the documents; it raises DataError at its end if the data held no text at all.
    """
    p = Path(path)
    if not p.exists():
        if "/" in str(path) and not str(path).startswith((".", "/")):
            return _hub_documents(str(path), text_column)
        raise DataError(f"--data {str(path)!r} does not exist; pass a .txt/.jsonl/.json/.parquet file or folder")
    files = data_files(p)
    for f in files:
        if f.suffix in STREAMED:
            probe = _file_documents(f, text_column)
            next(probe, None)  # raises if the file cannot be opened or its first record is wrong
            probe.close()
    return _local_documents(files, text_column, str(path))


def data_files(p: Path) -> list[Path]:
    """The readable data files of an existing --data path: the file itself, or a folder's files in sorted order.

    Args:
        p: an existing file or folder.
    Returns:
        The .txt / .jsonl / .json / .parquet files, at least one.
    """
    if not p.is_dir():
        if p.suffix not in SUFFIXES:
            raise DataError(f"--data {str(p)!r} is a {p.suffix or 'suffix-less'} file; nbl-dist reads .txt, "
                            ".jsonl, .json or .parquet files (or a folder of them)")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file())
    usable = [f for f in files if f.suffix in SUFFIXES]
    if not usable:
        found = f"only {', '.join(sorted({f.suffix or f.name for f in files}))} files" if files else "it is empty"
        raise DataError(f"--data {str(p)!r} holds no .txt, .jsonl, .json or .parquet files ({found})")
    return usable


def _local_documents(files: list[Path], text_column: str, source: str) -> Iterator[str]:
    count = 0
    for f in files:
        for doc in _file_documents(f, text_column):
            count += 1
            yield doc
    if count == 0:
        what = "the file is empty or holds" if len(files) == 1 else f"its {len(files)} data files are empty or hold"
        raise DataError(f"--data {source!r} holds no text: {what} only blank or null texts")


def _file_documents(f: Path, text_column: str) -> Iterator[str]:
    if f.stat().st_size == 0:  # an empty file holds no document, whatever its format (as a blank .txt)
        return
    if f.suffix == ".txt":
        yield from _txt_documents(f)
    elif f.suffix == ".parquet":
        yield from _parquet_texts(f, text_column)
    else:
        records = _jsonl_records(f) if f.suffix == ".jsonl" else _json_records(f)
        yield from _record_texts(records, f, text_column)


def _txt_documents(f: Path) -> Iterator[str]:
    # Strict UTF-8: decoding with errors="replace" would silently turn a Latin-1 or UTF-16 corpus into U+FFFD
    # characters, and the statistics would come from tokens that are not the text. Refuse, and say where.
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(_not_utf8(f, f.read_bytes())) from None
    if text.strip():  # an empty file is no document (it would add a lone EOS)
        yield text


def _not_utf8(f: Path, raw: bytes, where: str = "") -> str:
    try:
        raw.decode("utf-8-sig")
        offset = 0
    except UnicodeDecodeError as e:
        offset = e.start
    of_line = " of the line" if where else ""
    return (f"{str(f)!r}{where} is not UTF-8 text: byte {offset}{of_line} ({raw[offset:offset + 4].hex(' ')}...) "
            "is not valid UTF-8. Convert the file (e.g. `iconv -f latin1 -t utf-8`) or leave it out of --data")


def _jsonl_records(f: Path) -> Iterator[tuple[str, object]]:
    """(where, value) for every non-blank line of a JSON Lines file."""
    with open(f, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                # Without its line break, so that the error's column counts within this line.
                value = json.loads(line.rstrip(b"\r\n").decode("utf-8-sig" if n == 1 else "utf-8"))
            except UnicodeDecodeError:
                raise DataError(_not_utf8(f, line, f" line {n}")) from None
            except json.JSONDecodeError as e:
                raise DataError(f"{str(f)!r} line {n} is not valid JSON ({e.msg} at column {e.colno}); each line "
                                "of a .jsonl file must be one JSON object") from None
            yield f"line {n}", value


def _json_records(f: Path) -> Iterator[tuple[str, object]]:
    """(where, value) for every record of a .json file: a list of objects, or JSON Lines under a .json name."""
    raw = f.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(_not_utf8(f, raw)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # several objects: JSON Lines
            yield from _jsonl_records(f)
            return
        raise DataError(f"{str(f)!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        nested = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        hint = f"; its records may be the list under {nested[0]!r}: extract them" if nested else ""
        raise DataError(f"{str(f)!r} holds a single JSON object (keys {list(data)[:10]}), not records: a .json file "
                        "must be a list of objects [{...}, ...] or JSON Lines (one object per line; name a file of "
                        f"one record .jsonl){hint}")
    if not isinstance(data, list):
        raise DataError(f"{str(f)!r} holds a JSON {_json_type(data)}, not records: a .json file must be a list of "
                        "objects [{...}, ...] or JSON Lines (one object per line)")
    for i, value in enumerate(data):
        yield f"record {i}", value


def _record_texts(records: Iterator[tuple[str, object]], f: Path, text_column: str) -> Iterator[str]:
    """The texts of JSON records; the first record decides whether the column exists."""
    first = True
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{str(f)!r} {where} is a JSON {_json_type(record)}, not an object: each record must "
                            f"be an object with a {text_column!r} field")
        if first and text_column not in record:
            raise DataError(f"{str(f)!r} has no column {text_column!r}; its columns are {list(record)}. "
                            "Pass --text-column NAME")
        first = False
        text = _checked_text(record.get(text_column), f, where, text_column)
        if text:
            yield text


def _checked_text(value: object, f: Path, where: str, text_column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{str(f)!r} {where}: column {text_column!r} holds a {_json_type(value)} "
                    f"({repr(value)[:40]}), not text; every row's {text_column!r} must be a string (null rows are "
                    "skipped). Pass --text-column NAME if the text is in another column")


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _parquet_texts(f: Path, text_column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{str(f)!r} is not a Parquet file ({e}); re-create it, or give it its format's suffix") \
            from None
    names = pf.schema_arrow.names
    if text_column not in names:
        raise DataError(f"{str(f)!r} has no column {text_column!r}; its columns are {names}. Pass --text-column NAME")
    kind = pf.schema_arrow.field(text_column).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)
            or pa.types.is_string_view(value_kind)):
        raise DataError(f"{str(f)!r}: column {text_column!r} holds {kind} values, not text (strings). Pass "
                        "--text-column NAME if the text is in another column")
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[text_column]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{str(f)!r} could not be read ({e}): the file is damaged; re-create it") from None


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
