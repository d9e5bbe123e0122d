"""`nbl-dist eval` and `bench`: the model and its baseline scored on the same blocks, none of which the run used
(statistics or held back, whatever --seed and --rank-by were), checked against the blocks the backend actually
received and a perplexity computed here from the models' logits; eval's and bench's --device / --dtype."""

import json
import math
import random
import shutil
import sys

import pytest
import torch

from nbl_dist.calibration.local import InProcessBackend
from nbl_dist.cli import main
from nbl_dist.data import ledger
from nbl_dist.evaluation import perplexity
from nbl_dist.evaluation import speed as evaluate_speed
from nbl_dist.model import synthetic
from tests.helpers import CORPUS

SEQ = 16
EVAL_SAMPLES = 8
RUNS = {"seed": ["--seed", "16"], "loss": ["--rank-by", "loss", "--score-samples", "2"]}


def write_corpus(path, n_docs, seed):
    """Documents of random words (numbered, so no two blocks of the stream are alike), as JSON Lines."""
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    docs = [f"{i}: " + " ".join(rng.choice(words) for _ in range(12)) for i in range(n_docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def reference_blocks(tokenizer, docs, seq_len):
    """The block stream by docs/method.md §8, written out here: (available, seq_len)."""
    ids = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def calibrate_watched(mp, src, data, out, extra):
    """Calibrate through the CLI; returns every block the backend received (statistics, then held back: the
    blocks every measured rule scores its layer sets on, taken once however many sets it measures)."""
    seen, held = [], []

    def stream(self, blocks, *a, **k):
        seen.append(blocks.clone())
        return plain_stream(self, blocks, *a, **k)

    def measure_sets(self, sets, score_blocks, *a, **k):
        if not held or not torch.equal(held[-1], score_blocks):
            held.append(score_blocks.clone())
        return plain_measure_sets(self, sets, score_blocks, *a, **k)

    plain_stream, plain_measure_sets = InProcessBackend.stream, InProcessBackend.measure_sets
    mp.setattr(InProcessBackend, "stream", stream)
    mp.setattr(InProcessBackend, "measure_sets", measure_sets)
    argv = ["calibrate", "--model", str(src), "--data", str(data), "--out", str(out), "--samples", "6", "--seq-len",
            str(SEQ), "--linearize", "1", "--backend", "in-process", "--no-plot", *extra]
    assert main(argv) == 0
    assert len(held) <= 1  # one held-back set of blocks per run
    return torch.cat(seen + held)


@pytest.fixture(scope="module")
def runs(make_model_dir, tokenizer, tmp_path_factory):
    """name -> (output folder, blocks the run used); one source model, one corpus of about 40 blocks."""
    root = tmp_path_factory.mktemp("eval")
    src = make_model_dir("llama")
    docs = write_corpus(root / "calib.jsonl", 60, seed=0)
    result = {"src": src, "data": root / "calib.jsonl", "docs": docs, "root": root}
    with pytest.MonkeyPatch.context() as mp:
        for name, extra in RUNS.items():
            result[name] = (root / name, calibrate_watched(mp, src, root / "calib.jsonl", root / name, extra))
    return result


def eval_watched(monkeypatch, argv):
    """Run `nbl-dist eval`; returns [(is the linearized model, blocks it was scored on)] for each model."""
    scored = []
    loss_sum = perplexity.loss_sum

    def watch(model, blocks, batch_size=4):
        scored.append((model.config.nbl is not None, blocks.clone()))
        return loss_sum(model, blocks, batch_size)

    monkeypatch.setattr(perplexity, "loss_sum", watch)
    assert main(["eval", *argv]) == 0
    return scored


def reference_perplexity(folder, blocks):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(blocks).logits.double()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return math.exp(float(loss))


def shares_a_row(a, b):
    return bool((a[:, None, :] == b[None, :, :]).all(-1).any())


@pytest.mark.parametrize("name", list(RUNS))
def test_baseline_and_model_scored_on_the_same_unused_blocks(runs, tokenizer, name, monkeypatch, tmp_path):
    out, used = runs[name]
    stream = reference_blocks(tokenizer, runs["docs"], SEQ)
    record = json.loads((out / "config.json").read_text())["nbl"]["data"]
    used_idx = record["statistics_blocks"] + record["held_back_blocks"]
    assert torch.equal(stream[used_idx], used)  # the record names exactly the blocks the backend received
    assert json.loads((out / "nbl_report.json").read_text())["data"] == record
    # The run's blocks lie where a wrong skip would read: among the first blocks, and right after the statistics.
    n_stat = len(record["statistics_blocks"])
    assert set(used_idx) & set(range(EVAL_SAMPLES)) and set(used_idx) & set(range(n_stat, n_stat + EVAL_SAMPLES))

    result_file = tmp_path / "r.json"
    scored = eval_watched(monkeypatch, ["--model", str(out), "--baseline", str(runs["src"]), "--data",
                                        str(runs["data"]), "--samples", str(EVAL_SAMPLES), "--json-out",
                                        str(result_file)])
    assert [linearized for linearized, _ in scored] == [True, False]
    blocks = scored[0][1]
    assert torch.equal(blocks, scored[1][1]) and blocks.shape == (EVAL_SAMPLES, SEQ)
    assert not shares_a_row(blocks, used)
    result = json.loads(result_file.read_text())
    assert torch.equal(stream[result["blocks"]], blocks)
    assert result["blocks"] == sorted(set(range(len(stream))) - set(used_idx))[:EVAL_SAMPLES]
    assert result["relation"] == ledger.SAME_DATA and result["excluded_blocks"] == len(
        [i for i in used_idx if i < result["blocks"][-1]])
    ppl = {"model": reference_perplexity(out, blocks), "baseline": reference_perplexity(runs["src"], blocks)}
    assert result["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert result["ratio"] == pytest.approx(ppl["model"] / ppl["baseline"], rel=1e-5)


def test_another_seq_len_skips_every_overlapping_block(runs, tokenizer, monkeypatch, tmp_path, capsys):
    out, _ = runs["seed"]
    record = json.loads((out / "config.json").read_text())["nbl"]["data"]
    used_tokens = {t for i in record["statistics_blocks"] + record["held_back_blocks"]
                   for t in range(i * SEQ, (i + 1) * SEQ)}
    scored = eval_watched(monkeypatch, ["--model", str(out), "--data", str(runs["data"]), "--samples", "6",
                                        "--seq-len", "24", "--json-out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    stream = reference_blocks(tokenizer, runs["docs"], 24)
    assert torch.equal(stream[result["blocks"]], scored[0][1])
    overlapping = {j for j in range(len(stream)) if used_tokens & set(range(j * 24, (j + 1) * 24))}
    assert result["blocks"] == sorted(set(range(len(stream))) - overlapping)[:6]
    assert "is the calibration data" in capsys.readouterr().out


def test_other_data_needs_no_exclusion(runs, tokenizer, monkeypatch, tmp_path, capsys):
    out, _ = runs["loss"]
    docs = write_corpus(tmp_path / "other.jsonl", 20, seed=1)
    scored = eval_watched(monkeypatch, ["--model", str(out), "--data", str(tmp_path / "other.jsonl"), "--samples",
                                        "4"])
    result = json.loads((out / "nbl_eval.json").read_text())  # the default: beside the run's report
    assert result["blocks"] == [0, 1, 2, 3] and result["relation"] == ledger.OTHER_DATA
    assert torch.equal(scored[0][1], reference_blocks(tokenizer, docs, SEQ)[:4])
    assert "not the calibration data" in capsys.readouterr().out


def test_calibration_data_with_another_tokenizer_is_refused(runs, tmp_path, capsys):
    out, _ = runs["seed"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    synthetic.train_tokenizer(CORPUS[::-1], vocab_size=300).save_pretrained(copy)
    assert main(["eval", "--model", str(copy), "--data", str(runs["data"])]) == 2
    assert "tokenizer is not the one that cut it" in capsys.readouterr().err


def test_tasks_without_the_harness_name_the_extra(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    assert main(["eval", "--model", str(runs["seed"][0]), "--tasks", "boolq"]) == 2
    assert "pip install 'nbl-dist[eval]'" in capsys.readouterr().err


@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_bench_device_and_dtype(runs, monkeypatch, capsys, dtype, expected):
    timed = []
    speed = evaluate_speed.speed

    def watch(model, prompt, *a, **k):
        timed.append((model.dtype, model.device.type))
        return speed(model, prompt, *a, **k)

    monkeypatch.setattr(evaluate_speed, "speed", watch)
    assert main(["bench", "--model", str(runs["seed"][0]), "--baseline", str(runs["src"]), "--prompt-len", "8",
                 "--new-tokens", "2", "--rounds", "1", "--device", "cpu", "--dtype", dtype]) == 0
    assert timed == [(expected, "cpu")] * 2
    assert "speed-up" in capsys.readouterr().out


def test_timers_wait_for_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    evaluate_speed.synchronized_clock(torch.device("cpu"))()
    assert calls == []
    gpu = torch.device("cuda", 0)
    evaluate_speed.synchronized_clock(gpu)()
    assert calls == [gpu]
