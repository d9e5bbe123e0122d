"""Bounded memory per actor: calibrate a synthetic model too big for one actor's budget over 4 stages, and
print each actor's peak RSS against the planner's estimate and against the whole model.

    .venv/bin/python benchmarks/memory.py [--layers 28 --hidden 1536 --budget 2.25GiB]

The model (about 3.2 GB of float32 weights) is written to runs/bench-memory/ once, one tensor at a time.
"""

import argparse
import time

import torch
from common import REPO

from nbl_dist import calibrate
from nbl_dist.calibration.plan import check_memory
from nbl_dist.model import synthetic
from nbl_dist.runtime.resources import fmt_bytes, parse_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--budget", default="2.25GiB")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    a = ap.parse_args()
    cfg = synthetic.llama_like(a.hidden, a.layers, intermediate=a.intermediate, heads=12, kv_heads=4)
    model_dir = REPO / "runs" / f"bench-memory-{a.layers}x{a.hidden}"
    t0 = time.perf_counter()
    if synthetic.cached_random_checkpoint(cfg, model_dir)[1]:
        print(f"wrote {model_dir} in {time.perf_counter() - t0:.0f} s")
    model_bytes = (model_dir / "model.safetensors").stat().st_size
    budget = parse_bytes(a.budget)
    kw = dict(dtype=torch.float32, batch_size=2, seq_len=a.seq_len, device="cpu")
    one = check_memory(cfg, 1, budget, **kw)
    print(f"whole model: {fmt_bytes(model_bytes)} of weights; in one actor: {one.message}")
    blocks = torch.randint(0, 32000, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(0))
    out = REPO / "runs" / "bench-memory-out"
    rep = calibrate(str(model_dir), str(out), blocks=blocks, linearize=2, stages=a.stages, batch_size=2,
                    dtype="float32", device="cpu", device_memory=a.budget, overwrite=True, plot=False,
                    rank_by="cca")  # the statistics pass's memory: every block into it, no held-back forwards
    plan = {s["stage"]: s for s in rep["plan"]["stages"]}
    print(f"\n{'actor':>5} {'layers':>8} {'planned':>11} {'peak RSS':>11} {'RSS/plan':>9} {'RSS/model':>10} "
          f"{'RSS/budget':>10}")
    for w in sorted(rep["workers"], key=lambda w: w["stage"]):
        s = plan[w["stage"]]
        rss = w["peak_rss_bytes"]
        span = f"{s['start']}-{s['end'] - 1}"
        print(f"{w['stage']:>5} {span:>8} {fmt_bytes(s['device_bytes']):>11} "
              f"{fmt_bytes(rss):>11} {rss / s['device_bytes']:>9.2f} {rss / model_bytes:>10.2f} "
              f"{rss / budget:>10.2f}")
    print(f"\nbudget per actor {fmt_bytes(budget)}; whole model {fmt_bytes(model_bytes)}; "
          f"calibration {rep['timings']['total']:.0f} s")


if __name__ == "__main__":
    main()
