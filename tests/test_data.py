"""Token blocks follow docs/method.md §8 exactly; every bad input gives its clear error."""

import json
import time

import pytest
import torch

from nbl_dist.data import iter_documents, load_blocks, make_blocks, token_stream
from nbl_dist.errors import DataError

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
