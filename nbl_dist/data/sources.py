"""--data -> documents, in order (docs/method.md §8): every way users hold text.

Documents: each `.txt` file is one document (a folder of .txt files gives one per file, in sorted order);
`.jsonl` / `.jsonl.gz` / `.json` / `.csv` / `.parquet` files (or folders of them), a folder written by `datasets`'
`save_to_disk`, and a hub dataset name (streamed) give one document per row, from --text-column. Reading is lazy:
files are read row by row, so the first blocks of a large corpus (data/blocks.py) cost only the documents they hold.
A source's fingerprint identifies it without reading it whole (the ledger compares runs' data by it).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from nbl_dist.errors import DataError

TABULAR = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
SUFFIXES = (".txt", *TABULAR)
READABLE = ".txt, .jsonl, .jsonl.gz, .json, .csv or .parquet"
# Formats read row by row: opening one and reading its first record is cheap, so every file of a folder is
# checked that way before the first document is tokenized (a bad file #57 fails in a second, not an hour in).
STREAMED = (".jsonl", ".jsonl.gz", ".csv", ".parquet")
# A hub dataset id: NAME or OWNER/NAME (letters, digits, '-', '_', '.'); anything else that does not exist
# locally is a missing path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SAMPLED_BYTES = 1 << 16  # the data fingerprint reads the first and the last 64 KiB of each file


@dataclasses.dataclass(frozen=True)
class DataSource:
    """--data and the options that say how to read it: which documents, in which order.

    Attributes:
        path: a file, a folder, a `save_to_disk` folder, or a hub dataset name (OWNER/NAME).
        text_column: the field or column holding the text of tabular rows.
        config: the hub dataset's configuration (--data-config).
        split: the split of a hub dataset or of a saved DatasetDict (--data-split; default: its only split).
    """

    path: str
    text_column: str = "text"
    config: str | None = None
    split: str | None = None

    @property
    def is_hub(self) -> bool:
        """A name that is no local path but looks like a hub dataset id (a missing local path never is one)."""
        return not Path(self.path).exists() and HUB_ID.fullmatch(self.path) is not None \
            and _kind(Path(self.path)) not in SUFFIXES

    def documents(self) -> Iterator[str]:
        """The documents in order; see `iter_documents`."""
        return iter_documents(self.path, self.text_column, self.config, self.split)

    def fingerprint(self) -> str:
        """Identifies the document stream without reading it whole: the reading options, then per file (in stream
        order) its size and a hash of its first and last 64 KiB; a hub dataset by its name. Names and locations do
        not count, so a copied or moved corpus keeps its fingerprint."""
        h = hashlib.sha256(json.dumps([self.text_column, self.config, self.split]).encode())
        if self.is_hub:
            h.update(f"hub:{self.path}".encode())
        else:
            for f in self._files():
                h.update(f"{f.stat().st_size};".encode())
                h.update(_sampled_digest(f))
        return h.hexdigest()[:32]

    def to_record(self) -> dict:
        """How the run read --data, for the report and the output's "nbl" section."""
        return {"path": self.path, "text_column": self.text_column, "data_config": self.config,
                "data_split": self.split, "fingerprint": self.fingerprint()}

    def _files(self) -> list[Path]:
        p = Path(self.path)
        if not p.exists():
            raise DataError(_missing(self.path))
        if saved_dataset_kind(p):  # its Arrow and JSON files, not the cache files a later .map() may add
            return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("cache-"))
        return data_files(p)


def iter_documents(path: str | Path, text_column: str = "text", config: str | None = None,
                   split: str | None = None) -> Iterator[str]:
    """The documents of --data, in order; every way the data can be unreadable or empty is one DataError.

    A .txt file is one document; .jsonl / .jsonl.gz (one JSON object per line), .json (a list of objects, or JSON
    Lines), .csv (a header row, then one row per document) and .parquet give one document per row, from
    `text_column`, as do a `save_to_disk` folder and a hub dataset. The column is looked up in a file's first
    record (a dataset's schema); null and empty texts are skipped, any other non-string is an error. Every
    row-by-row file is opened and its first record checked before this returns; other rows as they are read.

    Args:
        path: a file, a folder (its files in sorted order, recursively), a folder written by `save_to_disk`, or a
            hub dataset name (OWNER/NAME, streamed). A local-looking path that does not exist is an error, never
            a hub name.
        text_column: the field or column holding the text of tabular rows.
        config: a hub dataset's configuration.
        split: the split of a hub dataset or a saved DatasetDict (default: its only split).
    Returns:
        An iterator of the documents; it raises DataError at its end if the data held no text at all.
    """
    source = DataSource(str(path), text_column, config, split)
    if source.is_hub:
        return _hub_documents(source)
    p = Path(path)
    if not p.exists():
        raise DataError(_missing(str(path)))
    saved = saved_dataset_kind(p)
    _check_local_options(source, saved)
    if saved:
        return _saved_documents(source, saved)
    files = data_files(p)
    for f in files:
        if _kind(f) in STREAMED:
            probe = _file_documents(f, text_column)
            next(probe, None)  # raises if the file cannot be opened or its first record is wrong
            probe.close()
    return _local_documents(files, text_column, str(path))


def _missing(path: str) -> str:
    return (f"--data {path!r} does not exist (no such file or folder); pass a {READABLE} file, a folder of them, a "
            "folder written by datasets' save_to_disk, or a hub dataset name (OWNER/NAME)")


def _check_local_options(source: DataSource, saved: str | None) -> None:
    if source.config is not None:
        raise DataError(f"--data-config names a configuration of a hub dataset; {source.path!r} is a local path: "
                        "drop --data-config")
    if source.split is not None and saved != "dict":
        raise DataError(f"--data-split chooses a split of a hub dataset or of a saved DatasetDict; {source.path!r} "
                        "has no splits: drop --data-split")


def _kind(f: Path) -> str:
    """A data file's format by its name: the suffix, or ".jsonl.gz"."""
    name = f.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else f.suffix.lower()


def data_files(p: Path) -> list[Path]:
    """The readable data files of an existing --data path: the file itself, or a folder's files in sorted order.

    Args:
        p: an existing file or folder.
    Returns:
        The .txt / .jsonl / .jsonl.gz / .json / .csv / .parquet files, at least one.
    """
    if not p.is_dir():
        if _kind(p) not in SUFFIXES:
            raise DataError(f"--data {str(p)!r} is a {p.suffix or 'suffix-less'} file; nbl-dist reads {READABLE} "
                            "files (or a folder of them)")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file())
    usable = [f for f in files if _kind(f) in SUFFIXES]
    if not usable:
        found = f"only {', '.join(sorted({f.suffix or f.name for f in files}))} files" if files else "it is empty"
        raise DataError(f"--data {str(p)!r} holds no {READABLE} files ({found})")
    return usable


def saved_dataset_kind(p: Path) -> str | None:
    """"dataset" or "dict" for a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, else None."""
    if not p.is_dir():
        return None
    if (p / "dataset_dict.json").is_file():
        return "dict"
    if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
        return "dataset"
    return None


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
    kind = _kind(f)
    if kind == ".txt":
        yield from _txt_documents(f)
    elif kind == ".parquet":
        yield from _parquet_texts(f, text_column)
    elif kind == ".csv":
        yield from _csv_texts(f, text_column)
    else:
        records = _json_records(f) if kind == ".json" else _jsonl_records(f)
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
    """(where, value) for every non-blank line of a JSON Lines file (.jsonl.gz: decompressed as it is read)."""
    for n, line in enumerate(_lines(f), 1):
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


def _lines(f: Path) -> Iterator[bytes]:
    """The lines of a file as bytes; a .gz file is decompressed as it is read, a damaged one is a DataError."""
    if _kind(f) != ".jsonl.gz":
        with open(f, "rb") as fh:
            yield from fh
        return
    try:
        with gzip.open(f, "rb") as fh:
            yield from fh
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut-off file an EOFError
        raise DataError(f"{str(f)!r} is not a readable gzip file ({e or type(e).__name__}); compress it again "
                        "(gzip FILE.jsonl) or pass it uncompressed") from None


def _csv_texts(f: Path, text_column: str) -> Iterator[str]:
    """The `text_column` cells of a CSV file with a header row (any quoting Python's csv module reads)."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a document may be longer than 128 KiB
    with open(f, newline="", encoding="utf-8-sig") as fh:  # strict UTF-8, as for .txt
        reader = csv.DictReader(fh)
        try:
            columns = reader.fieldnames or []
            if text_column not in columns:
                raise DataError(f"{str(f)!r} has no column {text_column!r}; its header row names {columns}. Pass "
                                "--text-column NAME")
            for row in reader:
                text = row.get(text_column)  # None in a row shorter than the header
                if text:
                    yield text
        except UnicodeDecodeError:
            raise DataError(f"{str(f)!r} is not UTF-8 text (near line {reader.line_num + 1}). Convert the file "
                            "(e.g. `iconv -f latin1 -t utf-8`) or leave it out of --data") from None
        except csv.Error as e:
            raise DataError(f"{str(f)!r} line {reader.line_num} is not valid CSV ({e}); quote fields that hold "
                            "line breaks or commas") from None


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


def _checked_text(value: object, f: Path | str, where: str, text_column: str) -> str | None:
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


def _hub_documents(source: DataSource) -> Iterator[str]:
    """A hub dataset's rows, streamed (nothing is downloaded whole); its split is resolved before this returns."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"--data {source.path!r} is not a local path and the hub is offline (HF_DATASETS_OFFLINE=1); "
                        "download the data and pass a local file or folder")
    from datasets import load_dataset
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = load_dataset(source.path, source.config, split=source.split, streaming=True)
    except (DatasetNotFoundError, ValueError) as e:  # an unknown name, configuration or split
        raise DataError(f"--data {source.path!r} (config {source.config}, split {source.split}) cannot be opened "
                        f"from the hub: {e}. Check the name, --data-config and --data-split") from None
    return _dataset_texts(_one_split(ds, source), source)


def _saved_documents(source: DataSource, saved: str) -> Iterator[str]:
    """The rows of a folder written by save_to_disk (memory-mapped Arrow, read batch by batch)."""
    from datasets import load_from_disk

    ds = load_from_disk(source.path)
    return _dataset_texts(_one_split(ds, source) if saved == "dict" else ds, source)


def _one_split(ds, source: DataSource):
    """A Dataset out of a (streaming) DatasetDict: --data-split, or its only split; a Dataset as it is."""
    if not hasattr(ds, "keys"):
        return ds
    splits = sorted(ds.keys())
    if source.split is None and len(splits) == 1:
        return ds[splits[0]]
    if source.split not in splits:
        choice = "choose one with --data-split" if source.split is None else f"--data-split {source.split!r} is not one"
        raise DataError(f"--data {source.path!r} has the splits {splits}; {choice}")
    return ds[source.split]


def _dataset_texts(ds, source: DataSource) -> Iterator[str]:
    """The texts of a `datasets` Dataset or IterableDataset; the column and its type are checked before this
    returns when the schema is known (a saved dataset), else on the first row (a stream)."""
    where = f"--data {source.path!r}"
    columns = ds.column_names
    if columns is not None and source.text_column not in columns:
        raise DataError(f"{where} has no column {source.text_column!r}; its columns are {columns}. Pass "
                        "--text-column NAME")
    feature = (ds.features or {}).get(source.text_column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{where}: column {source.text_column!r} holds {feature} values, not text (strings). Pass "
                        "--text-column NAME if the text is in another column")
    return _counted(_dataset_rows(ds, source), where)


def _dataset_rows(ds, source: DataSource) -> Iterator[str]:
    for n, row in enumerate(ds.select_columns([source.text_column])):
        if source.text_column not in row:  # a stream without a schema: its rows decide
            raise DataError(f"--data {source.path!r} row {n} has no column {source.text_column!r}; its columns "
                            f"are {list(row)}. Pass --text-column NAME")
        text = _checked_text(row[source.text_column], source.path, f"row {n}", source.text_column)
        if text:
            yield text


def _counted(documents: Iterator[str], where: str) -> Iterator[str]:
    """The documents, and a DataError at their end if there were none."""
    count = 0
    for doc in documents:
        count += 1
        yield doc
    if count == 0:
        raise DataError(f"{where} holds no text: no row has a non-empty text")


def _sampled_digest(f: Path) -> bytes:
    """sha256 of a file's first and last SAMPLED_BYTES (the whole file when it is smaller than both)."""
    h = hashlib.sha256()
    size = f.stat().st_size
    with open(f, "rb") as fh:
        h.update(fh.read(SAMPLED_BYTES))
        if size > 2 * SAMPLED_BYTES:
            fh.seek(size - SAMPLED_BYTES)
        h.update(fh.read(SAMPLED_BYTES))
    return h.digest()


