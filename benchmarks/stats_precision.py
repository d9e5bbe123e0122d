"""Statistics precision: each precision's accuracy against float64 statistics, and its cost, on SmolLM2-135M.

One float32 forward pass over the demo's calibration data (64 x 256 tokens of half the plays) feeds every
precision's statistics and a float64 reference (Gram products of the same activations in float64) at once. Per
precision: the largest relative error over the 30 layers of M_xx, M_ax, M_aa (max |error| / max |M|), of the
CCA bound, and of W and b (every layer fitted); the layers the CCA rule picks and the held-out perplexity on the
other plays at K = 4 and 8; the FLOPs per token of one layer's Gram products and their time per token here
(with the symmetric products by upper block-rows and as full GEMMs). Last, the projected share of the statistics
in a Llama-3.1-70B calibration on an H100 per precision, from FLOP counts and published peak rates.

    .venv/bin/python benchmarks/stats_precision.py [--samples 64] [--eval-blocks 16]
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from common import REPO, smollm2_and_plays

from nbl_dist.calibration import throughput
from nbl_dist.core import stats as stats_mod
from nbl_dist.core.capture import capture_stats
from nbl_dist.core.linalg import layer_scores, lmmse_fit
from nbl_dist.core.selection import select_layers
from nbl_dist.core.stats import PRECISIONS, LayerStats
from nbl_dist.data.blocks import load_blocks
from nbl_dist.evaluation.perplexity import perplexity
from nbl_dist.model import synthetic
from nbl_dist.model.arch import adapter_for
from nbl_dist.model.surgery import apply_linearization

REFERENCE = "float64"


class Float64Grams:
    """The reference accumulator: the same activations' Gram products formed in float64."""

    def __init__(self, d: int):
        self.stats = LayerStats.empty(d)

    def update(self, x: torch.Tensor, a: torch.Tensor, precision: str) -> None:
        self.stats.update(x.double(), a.double(), "fp32")  # gram_dtype(float64) is float64


class KeepBatch:
    """An accumulator that only keeps the last (x, a) it is given (a real micro-batch to time updates on)."""

    def update(self, x: torch.Tensor, a: torch.Tensor, precision: str) -> None:
        self.x, self.a = x.reshape(-1, x.shape[-1]), a.reshape(-1, a.shape[-1])  # (m, d) each


@torch.no_grad()
def stream_all(model, blocks: torch.Tensor, batch_size: int) -> dict[str, dict[int, LayerStats]]:
    """precision (and "float64") -> layer -> statistics, all from one forward pass over blocks (N, T)."""
    adapter = adapter_for(model.config)
    layers = dict(enumerate(adapter.layers(model)))
    d = model.config.hidden_size
    ref = {i: Float64Grams(d) for i in layers}
    per = {p: {i: LayerStats.empty(d) for i in layers} for p in PRECISIONS}
    with contextlib.ExitStack() as scopes:  # one scope per accumulator set: each sees every forward
        scopes.enter_context(capture_stats(layers, ref, adapter.attention))
        for p in PRECISIONS:
            scopes.enter_context(capture_stats(layers, per[p], adapter.attention, precision=p))
        for start in range(0, blocks.shape[0], batch_size):
            adapter.decoder(model)(input_ids=blocks[start:start + batch_size], use_cache=False)
    return {REFERENCE: {i: r.stats for i, r in ref.items()}, **per}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def accuracy(stats: dict[int, LayerStats], ref: dict[int, LayerStats], ref_scores, ref_fits) -> dict:
    """Largest relative error over the layers of each co-moment, the CCA bound, W and b."""
    out = {k: 0.0 for k in ("m_xx", "m_ax", "m_aa", "cca_bound", "W", "b")}
    scores, fits = [], {}
    for i, s in sorted(stats.items()):
        for k in ("m_xx", "m_ax", "m_aa"):
            out[k] = max(out[k], rel(getattr(s, k), getattr(ref[i], k)))
        scores.append(layer_scores(i, s))
        fits[i] = lmmse_fit(s)
        out["cca_bound"] = max(out["cca_bound"], abs(scores[-1].cca_bound - ref_scores[i].cca_bound)
                               / ref_scores[i].cca_bound)
        out["W"] = max(out["W"], rel(fits[i].weight, ref_fits[i].weight))
        out["b"] = max(out["b"], rel(fits[i].bias, ref_fits[i].bias))
    return {"errors": out, "scores": scores, "fits": fits}


def update_seconds_per_token(x: torch.Tensor, a: torch.Tensor, precision: str, triangle: bool) -> float:
    """Best-of-5 time of one statistics update on a real micro-batch (x, a: (m, d)), per token."""
    saved = dict(stats_mod.TRIANGLE_BLOCKS)
    stats_mod.TRIANGLE_BLOCKS.clear()
    if triangle:
        stats_mod.TRIANGLE_BLOCKS[x.device.type] = 4
    try:
        s = LayerStats.empty(x.shape[1])
        return throughput.best_seconds(lambda: s.update(x, a, precision), repeats=5) / x.shape[0]
    finally:
        stats_mod.TRIANGLE_BLOCKS.clear()
        stats_mod.TRIANGLE_BLOCKS.update(saved)


def llama70b_share() -> list[dict]:
    """Projected share of the statistics in a Llama-3.1-70B calibration (bf16 forward, 2048-token blocks) on one
    H100, per precision: FLOPs from throughput.py, rates the H100's published dense peaks."""
    cfg = synthetic.tiny_config("llama", hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                num_key_value_heads=8, num_hidden_layers=80, vocab_size=128256,
                                max_position_embeddings=131072)
    fwd = throughput.layer_forward_flops(cfg, 2048)
    rows = []
    for p in PRECISIONS:
        rates = throughput.rates_from_tflops(throughput.H100_TFLOPS["bf16"], "cuda", torch.bfloat16, p)
        st = throughput.stats_flops(cfg.hidden_size, p, "cuda")
        t_fwd, t_st = fwd / rates.forward, st / rates.stats
        rows.append({"precision": p, "forward_gflop": fwd / 1e9, "stats_gflop": st / 1e9,
                     "stats_tflops": rates.stats / 1e12, "stats_share": t_st / (t_fwd + t_st),
                     "speed_vs_no_stats": t_fwd / (t_fwd + t_st)})
    return rows


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--out", default=str(REPO / "runs" / "stats_precision.json"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    model_dir, calib, held = smollm2_and_plays()
    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = load_blocks(calib, tok, a.samples, a.seq_len)
    heldout = load_blocks(held, tok, a.eval_blocks, a.seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    all_stats = stream_all(model, blocks, batch_size=4)
    ref = all_stats[REFERENCE]
    ref_scores = {i: layer_scores(i, s) for i, s in ref.items()}
    ref_fits = {i: lmmse_fit(s) for i, s in ref.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M, {a.samples} x {a.seq_len} "
          f"calibration tokens, held-out {a.eval_blocks} x {a.seq_len}; streamed in {time.perf_counter() - t0:.0f} s",
          flush=True)

    def ppl_with(fits: dict, layers: list[int]) -> float:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        apply_linearization(m, {i: (fits[i].weight.float(), fits[i].bias.float()) for i in layers})
        return perplexity(m, heldout)

    adapter = adapter_for(model.config)
    kept = KeepBatch()  # one real micro-batch of a middle layer, for the timings
    with capture_stats({15: adapter.layers(model)[15]}, {15: kept}, adapter.attention), torch.no_grad():
        adapter.decoder(model)(input_ids=blocks[:4], use_cache=False)
    x, act = kept.x, kept.a
    rows = []
    for p in (REFERENCE,) + PRECISIONS:
        acc = accuracy(all_stats[p], ref, ref_scores, ref_fits)
        row = {"precision": p, **acc["errors"]}
        for k in a.ks:
            layers = select_layers(acc["scores"], "cca", k, None)
            row[f"layers_k{k}"] = layers
            row[f"ppl_k{k}"] = ppl_with(acc["fits"], layers)
        if p != REFERENCE:
            row["gflop_per_token_layer"] = throughput.stats_flops(x.shape[1], p, "cpu") / 1e9  # as the table says
            row["us_per_token_layer"] = 1e6 * update_seconds_per_token(x, act, p, triangle=True)
            row["us_per_token_layer_full"] = 1e6 * update_seconds_per_token(x, act, p, triangle=False)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()}), flush=True)
    base = perplexity(model, heldout)
    print_table(rows, a.ks, base)
    share = llama70b_share()
    print_share(share)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"rows": rows, "original_ppl": base, "llama70b_h100": share}, indent=2))
    print(f"total {time.perf_counter() - t0:.0f} s")


def print_table(rows: list[dict], ks: list[int], base: float) -> None:
    ref = rows[0]
    print(f"\nrelative errors against float64 statistics (max over 30 layers); held-out perplexity (original "
          f"{base:.2f}); FLOPs and time per token of one layer's statistics update here (symmetric products by 4 "
          "block-rows / as full GEMMs)")
    head = (f"{'precision':>9} {'M_xx':>8} {'M_ax':>8} {'M_aa':>8} {'CCA':>8} {'W':>8} {'b':>8} "
            + " ".join(f"{f'ppl K={k}':>9} {'vs f64':>7}" for k in ks)
            + f" {'GFLOP/tok':>10} {'us/tok tri':>10} {'full':>7}")
    print(head)
    for r in rows:
        ppl = " ".join(f"{r[f'ppl_k{k}']:>9.3f} {100 * (r[f'ppl_k{k}'] / ref[f'ppl_k{k}'] - 1):>+6.2f}%" for k in ks)
        cost = "" if "us_per_token_layer" not in r else (f" {r['gflop_per_token_layer']:>10.5f} "
                                                          f"{r['us_per_token_layer']:>10.1f} "
                                                          f"{r['us_per_token_layer_full']:>7.1f}")
        print(f"{r['precision']:>9} {r['m_xx']:>8.1e} {r['m_ax']:>8.1e} {r['m_aa']:>8.1e} {r['cca_bound']:>8.1e} "
              f"{r['W']:>8.1e} {r['b']:>8.1e} {ppl}{cost}")
    for k in ks:
        print(f"layers at K={k}: " + "; ".join(f"{r['precision']} {r[f'layers_k{k}']}" for r in rows))


def print_share(share: list[dict]) -> None:
    print("\nPROJECTION (FLOP counts x published H100 SXM dense peaks, not measured): Llama-3.1-70B layer, bf16 "
          "forward at 989 TFLOP/s, 2048-token blocks")
    print(f"{'precision':>9} {'fwd GFLOP/tok':>14} {'stats GFLOP/tok':>16} {'stats TFLOP/s':>14} {'stats share':>12} "
          f"{'speed vs forward alone':>23}")
    for r in share:
        print(f"{r['precision']:>9} {r['forward_gflop']:>14.3f} {r['stats_gflop']:>16.3f} {r['stats_tflops']:>14.0f} "
              f"{100 * r['stats_share']:>11.1f}% {r['speed_vs_no_stats']:>23.2f}")


if __name__ == "__main__":
    main()
