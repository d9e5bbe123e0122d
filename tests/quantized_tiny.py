"""Tiny models of every family, linearized with layers 0 and 3 of 4 and quantized W4A16 by `nbl-dist quantize` as a
user types it (`.venv/bin/nbl-dist`, which runs llm-compressor in .venv-quant), shared by the main suite
(tests/test_quantize.py, which builds them afresh) and the serving suite (tests/serving/test_quantized.py, which
reuses what the main suite built in the same `make test`, and builds them itself when run alone).

Widths are multiples of 32 (vLLM's CPU W4A16 kernel needs them): d = 64, 2 heads of 32, 1 KV head, MLP 128; so the
default group size is 64. The quantizations run in parallel processes (each spends most of its time importing
torch, transformers and llm-compressor)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "runs" / "quantize" / "tests"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
LINEARIZED = [0, 3]
TINY = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128, initializer_range=0.2)
# name -> (family, linearized or not, --maps): every family with its maps quantized, llama with them kept, and the
# llama original (a folder without an nbl section quantizes too).
CASES = {**{f: (f, True, "quantize") for f in FAMILIES}, "llama-keep": ("llama", True, "keep"),
         "llama-original": ("llama", False, "quantize")}
OPTIONS = ["--samples", "8", "--seq-len", "32", "--reserve-eval", "0"]
DONE = "nbl_quantize_report.json"


def write_sources(root: Path) -> None:
    """root/<family>-orig (random tiny model, tokenizer trained on tests.helpers.CORPUS), root/<family>-nbl (layers
    0 and 3 linearized from LMMSE fits on random blocks) and root/text (the corpus, one document per file)."""
    from nbl_dist.model import synthetic
    from tests.helpers import CORPUS, write_nbl_folder

    tok = synthetic.train_tokenizer(CORPUS, vocab_size=320)
    (root / "text").mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(CORPUS):
        (root / "text" / f"{i:02d}.txt").write_text(doc)
    for family in FAMILIES:
        src = synthetic.save_model(synthetic.random_model(synthetic.tiny_config(family, **TINY), seed=0),
                                   root / f"{family}-orig", tok)
        blocks = torch.randint(3, 320, (8, 64), generator=torch.Generator().manual_seed(0))
        write_nbl_folder(src, root / f"{family}-nbl", LINEARIZED, blocks)


def quantize_all(root: Path, nbl_dist_bin: Path) -> dict[str, float]:
    """Run every case's `nbl-dist quantize` at once; returns each one's wall time. Raises with a case's output
    when it fails."""
    import time

    procs, started = {}, time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several processes share the machine's CPUs
    for name, (family, linearized, maps) in CASES.items():
        model = root / f"{family}-{'nbl' if linearized else 'orig'}"
        log = (root / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen([str(nbl_dist_bin), "quantize", "--model", str(model), "--data",
                                         str(root / "text"), "--out", str(root / f"{name}-w4a16"), "--maps", maps,
                                         *OPTIONS], stdout=log, stderr=subprocess.STDOUT, env=env), log)
    times = {}
    for name, (proc, log) in procs.items():
        code = proc.wait(timeout=900)
        log.close()
        times[name] = time.perf_counter() - started
        if code:
            raise AssertionError(f"nbl-dist quantize ({name}) exited {code}: "
                                 f"{(root / f'{name}.log').read_text()[-3000:]}")
    return times


def build(root: Path = CACHE, nbl_dist_bin: Path = REPO / ".venv" / "bin" / "nbl-dist") -> Path:
    """Write the sources and quantize every case afresh into `root`."""
    shutil.rmtree(root, ignore_errors=True)
    write_sources(root)
    times = quantize_all(root, nbl_dist_bin)
    (root / "times.json").write_text(json.dumps(times))
    return root


def cached(root: Path = CACHE) -> Path:
    """What the main suite built, or a fresh build when it is missing or incomplete."""
    if all((root / f"{name}-w4a16" / DONE).exists() for name in CASES):
        return root
    return build(root)
