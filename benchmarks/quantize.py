"""Quantizing the output: SmolLM2-135M and its NBL forms (the default rule, K = 4, 8, 12, and the default heal of
K = 8) quantized W4A16 by `nbl-dist quantize` (GPTQ, its defaults), with the linearized layers' maps quantized and
kept, measured in four steps, each writing its part of runs/quantize/results.json:

    .venv/bin/python benchmarks/quantize.py quality     # held-out perplexity, float32 transformers (~40 min here)
    .venv-vllm/bin/python benchmarks/quantize.py serve  # vLLM: weight memory, KV capacity, prefill and decode
    .venv/bin/python benchmarks/quantize.py awq         # AWQ against GPTQ at K = 0 and 8
    .venv/bin/python benchmarks/quantize.py order       # the other order at K = 8: quantize, dequantize, calibrate
    .venv-vllm/bin/python benchmarks/quantize.py vllm-serve  # `vllm serve` on K = 8 W4A16 against transformers
    .venv/bin/python benchmarks/quantize.py table       # the tables, as RESULTS.md has them

Quantization data: the calibration plays (--data of the NBL folders), every option at nbl-dist quantize's default
(64 blocks of the calibration's 256 tokens after the recorded ones and the 32 left for eval; group size 64, the
largest of 128, 64, 32 dividing 576 and 1536). Held-out perplexity: the first 16 blocks of 256 tokens of the other
plays, and of unrelated English (the Python documentation shipped with the standard library): the sets of
benchmarks/heal.py. "Added" is the quantized folder's perplexity over its float folder's, minus 1.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common  # noqa: F401  (the repository importable, offline)

OUT = common.REPO / "runs" / "quantize"
RESULTS = OUT / "results.json"
EVAL_BLOCKS = 16
KV_SPACE_GIB = 1


def update_results(key: str, value) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[key] = value
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))


FLOAT_NAMES = ("K=0", "K=4", "K=8", "K=12", "K=8 healed")


def float_folder(name: str) -> Path:
    """The float folder of a name of FLOAT_NAMES: the original (K = 0), the default rule's K = 4, 8, 12, and K = 8
    healed; built (and cached) only when asked for, so that one step can run while the cache of another builds."""
    model_dir, calib, _ = common.smollm2_and_plays()
    if name == "K=0":
        return model_dir
    if name == "K=8 healed":
        return common.healed_folder(model_dir, calib, 8)
    return common.default_rule_folder(model_dir, calib, int(name.removeprefix("K=")))


def quantized(name: str, folder: Path, calib: Path, method: str = "gptq", maps: str = "quantize") -> Path:
    """The folder quantized W4A16 by `nbl-dist quantize` (cached in runs/quantize/)."""
    from nbl_dist import quantize

    out = OUT / f"{name.replace('=', '').replace(' ', '-')}-w4a16-{method}-{maps}"
    if not (out / "nbl_quantize_report.json").exists():
        t0 = time.perf_counter()
        quantize(str(folder), str(calib), str(out), method=method, maps=maps, overwrite=True, log=print)
        print(f"{out.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def eval_sets():
    from transformers import AutoTokenizer

    from nbl_dist.data.blocks import load_blocks
    from nbl_dist.data.corpora import pydoc_blocks

    model_dir, _, held = common.smollm2_and_plays()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {"plays": load_blocks(held, tok, EVAL_BLOCKS, 256), "pydoc": pydoc_blocks(tok, EVAL_BLOCKS, 256)}


def perplexities(folder: Path, sets) -> dict[str, float]:
    import torch

    from nbl_dist import load_linearized
    from nbl_dist.evaluation.perplexity import perplexity

    model = load_linearized(folder, dtype=torch.float32)
    return {name: perplexity(model, blocks) for name, blocks in sets.items()}


def quality(names: list[str] | None, maps_options: list[str]) -> None:
    _, calib, _ = common.smollm2_and_plays()
    sets, rows = eval_sets(), {}
    for name in names or FLOAT_NAMES:
        folder = float_folder(name)
        row = {"float": perplexities(folder, sets)}
        for maps in maps_options if name != "K=0" else ("quantize",):
            q = quantized(name, folder, calib, maps=maps)
            report = json.loads((q / "nbl_quantize_report.json").read_text())
            row[f"w4a16 maps {maps}"] = {**perplexities(q, sets), "oneshot_s": report["timings"]["oneshot_s"]}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
        update_results("quality", {**json.loads(RESULTS.read_text()).get("quality", {}), **rows}
                       if RESULTS.exists() else rows)


def awq() -> None:
    _, calib, _ = common.smollm2_and_plays()
    sets, rows = eval_sets(), {}
    for name in ("K=0", "K=8"):
        q = quantized(name, float_folder(name), calib, method="awq")
        report = json.loads((q / "nbl_quantize_report.json").read_text())
        rows[name] = {**perplexities(q, sets), "oneshot_s": report["timings"]["oneshot_s"]}
        print(name, "awq", json.dumps(rows[name]), flush=True)
        update_results("awq", rows)


def dequantized_copy(q: Path, out: Path, like: Path) -> Path:
    """A float32 checkpoint of a quantized folder: its weights as compressed-tensors decompresses them (run_compressed
    False: transformers otherwise keeps the packed words and the state dict has no float weights), the tensors of
    the original's checkpoint only (no scales), the original's config.json (no quantization_config) and tokenizer."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    import nbl_dist  # noqa: F401

    if (out / "model.safetensors").exists():
        return out
    with safe_open(str(like / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k in names}
    assert set(state) == names, sorted(names - set(state))[:5]
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for p in like.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copy2(p, out / p.name)
    return out


def order() -> None:
    """The research scripts' order at K = 8: quantize the original, dequantize it, calibrate that (default rule)."""
    from nbl_dist import calibrate

    model_dir, calib, _ = common.smollm2_and_plays()
    q0 = quantized("K=0", model_dir, calib)
    deq = dequantized_copy(q0, OUT / "K0-w4a16-dequantized", model_dir)
    out = OUT / "K0-w4a16-then-nbl-k8"
    t0 = time.perf_counter()
    if not (out / "nbl_report.json").exists():
        calibrate(deq, out, data=str(calib), samples=64, seq_len=256, linearize=8, backend="in-process",
                  batch_size=4, dtype="float32", device="cpu", overwrite=True, log=print)
    layers = json.loads((out / "config.json").read_text())["nbl"]["linearized_layers"]
    sets = eval_sets()
    row = {**perplexities(out, sets), "layers": layers, "calibrate_s": time.perf_counter() - t0,
           "dequantized_original": perplexities(deq, sets)}  # = the W4A16 original's, if the copy is faithful
    print("quantize then NBL, K = 8:", json.dumps(row), flush=True)
    update_results("order", row)


def rss_anon_bytes() -> int:
    """The process's anonymous resident memory (RssAnon): what it allocated and touched, not mapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


@contextlib.contextmanager
def measured_model_load(record: dict):
    """vLLM's CPU model runner loads the model in this process (one engine, no worker process): its get_model,
    wrapped, records the anonymous resident memory the process gains while loading, in record['load_bytes']. That
    is the weights as the backend holds them after process_weights_after_loading: the packed int4 words and scales
    of a quantized layer, and for an unquantized one the copy oneDNN packs, which the module's parameters no longer
    hold (the CPU build empties them), so a sum over the parameters would miss it."""
    import gc

    import vllm.v1.worker.cpu_model_runner as runner

    original = runner.get_model

    def get_model(*args, **kwargs):
        gc.collect()
        before = rss_anon_bytes()
        model = original(*args, **kwargs)
        gc.collect()
        record["load_bytes"] = rss_anon_bytes() - before
        return model

    runner.get_model = get_model
    try:
        yield record
    finally:
        runner.get_model = original


def held_bytes(model) -> dict[str, int]:
    """What the loaded model holds, by kind, to explain `load_bytes`: its parameters and buffers (packed int4 words
    and scales for a quantized layer), and the copies vLLM's CPU build packs for oneDNN outside them (one per
    unquantized linear layer; the tied embedding gets two, for embed_tokens and lm_head, beside its own table)."""
    seen, params = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            params += t.numel() * t.element_size()
    copies = {"embedding": 0, "layers": 0}
    for name, module in model.named_modules():
        linear = getattr(module, "cpu_linear", None)
        for cell in getattr(linear, "__closure__", None) or ():
            handler = cell.cell_contents
            if hasattr(handler, "handler_tensor"):  # [K, N] in the module's dtype
                size = handler.k * handler.n * module.weight.element_size()
                copies["layers" if ".layers." in f".{name}." else "embedding"] += size
    return {"parameters": params, "onednn_copies_embedding": copies["embedding"],
            "onednn_copies_layers": copies["layers"]}


def kernels(model) -> list[str]:
    return sorted({type(m.scheme.kernel).__name__ for m in model.modules()
                   if getattr(getattr(m, "scheme", None), "kernel", None) is not None})


def serve(batch: int, prompt_len: int, new_tokens: int, rounds: int, dtypes: list[str],
          names: list[str] | None = None) -> None:
    """vLLM on the original and the W4A16 folders (`names`: only these, beside the original, which every run
    measures again so that its ratios are taken side by side)."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # A fixed mmap threshold (glibc's default is dynamic: after a large buffer is freed it serves buffers of that
        # size from a heap it does not give back), so that what the loader frees leaves the resident memory
        # measured_model_load reads (922 MiB for the float32 original with the dynamic threshold, 735 fixed, which is
        # what held_bytes accounts for). glibc reads it when the process starts, so the step starts itself again.
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"})
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(KV_SPACE_GIB)
    # The engine in this process (as the serving tests run it): apply_model's functions, defined in __main__ here,
    # cannot be pickled to a worker process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer

    from nbl_dist.data.blocks import token_stream
    from nbl_dist.runtime.vllm_engine import kv_capacity_tokens, open_llm

    model_dir, _, held = common.smollm2_and_plays()
    engines = {"original": model_dir}
    for name in FLOAT_NAMES:
        engines[f"{name} W4A16"] = OUT / f"{name.replace('=', '').replace(' ', '-')}-w4a16-gptq-quantize"
    engines["K=8 W4A16 maps kept"] = OUT / "K8-w4a16-gptq-keep"
    if names:
        engines = {k: v for k, v in engines.items() if k == "original" or k in names}
    tok = AutoTokenizer.from_pretrained(model_dir)
    stream = token_stream((p.read_text() for p in sorted(held.glob("*.txt"))), tok)
    prompts = [stream[s:s + prompt_len] for s in range(0, batch * prompt_len * 4, prompt_len)]
    from vllm import SamplingParams, TokensPrompt

    def timed(llm, ps, n):
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                     SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0

    rows = json.loads(RESULTS.read_text()).get("serve", {}) if RESULTS.exists() else {}
    for dtype in dtypes:
        for name, folder in engines.items():
            if not folder.exists():
                print(f"skip {name}: {folder} missing", flush=True)
                continue
            with measured_model_load({}) as load, \
                    open_llm(folder, dtype=dtype, max_model_len=1024, seed=0, enable_prefix_caching=False,
                             enforce_eager=True, disable_log_stats=True, distributed_executor_backend="uni") as llm:
                mem = load["load_bytes"]
                used = llm.apply_model(kernels)[0]
                holds = llm.apply_model(held_bytes)[0]
                kv = kv_capacity_tokens(llm)
                timed(llm, prompts[:2], 4)  # warm-up
                measured = []
                for r in range(rounds):
                    ps = prompts[(r % 2) * batch:(r % 2 + 1) * batch]
                    prefill = timed(llm, ps, 1)
                    full = timed(llm, ps, new_tokens)
                    measured.append({"prefill_tok_s": batch * prompt_len / prefill,
                                     "decode_tok_s": batch * (new_tokens - 1) / (full - prefill)})
            row = {"loaded_bytes": mem, "held": holds, "kv_tokens": kv, "kernels": used, "rounds": measured,
                   **{q: statistics.median(m[q] for m in measured) for q in ("prefill_tok_s", "decode_tok_s")}}
            if name == "original":
                ref = row
            # Speeds as ratios to the original measured in this run (side by side: this machine is noisy).
            row["vs_original"] = {q: row[q] / ref[q] for q in ("loaded_bytes", "kv_tokens", "prefill_tok_s",
                                                                "decode_tok_s")}
            rows[f"{name} {dtype}"] = row
            print(f"{name} {dtype}: {json.dumps({k: v for k, v in row.items() if k != 'rounds'})}", flush=True)
            update_results("serve", rows)
    update_results("serve_setup", {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                                   "rounds": rounds, "kv_space_gib": KV_SPACE_GIB, "eager": True})


PROMPTS = ["To be, or not to be, that is the question:", "Now is the winter of our discontent",
           "The capital of France is", "def fibonacci(n):"]


def vllm_serve(folder: Path, dtype: str = "float32", new_tokens: int = 16) -> None:
    """`vllm serve FOLDER --dtype float32` as a user types it (its own processes, torch.compile on): the log line
    naming the 4-bit kernel, and per prompt a completion request's prompt log-probs and greedy tokens against
    transformers' on the same folder (float32, this environment's transformers and compressed-tensors)."""
    import socket
    import subprocess
    import urllib.request

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nbl_dist  # noqa: F401

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = OUT / "vllm-serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(KV_SPACE_GIB)}
    with log.open("w") as sink:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "vllm"), "serve", str(folder), "--dtype", dtype,
                                 "--port", str(port), "--max-model-len", "1024"], stdout=sink,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    rows, worst = [], 0.0
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                time.sleep(3)
        for text in PROMPTS:
            ids = tok(text, add_special_tokens=False).input_ids
            body = {"model": str(folder), "prompt": text, "max_tokens": new_tokens, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True, "logprobs": 0, "prompt_logprobs": 0}
            req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                choice = json.loads(r.read())["choices"][0]
            served = [choice["prompt_logprobs"][i][str(t)]["logprob"] for i, t in enumerate(ids) if i > 0]
            seq = list(ids)
            with torch.no_grad():
                for _ in range(new_tokens):
                    seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
                logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
            diff = max(abs(a - b) for a, b in zip(served, want))
            worst = max(worst, diff)
            rows.append({"prompt": text, "max_prompt_logprob_diff": diff,
                         "greedy_equal": choice["token_ids"] == seq[len(ids):], "text": choice["text"]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    kernel_lines = sorted({line.split("] ", 1)[-1].strip() for line in log.read_text().splitlines()
                           if "for CompressedTensorsWNA16" in line})
    print("log:", kernel_lines, "largest prompt log-prob difference", worst)
    update_results("vllm_serve", {"folder": str(folder), "dtype": dtype, "kernel_log": kernel_lines,
                                  "max_prompt_logprob_diff": worst, "prompts": rows})


def table() -> None:
    results = json.loads(RESULTS.read_text())
    q = results.get("quality", {})
    base = q.get("K=0")
    print("| model | float: plays / pydoc | W4A16, maps quantized | added | W4A16, maps kept | added |")
    print("|---|---|---|---|---|---|")
    for name, row in q.items():
        cells = [f"{row['float']['plays']:.2f} / {row['float']['pydoc']:.2f}"]
        for key in ("w4a16 maps quantize", "w4a16 maps keep"):
            if key not in row:
                cells += ["", ""]
                continue
            r = row[key]
            cells += [f"{r['plays']:.2f} / {r['pydoc']:.2f}",
                      " / ".join(f"{r[s] / row['float'][s] - 1:+.2%}" for s in ("plays", "pydoc"))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if base:
        added0 = {s: base["w4a16 maps quantize"][s] / base["float"][s] - 1 for s in ("plays", "pydoc")}
        for name, row in q.items():
            for key in ("w4a16 maps quantize", "w4a16 maps keep"):
                if key in row:
                    rel = {s: (row[key][s] / row["float"][s] - 1) / added0[s] for s in added0}
                    print(f"{name} {key}: added / original's added = {rel['plays']:.2f} (plays), "
                          f"{rel['pydoc']:.2f} (pydoc)")
    s = results.get("serve", {})
    for dtype in ("float32", "bfloat16"):
        ref, ref32 = s.get(f"original {dtype}"), s.get("original float32")
        if not ref:
            continue
        print(f"\n{dtype}: ratio to the unquantized original in {dtype} (weight memory also to float32's)")
        for name, row in s.items():
            if not name.endswith(dtype):
                continue
            print(f"{name}: weights {row['loaded_bytes'] / 2**20:.1f} MiB ({row['loaded_bytes'] / ref['loaded_bytes']:.3f}"
                  f"; {row['loaded_bytes'] / ref32['loaded_bytes']:.3f} of float32), KV {row['kv_tokens']:,} "
                  f"({row['kv_tokens'] / ref['kv_tokens']:.3f}), prefill {row['prefill_tok_s']:.0f} tok/s "
                  f"({row['vs_original']['prefill_tok_s']:.3f}), decode {row['decode_tok_s']:.1f} tok/s "
                  f"({row['vs_original']['decode_tok_s']:.3f}), kernels {row['kernels']}")
    for key in ("awq", "order"):
        if key in results:
            print(f"\n{key}: {json.dumps(results[key])}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["quality", "serve", "awq", "order", "vllm-serve", "table"])
    ap.add_argument("--names", nargs="+", help="quality: only these folders (K=0, K=4, ..., 'K=8 healed'); serve: "
                                               "only these engines beside the original ('K=8 healed W4A16', ...)")
    ap.add_argument("--maps", nargs="+", default=["quantize", "keep"], choices=["quantize", "keep"],
                    help="quality: the --maps options to quantize each linearized folder with")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    a = ap.parse_args()
    if a.step == "quality":
        quality(a.names, a.maps)
    elif a.step == "serve":
        serve(a.batch, a.prompt_len, a.new_tokens, a.rounds, a.dtypes, a.names)
    elif a.step == "awq":
        awq()
    elif a.step == "order":
        order()
    elif a.step == "vllm-serve":
        vllm_serve(OUT / "K8-w4a16-gptq-quantize")
    else:
        table()


if __name__ == "__main__":
    sys.exit(main())
