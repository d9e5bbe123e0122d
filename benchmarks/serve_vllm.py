"""Serving in vLLM: SmolLM2-135M and its NBL forms (K = 4, 8, 12 under the default rule) served side by side in one
run, each measured against the original as a ratio, beside the ratio the FLOP-and-bytes model of the layers
predicts (nbl_dist/serving/cost_model.py, with this machine's float32 matmul peak and memory bandwidth measured in
the same run):

- KV capacity for a fixed KV memory (VLLM_CPU_KVCACHE_SPACE) and the concurrency it allows at a 2,048-token context;
- offline throughput of a batch of prompts: prefill tokens/s (the batch with one output token each) and decode
  tokens/s (the extra time of NEW_TOKENS - 1 more output tokens each);
- time per output token at batch 1.

    .venv-vllm/bin/python benchmarks/serve_vllm.py [--ks 4 8 12] [--batch 16] [--prompt-len 512]

The NBL folders are calibrated as the demo calibrates (64 x 256 tokens of half the plays, 8 more held back for the
default rule), once per K from one set of kept statistics, and reused by later runs and by benchmarks/heal.py
(runs/nbl-default/). Each engine
runs vLLM's defaults (torch.compile on) in float32, prefix caching off (each measurement sends fresh prompts anyway;
off, a repeated prompt cannot skip its prefill); all engines are up together, and each of --repeats rounds
measures every one of them: a ratio is the median over the rounds of the model's speed over the original's in the
same round (the shared machine's speed drifts by tens of percent over minutes), printed with its range.
"""

import argparse
import contextlib
import json
import os
import statistics
import time

import common  # noqa: F401  (the repository importable, offline)
import torch

KV_SPACE_GIB = 2
os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(KV_SPACE_GIB)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
CONTEXT = 2048
NEW_TOKENS = 256  # long enough that the decode time dwarfs the noise of the prefill it is separated from
OUT = common.REPO / "runs" / "serve_vllm"


def machine_rates(threads: int) -> tuple[float, float]:
    """(float32 matmul FLOP/s, memory bandwidth in bytes/s) with `threads` threads: the best of a few 1024^3
    products, and of copies of a 256 MiB tensor (a read and a write per byte)."""
    from nbl_dist.calibration.throughput import best_seconds, torch_threads

    with torch_threads(threads):
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        src = torch.empty(64 * 2**20)
        dst = torch.empty_like(src)
        peak = 2 * 1024**3 / best_seconds(lambda: a @ b, repeats=5)
        bandwidth = 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src), repeats=5)
    return peak, bandwidth


def engine(folder):
    from nbl_dist.runtime.vllm_engine import open_llm

    return open_llm(folder, dtype="float32", max_model_len=CONTEXT, seed=0, enable_prefix_caching=False,
                    disable_log_stats=True)


def timed_generate(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0


def measure_round(llm, prompts, batch: int, prompt_len: int) -> dict:
    """One measurement of prefill and decode tokens/s of a batch and of the time per output token at batch 1;
    `prompts` yields prompts no earlier call sent."""
    prefill = timed_generate(llm, [next(prompts) for _ in range(batch)], 1)
    full = timed_generate(llm, [next(prompts) for _ in range(batch)], NEW_TOKENS)
    one = timed_generate(llm, [next(prompts)], 1)
    one_full = timed_generate(llm, [next(prompts)], NEW_TOKENS)
    return {"prefill_tok_s": batch * prompt_len / prefill, "decode_tok_s": batch * (NEW_TOKENS - 1) / (full - prefill),
            "tpot_s": (one_full - one) / (NEW_TOKENS - 1)}


def predicted(shape, k: int, batch: int, prompt_len: int, peak: float, bandwidth: float) -> dict:
    """The same quantities from the roofline (seconds per step; KV capacity L / (L - K) times the original's)."""
    from nbl_dist.serving.cost_model import step_cost

    mid = prompt_len + NEW_TOKENS / 2  # average context of a decode step

    def secs(**kw):
        return step_cost(shape, k, dtype_bytes=4, **kw).seconds(peak, bandwidth)

    return {"prefill": secs(tokens=batch * prompt_len, context=(prompt_len + 1) / 2, sequences=batch),
            "decode": secs(tokens=batch, context=mid, sequences=batch),
            "tpot": secs(tokens=1, context=mid, sequences=1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="measurement rounds, each over every engine")
    a = ap.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    from nbl_dist.data.blocks import token_stream
    from nbl_dist.serving.cost_model import DecoderShape, kv_capacity_ratio
    from nbl_dist.runtime.vllm_engine import kv_capacity_tokens

    model_dir, calib, held = common.smollm2_and_plays()
    folders = {0: model_dir, **{k: common.default_rule_folder(model_dir, calib, k) for k in a.ks}}
    layers = {k: json.loads((f / "config.json").read_text()).get("nbl", {}).get("linearized_layers", [])
              for k, f in folders.items()}
    tok = AutoTokenizer.from_pretrained(model_dir)
    stream = token_stream((p.read_text() for p in sorted(held.glob("*.txt"))), tok)
    shape = DecoderShape.of(AutoConfig.from_pretrained(model_dir))
    # Every engine is up at once (an idle one waits on its queue) and each round measures them one after the other,
    # so that a model's speed is compared with the original's in the same round: the machine is shared and its
    # speed drifts by tens of percent over minutes. A ratio is the median over the rounds, with its range.
    prompts = iter([stream[s:s + a.prompt_len] for s in range(0, len(stream) - a.prompt_len, a.prompt_len)])
    rounds: dict[int, list[dict]] = {k: [] for k in folders}
    with contextlib.ExitStack() as stack:
        engines = {k: stack.enter_context(engine(folder)) for k, folder in folders.items()}
        for llm in engines.values():
            timed_generate(llm, [next(prompts) for _ in range(2)], 4)  # warm-up
        for r in range(a.repeats):
            for k, llm in engines.items():
                rounds[k].append(measure_round(llm, prompts, a.batch, a.prompt_len))
                print(f"round {r + 1}, K = {k:>2}: {json.dumps(rounds[k][-1])}", flush=True)
        capacity = {k: kv_capacity_tokens(llm) for k, llm in engines.items()}
    threads = 1  # vLLM's CPU worker on this 2-CPU machine runs torch with 1 thread ("Reducing Torch threads")
    peak, bandwidth = machine_rates(threads)
    print(f"\nSmolLM2-135M in vLLM {__import__('vllm').__version__}, float32, CPU; roofline at {peak / 1e9:.1f} "
          f"GFLOP/s and {bandwidth / 1e9:.1f} GB/s ({threads} thread); batch {a.batch} x {a.prompt_len}-token "
          f"prompts, {NEW_TOKENS} output tokens; KV memory {KV_SPACE_GIB} GiB; {a.repeats} rounds")
    base = {q: statistics.median(r[q] for r in rounds[0]) for q in rounds[0][0]}
    base_pred = predicted(shape, 0, a.batch, a.prompt_len, peak, bandwidth)
    print(f"original (median of the rounds): KV {capacity[0]:,} tokens ({capacity[0] / CONTEXT:.1f} requests at "
          f"{CONTEXT}), prefill {base['prefill_tok_s']:,.0f} tok/s, decode {base['decode_tok_s']:,.1f} tok/s, "
          f"TPOT {base['tpot_s'] * 1e3:.1f} ms")
    print("NBL / original: measured, median of the rounds [range] (predicted by the FLOP-and-bytes model)")
    print(f"{'K':>3} {'KV capacity':>16} {'prefill tok/s':>26} {'decode tok/s':>26} {'1/TPOT (batch 1)':>26}")
    table = []
    for k in a.ks:
        p = predicted(shape, k, a.batch, a.prompt_len, peak, bandwidth)
        row = {"k": k, "layers": layers[k], "kv_tokens": capacity[k],
               "kv": (capacity[k] / capacity[0], kv_capacity_ratio(shape, k)),
               "prefill": (paired(rounds, k, "prefill_tok_s"), base_pred["prefill"] / p["prefill"]),
               "decode": (paired(rounds, k, "decode_tok_s"), base_pred["decode"] / p["decode"]),
               "tpot": (paired(rounds, k, "tpot_s", faster_is_lower=True), base_pred["tpot"] / p["tpot"])}
        table.append(row)
        cells = [f"{row['kv'][0]:>8.3f} ({row['kv'][1]:.3f})"] + [
            f"{m[0]:.3f} [{m[1]:.2f}-{m[2]:.2f}] ({q:.3f})" for m, q in (row[c] for c in ("prefill", "decode", "tpot"))]
        print(f"{k:>3} " + " ".join(f"{c:>26}" if i else f"{c:>16}" for i, c in enumerate(cells)))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"rounds": rounds, "kv_tokens": capacity, "table": table,
                                                  "peak_flops": peak, "bandwidth": bandwidth, "batch": a.batch,
                                                  "prompt_len": a.prompt_len, "new_tokens": NEW_TOKENS}, indent=2))


def paired(rounds: dict[int, list[dict]], k: int, quantity: str, faster_is_lower: bool = False):
    """(median, min, max) over the rounds of K's speed over the original's in the same round."""
    ratios = [(o[quantity] / m[quantity]) if faster_is_lower else (m[quantity] / o[quantity])
              for m, o in zip(rounds[k], rounds[0])]
    return statistics.median(ratios), min(ratios), max(ratios)


if __name__ == "__main__":
    main()
