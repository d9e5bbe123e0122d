"""Token blocks follow docs/method.md §8 exactly; every bad input gives its clear error."""

import json
import re
import time

import pytest
import torch

from nbl_dist.data.blocks import load_blocks, make_blocks, token_stream
from nbl_dist.data.sources import iter_documents
from nbl_dist.errors import DataError
from nbl_dist.model import synthetic

DOCS = ["To be, or not to be, that is the question.", "All the world's a stage.",
        "Now is the winter of our discontent, made glorious summer by this sun of York."]


def reference_ids(tokenizer, docs):
    ids = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def write_txt_folder(path, docs):
    path.mkdir()
    for i, d in enumerate(docs):
        (path / f"{i:02d}.txt").write_text(d)
    return path


def test_blocks_boundaries_eos_and_remainder(tokenizer, tmp_path):
    folder = write_txt_folder(tmp_path / "docs", DOCS)
    ids = reference_ids(tokenizer, DOCS)
    assert tokenizer.bos_token_id not in ids[:1]  # no BOS: special tokens are not added
    seq = 7
    n = len(ids) // seq
    blocks = load_blocks(folder, tokenizer, samples=n, seq_len=seq)
    assert blocks.shape == (n, seq)
    assert blocks.flatten().tolist() == ids[: n * seq]  # consecutive cuts, remainder dropped
    eos_positions = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
    assert len(eos_positions) == 3 and eos_positions[-1] == len(ids) - 1  # EOS after every document
    first_doc_len = len(tokenizer(DOCS[0], add_special_tokens=False)["input_ids"])
    assert ids[first_doc_len] == tokenizer.eos_token_id
    # First N blocks by default.
    assert torch.equal(load_blocks(folder, tokenizer, samples=2, seq_len=seq), blocks[:2])


def test_seeded_choice_reproducible(tokenizer):
    ids = list(range(1000))
    a = make_blocks(ids, 10, 5, seed=3)
    b = make_blocks(ids, 10, 5, seed=3)
    c = make_blocks(ids, 10, 5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, make_blocks(ids, 10, 5))
    for row in a:  # each chosen block is one of the consecutive cuts
        assert row[0] % 10 == 0 and row.tolist() == list(range(int(row[0]), int(row[0]) + 10))


def test_jsonl_and_parquet_with_text_column(tokenizer, tmp_path):
    rows = [{"body": d, "id": i} for i, d in enumerate(DOCS)]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    assert list(iter_documents(jl, "body")) == DOCS
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert list(iter_documents(tmp_path / "d.parquet", "body")) == DOCS
    ids = token_stream(iter_documents(jl, "body"), tokenizer)
    assert ids == reference_ids(tokenizer, DOCS)


def test_bad_inputs_have_clear_errors(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(tmp_path / "nope.txt"))
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"body": "x"}))
    with pytest.raises(DataError, match=r"no column 'text'.*\['body'\].*--text-column"):
        list(iter_documents(jl, "text"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        list(iter_documents(empty))
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_blocks(empty, tokenizer, samples=1, seq_len=16)
    folder = write_txt_folder(tmp_path / "short", DOCS)
    n_tokens = len(reference_ids(tokenizer, DOCS))
    with pytest.raises(DataError, match=rf"gives {n_tokens // 16} blocks of 16 tokens.*lower --samples"):
        load_blocks(folder, tokenizer, samples=100, seq_len=16)


def test_hub_name_offline_fails_fast(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="offline"):
        list(iter_documents("allenai/c4"))
    assert time.perf_counter() - t0 < 5


# Every way the data can be empty, unreadable or of the wrong shape: one DataError naming the file.

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


class CountingTokenizer:
    """Wraps a tokenizer and counts the documents tokenized (to show an error came before any of that work)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.tokenizer(text, **kwargs)


def test_empty_jsonl_holds_no_text(tokenizer, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    with pytest.raises(DataError, match=rf"--data '{re.escape(str(f))}' holds no text: the file is empty"):
        load_blocks(f, tokenizer, samples=1, seq_len=8)


def test_jsonl_malformed_line_names_the_line(tmp_path):
    rows = [json.dumps({"text": d}) for d in DOCS]
    f = write_lines(tmp_path / "d.jsonl", rows[:2] + ['{"text": "cut off', rows[2]])
    with pytest.raises(DataError, match=rf"'{re.escape(str(f))}' line 3 is not valid JSON \(Unterminated string"
                                        r".*must be one JSON object"):
        list(iter_documents(f))


def test_jsonl_without_the_text_column_lists_its_columns(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)])
    with pytest.raises(DataError, match=rf"'{re.escape(str(f))}' has no column 'text'; its columns are "
                                        r"\['body', 'id'\]\. Pass --text-column NAME"):
        list(iter_documents(f, "text"))


@pytest.mark.parametrize("value, kind", [(42, "number"), (["a", "b"], "list"), ({"t": "a"}, "object"),
                                         (True, "boolean")])
def test_jsonl_text_that_is_not_a_string(tmp_path, value, kind):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": DOCS[0]}), json.dumps({"text": value})])
    with pytest.raises(DataError, match=rf"'{re.escape(str(f))}' line 2: column 'text' holds a {kind} .*not text"):
        list(iter_documents(f))


def test_null_and_empty_texts_are_skipped(tmp_path):
    rows = [{"text": DOCS[0]}, {"text": None}, {"text": ""}, {"other": 1}, {"text": DOCS[1]}]
    f = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    assert list(iter_documents(f)) == DOCS[:2]


def test_json_single_object_is_not_records(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps({"data": [{"text": d} for d in DOCS], "version": 1}))
    with pytest.raises(DataError, match=rf"'{re.escape(str(f))}' holds a single JSON object \(keys "
                                        r"\['data', 'version'\]\), not records.*under 'data'"):
        list(iter_documents(f))
    f.write_text(json.dumps({"text": DOCS[0]}))
    with pytest.raises(DataError, match=r"single JSON object.*name a file of one record \.jsonl"):
        list(iter_documents(f))
    f.write_text('"just a string"')
    with pytest.raises(DataError, match=r"holds a JSON string, not records"):
        list(iter_documents(f))


def test_json_list_of_records_and_json_lines(tmp_path):
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"text": d} for d in DOCS]))
    lines = write_lines(tmp_path / "lines.json", [json.dumps({"text": d}) for d in DOCS])
    assert list(iter_documents(records)) == DOCS == list(iter_documents(lines))
    records.write_text(json.dumps([{"text": DOCS[0]}, "loose string"]))
    with pytest.raises(DataError, match=r"record 1 is a JSON string, not an object"):
        list(iter_documents(records))


def test_parquet_that_is_not_parquet_or_not_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match=rf"'{re.escape(str(f))}' is not a Parquet file \(.*magic bytes"):
        list(iter_documents(f))
    pq.write_table(pa.Table.from_pylist([{"text": i} for i in range(3)]), f)
    with pytest.raises(DataError, match=r"column 'text' holds int64 values, not text"):
        list(iter_documents(f))
    pq.write_table(pa.Table.from_pylist([{"body": d} for d in DOCS]), f)
    with pytest.raises(DataError, match=r"has no column 'text'; its columns are \['body'\]"):
        list(iter_documents(f))


def test_txt_that_is_not_utf8_names_the_byte(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Good start, then café".encode("latin-1"))
    offset = len("Good start, then caf")
    with pytest.raises(DataError, match=rf"'{re.escape(str(f))}' is not UTF-8 text: byte {offset} \(e9.*iconv"):
        list(iter_documents(f))


def test_txt_newlines_and_bom_read_as_before(tmp_path):
    f = tmp_path / "d.txt"
    f.write_bytes("\ufeffline one\r\nline two\rline three\n".encode("utf-8"))
    assert list(iter_documents(f)) == [f.read_text(encoding="utf-8")] == ["\ufeffline one\nline two\nline three\n"]


def test_no_usable_files(tmp_path):
    folder = tmp_path / "sheets"
    folder.mkdir()
    (folder / "a.tsv").write_text("text\nhello\n")
    (folder / "b.md").write_text("# hello\n")
    with pytest.raises(DataError, match=rf"'{re.escape(str(folder))}' holds no \.txt, \.jsonl, \.jsonl\.gz, \.json, "
                                        r"\.csv or \.parquet files \(only \.md, \.tsv files\)"):
        list(iter_documents(folder))
    with pytest.raises(DataError, match=r"'.*a\.tsv' is a \.tsv file; nbl-dist reads \.txt, \.jsonl"):
        list(iter_documents(folder / "a.tsv"))


def test_folder_of_empty_files_holds_no_text(tokenizer, tmp_path):
    folder = tmp_path / "empties"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b"")
    (folder / "b.parquet").write_bytes(b"")
    (folder / "c.txt").write_text(" \n\n")
    write_lines(folder / "d.jsonl", [json.dumps({"text": None}), json.dumps({"text": ""})])
    with pytest.raises(DataError, match=rf"--data '{re.escape(str(folder))}' holds no text: its 4 data files are "
                                        "empty or hold only blank or null texts"):
        load_blocks(folder, tokenizer, samples=1, seq_len=8)
    (folder / "e.txt").write_text(DOCS[0])  # one real document among the empty files is enough
    assert list(iter_documents(folder)) == [DOCS[0]]


def test_bad_file_in_folder_fails_before_tokenizing(tokenizer, tmp_path):
    folder = write_txt_folder(tmp_path / "docs", DOCS)
    write_lines(folder / "zz.jsonl", ['{"body": "no text column here"}'])
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(DataError, match=r"zz\.jsonl' has no column 'text'"):
        load_blocks(folder, counting, samples=1, seq_len=4)
    assert counting.calls == 0


# Data as users hold it: .csv, .jsonl.gz, save_to_disk folders, hub names (with config and split), read lazily.

def test_csv_rows_with_quotes_commas_and_line_breaks(tmp_path):
    import csv

    docs = ['He said "to be", then left.', "one, two, three", "a line\nand another", DOCS[0]]
    f = tmp_path / "d.csv"
    with open(f, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "body"])
        writer.writerows([[i, d] for i, d in enumerate(docs)] + [[9, ""]])  # an empty cell is skipped
    assert list(iter_documents(f, "body")) == docs
    with pytest.raises(DataError, match=r"has no column 'text'; its header row names \['id', 'body'\]"):
        list(iter_documents(f))
    f.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"is not UTF-8 text.*iconv"):
        list(iter_documents(f))


def test_jsonl_gz_is_decompressed_as_read(tokenizer, tmp_path):
    import gzip

    f = tmp_path / "d.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert list(iter_documents(f)) == DOCS
    assert token_stream(iter_documents(tmp_path), tokenizer) == reference_ids(tokenizer, DOCS)  # found in a folder
    f.write_bytes(f.read_bytes()[:-12])  # cut off
    with pytest.raises(DataError, match=r"is not a readable gzip file"):
        list(iter_documents(f))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"body": DOCS, "n": [1, 2, 3]}).save_to_disk(tmp_path / "ds")
    assert list(iter_documents(tmp_path / "ds", "body")) == DOCS
    with pytest.raises(DataError, match=r"column 'n' holds .*int64.* not text"):
        list(iter_documents(tmp_path / "ds", "n"))
    splits = DatasetDict({"train": Dataset.from_dict({"text": DOCS[:2]}),
                          "validation": Dataset.from_dict({"text": DOCS[2:]})})
    splits.save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"has the splits \['train', 'validation'\]; choose one with --data-split"):
        iter_documents(tmp_path / "dd")
    assert list(iter_documents(tmp_path / "dd", split="validation")) == DOCS[2:]
    with pytest.raises(DataError, match=r"--data-split 'test' is not one"):
        iter_documents(tmp_path / "dd", split="test")
    DatasetDict({"train": Dataset.from_dict({"text": DOCS})}).save_to_disk(tmp_path / "one")
    assert list(iter_documents(tmp_path / "one")) == DOCS  # the only split


def test_hub_options_on_local_data_are_refused(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": d}) for d in DOCS])
    with pytest.raises(DataError, match=r"--data-config names a configuration of a hub dataset.*drop --data-config"):
        iter_documents(f, config="en")
    with pytest.raises(DataError, match=r"has no splits: drop --data-split"):
        iter_documents(f, split="train")


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answered from memory (the hub is out of reach); records what it was asked."""
    import datasets

    asked = []

    def load_dataset(name, config=None, split=None, streaming=False):
        asked.append((name, config, split, streaming))
        parts = {"train": datasets.Dataset.from_dict({"text": DOCS[:1]}).to_iterable_dataset(),
                 "validation": datasets.Dataset.from_dict({"text": DOCS[1:]}).to_iterable_dataset()}
        return parts[split] if split else datasets.IterableDatasetDict(parts)

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def test_hub_name_streams_with_config_and_split(fake_hub, tokenizer):
    from nbl_dist.data.blocks import choose_blocks
    from nbl_dist.data.sources import DataSource

    assert list(iter_documents("owner/corpus", config="en", split="validation")) == DOCS[1:]
    assert fake_hub == [("owner/corpus", "en", "validation", True)]
    with pytest.raises(DataError, match=r"has the splits \['train', 'validation'\]; choose one with --data-split"):
        iter_documents("owner/corpus")
    with pytest.raises(DataError, match=r"--seed .* hub dataset read as a stream"):
        choose_blocks(DataSource("owner/corpus", split="train"), tokenizer, 1, 4, seed=0)


@pytest.mark.parametrize("path", ["data/train.jsonl", "corpus/part-1/", "./owner/name", "missing", "a/b/c",
                                  "owner/name.parquet"])
def test_missing_local_path_is_never_sent_to_the_hub(fake_hub, path):
    with pytest.raises(DataError, match=rf"--data '{re.escape(path)}' does not exist \(no such file or folder\)"):
        iter_documents(path)
    assert fake_hub == []


def test_fingerprints_follow_content_not_location(tokenizer, tmp_path):
    from nbl_dist.data.blocks import tokenizer_fingerprint
    from nbl_dist.data.sources import DataSource

    a = write_lines(tmp_path / "a.jsonl", [json.dumps({"text": d}) for d in DOCS])
    (tmp_path / "moved").mkdir()
    b = tmp_path / "moved" / "b.jsonl"
    b.write_bytes(a.read_bytes())
    assert DataSource(str(a)).fingerprint() == DataSource(str(b)).fingerprint()
    assert DataSource(str(a)).fingerprint() != DataSource(str(a), text_column="body").fingerprint()
    b.write_bytes(a.read_bytes().replace(b"To be", b"To Be"))  # same size, one byte differs
    assert DataSource(str(a)).fingerprint() != DataSource(str(b)).fingerprint()
    tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "tok")) == tokenizer_fingerprint(tokenizer)
    other = synthetic.train_tokenizer(DOCS * 20, vocab_size=300)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


def test_large_jsonl_is_read_only_as_far_as_the_blocks_need(tokenizer, tmp_path):
    """8 blocks from a 100 MB .jsonl: exactly the documents they need are tokenized, and a tiny part of the file
    is read (counted by the kernel: the process's read bytes), fingerprint included."""
    import psutil

    from nbl_dist.data.blocks import choose_blocks
    from nbl_dist.data.sources import DataSource

    words = " ".join(DOCS).split()
    filler = " ".join(words[i % len(words)] for i in range(250))  # about 1 KB per document
    f = tmp_path / "big.jsonl"
    with open(f, "w") as fh:
        for start in range(0, 100_000, 10_000):
            fh.write("".join(json.dumps({"text": f"{i} {filler}"}) + "\n" for i in range(start, start + 10_000)))
    assert f.stat().st_size > 100e6
    seq, n = 256, 8
    needed, ids = 0, []
    while len(ids) < n * seq:  # the reference: documents tokenized one at a time until 8 blocks are full
        ids += tokenizer(f"{needed} {filler}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        needed += 1
    counting = CountingTokenizer(tokenizer)
    io = psutil.Process().io_counters
    before = io().read_chars
    chosen = choose_blocks(DataSource(str(f)), counting, n, seq)
    fingerprint = DataSource(str(f)).fingerprint()
    read = io().read_chars - before
    assert counting.calls == needed < 100
    assert chosen.blocks.flatten().tolist() == ids[: n * seq] and chosen.indices == list(range(n))
    assert len(fingerprint) == 32 and read < 2**20  # below 1% of the file, fingerprint included
