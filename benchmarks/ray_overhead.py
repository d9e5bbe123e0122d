"""Ray overhead: the Ray pipeline with 1 stage vs the single-process backend, same model (about 200M
parameters, synthetic) and data, alternating in one run; where the difference goes.

    .venv/bin/python benchmarks/ray_overhead.py [--blocks 16 --seq-len 256 --rounds 2]
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from nbl_dist import calibrate, synthetic  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import ray

    cfg = synthetic.tiny_config("llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                                num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                                max_position_embeddings=4096)
    model_dir = REPO / "runs" / "bench-200m"
    if not (model_dir / "model.safetensors").exists():
        synthetic.write_random_checkpoint(cfg, model_dir)
    n_params = sum(p.numel() for p in synthetic.random_model(cfg).parameters())
    blocks = torch.randint(0, 32000, (a.blocks, a.seq_len), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    init_s = time.perf_counter() - t0
    kw = dict(blocks=blocks, linearize=2, batch_size=2, dtype="float32", device="cpu", overwrite=True, plot=False,
              log=lambda *x: None)
    runs = {"in-process": [], "ray, 1 stage": [], "ray, 2 stages": []}
    for _ in range(a.rounds):
        for name in runs:
            opts = {"backend": "in-process"} if name == "in-process" else {"stages": 1 if "1" in name else 2}
            t = time.perf_counter()
            rep = calibrate(str(model_dir), str(REPO / "runs" / "bench-200m-out"), **opts, **kw)
            runs[name].append((time.perf_counter() - t, rep))
    print(f"model: {n_params / 1e6:.0f}M parameters (d=1024, 12 layers), {blocks.numel():,} tokens, "
          f"micro-batches of 2 x {a.seq_len}, float32, 2 CPUs; ray.init {init_s:.1f} s (once per session)")
    print(f"{'backend':>14} {'wall s':>8} {'vs in-proc':>10} {'startup':>8} {'stream':>8} {'forward':>8} "
          f"{'stats':>7} {'wait':>7} {'rank+fit+write':>15}")
    best = {name: min(r, key=lambda x: x[0]) for name, r in runs.items()}
    base = best["in-process"][0]
    for name, (wall, rep) in best.items():
        t = rep["timings"]
        w = rep["workers"]
        fwd = sum(x["timings"]["forward"] for x in w)
        st = sum(x["timings"]["statistics"] for x in w)
        wait = sum(x["timings"].get("wait", 0.0) for x in w)
        print(f"{name:>14} {wall:>8.1f} {wall / base:>10.2f} {t['startup']:>8.1f} {t['stream']:>8.1f} "
              f"{fwd:>8.1f} {st:>7.1f} {wait:>7.1f} {t['rank'] + t['fit'] + t['write']:>15.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
