"""Ray overhead: the Ray pipeline with 1 stage vs the single-process backend, same model (about 250M parameters,
synthetic Llama) and data, and where the difference goes.

Timings on a shared machine drift by 10-15% between consecutive runs, more than the effect measured here, so:
the two backends alternate within each round (order flipped every round), the ratio is taken per round and its
median reported, and two data sizes separate the fixed cost (start-up) from the per-token cost (streaming).

    .venv/bin/python benchmarks/ray_overhead.py [--tokens 4096,12288 --rounds 3 --seq-len 256 --two-stages]
"""

import argparse
import statistics
import sys
import time

import torch
from common import REPO

from nbl_dist import calibrate
from nbl_dist.model import synthetic

TARGET = 1.15  # the bound on Ray-at-1-stage / in-process wall time
DEFAULT_TOKENS = 128 * 2048  # nbl-dist's default calibration size (--samples 128 --seq-len 2048)


def breakdown(wall: float, rep: dict) -> dict:
    """Where one run's wall time went (seconds)."""
    t, w = rep["timings"], rep["workers"]
    busy = sum(x["timings"]["forward"] + x["timings"]["statistics"] for x in w)
    ckpt = sum(x["timings"].get("checkpoint", 0.0) for x in w)
    load = max(x["timings"]["load"] for x in w)
    return {"wall": wall, "startup": t["startup"], "load": load, "read": max(x["timings"].get("read", 0.0) for x in w),
            "stream": t["stream"], "busy": busy, "checkpoint": ckpt,
            "driver": t["stream"] - busy - ckpt,  # stream time no worker computed: dispatch, transfer, waits
            "after": t["reduce"] + t["rank"] + t["fit"] + t["write"]}


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,12288", help="comma-separated token counts (at least two)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--two-stages", action="store_true", help="also time Ray with 2 stages (not in the ratio)")
    a = ap.parse_args()
    sizes = [int(x) for x in a.tokens.split(",")]
    import ray

    cfg = synthetic.llama_like(1024, 12)
    model_dir, _ = synthetic.cached_random_checkpoint(cfg, REPO / "runs" / "bench-200m")
    n_params = sum(p.numel() for p in synthetic.random_model(cfg).parameters())
    gen = torch.Generator().manual_seed(0)
    data = {n: torch.randint(0, 32000, (n // a.seq_len, a.seq_len), generator=gen) for n in sizes}
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    init_s = time.perf_counter() - t0

    backends = {"in-process": {"backend": "in-process"}, "ray, 1 stage": {"stages": 1}}
    if a.two_stages:
        backends["ray, 2 stages"] = {"stages": 2}
    runs = {(name, n): [] for name in backends for n in sizes}  # -> [breakdown per round]
    for r in range(a.rounds):
        order = list(backends) if r % 2 == 0 else list(reversed(backends))
        for n in sizes:
            for name in order:
                t = time.perf_counter()
                rep = calibrate(str(model_dir), str(REPO / "runs" / "bench-200m-out"), blocks=data[n],
                                linearize=2, batch_size=a.batch_size, dtype="float32", device="cpu",
                                overwrite=True, plot=False, log=lambda *x: None, rank_by="cca", **backends[name])
                runs[(name, n)].append(breakdown(time.perf_counter() - t, rep))
                print(f"  round {r + 1} {n:>7,} tokens {name:>14}: {runs[(name, n)][-1]['wall']:6.1f} s",
                      file=sys.stderr, flush=True)
    ray.shutdown()

    print(f"model: {n_params / 1e6:.0f}M parameters (d=1024, 12 layers), float32, micro-batches of "
          f"{a.batch_size} x {a.seq_len}, 2 CPUs; {a.rounds} rounds, backends alternating (order flipped each "
          f"round); ray.init {init_s:.1f} s (once per session, not counted)")
    print("medians over rounds, seconds; ratio = per-round Ray / in-process wall, median (min-max)")
    cols = ("wall", "startup", "stream", "busy", "checkpoint", "driver", "after")
    print(f"{'tokens':>7} {'backend':>14} {'ratio':>17} " + " ".join(f"{c:>10}" for c in cols))
    med = {k: {c: statistics.median(b[c] for b in v) for c in v[0]} for k, v in runs.items()}
    for n in sizes:
        base = runs[("in-process", n)]
        for name in backends:
            ratios = [x["wall"] / y["wall"] for x, y in zip(runs[(name, n)], base)]
            rtxt = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            print(f"{n:>7,} {name:>14} {rtxt:>17} " + " ".join(f"{med[(name, n)][c]:>10.1f}" for c in cols))

    # Fixed vs per-token cost, from the medians at each size.
    fits = {name: line([float(n) for n in sizes], [med[(name, n)]["wall"] for n in sizes]) for name in backends}
    (a0, c0), (a1, c1) = fits["in-process"], fits["ray, 1 stage"]
    ray_med = {k: v for k, v in med.items() if k[0] == "ray, 1 stage"}
    start = statistics.median(v["startup"] for v in ray_med.values())
    load = statistics.median(v["load"] for v in ray_med.values())
    read = statistics.median(v["read"] for v in ray_med.values())
    print(f"\nfixed cost: in-process {a0:.1f} s, Ray {a1:.1f} s (+{a1 - a0:.1f} s); per 1k tokens: in-process "
          f"{c0 * 1e3:.2f} s, Ray {c1 * 1e3:.2f} s (streaming ratio {c1 / c0:.3f})")
    print(f"Ray actor start-up {start:.1f} s = process + torch import {start - load:.1f} s, constructor {load:.1f} s "
          f"(transformers modules and meta model {load - read:.1f} s, reading the weights {read:.1f} s)")
    if TARGET * c0 > c1:
        n_star = max(0.0, (a1 - TARGET * a0) / (TARGET * c0 - c1))
        print(f"Ray at 1 stage is within {100 * (TARGET - 1):.0f}% of in-process from {n_star:,.0f} tokens on; "
              f"at the default {DEFAULT_TOKENS:,} tokens (projected from this line): "
              f"{(a1 + c1 * DEFAULT_TOKENS) / (a0 + c0 * DEFAULT_TOKENS):.3f}")
    else:
        print(f"Ray's per-token cost is more than {TARGET:.2f}x in-process's: no data size meets the target")


if __name__ == "__main__":
    main()
