"""Against the hardware: the statistics accumulation's FLOP/s as a fraction of this machine's float32 matmul
peak (a plain matmul of the same shapes, measured in the same run), and the whole in-process pipeline's tokens/s
against the limit that forward + statistics FLOPs set at that peak.

    .venv/bin/python benchmarks/throughput.py [--dims 576 1024 2048] [--tokens 2048]
"""

import argparse
import time

import common  # noqa: F401  (the repository importable, offline)
import torch

from nbl_dist.calibration.local import InProcessBackend
from nbl_dist.core.stats import LayerStats
from nbl_dist.model import synthetic


def best_time(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_peak(m: int, d: int) -> float:
    """FLOP/s of the three (d x m)(m x d) float32 products the statistics need, as plain matmuls."""
    x, a = torch.randn(m, d), torch.randn(m, d)
    t = best_time(lambda: (x.T @ x, a.T @ x, a.T @ a))
    return 3 * 2 * m * d * d / t


def stats_rate(m: int, d: int) -> float:
    x, a = torch.randn(m, d) + 5.0, torch.randn(m, d)
    s = LayerStats.empty(d)
    t = best_time(lambda: s.update(x, a))
    return 3 * 2 * m * d * d / t


def pipeline(d: int, layers: int, blocks: int, seq: int, peak: float) -> tuple[float, float]:
    cfg = synthetic.llama_like(d, layers)
    model = synthetic.random_model(cfg, torch.float32)
    backend = InProcessBackend(None, torch.float32, model=model)
    ids = torch.randint(0, 32000, (blocks, seq))
    backend.stream(ids[:1], batch_size=1)  # warm-up
    t0 = time.perf_counter()
    backend.stream(ids, batch_size=1)
    tok_s = ids.numel() / (time.perf_counter() - t0)
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    attn = layers * 4 * seq / 2 * d  # QK^T and AV, causal: on average seq/2 keys per token, 2 FLOPs each
    stats = layers * 3 * 2 * d * d
    flops_per_token = 2 * layer_params + attn + stats
    return tok_s, peak / flops_per_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 1024, 2048])
    ap.add_argument("--tokens", type=int, default=2048)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'d':>5} {'tokens':>7} {'matmul GFLOP/s':>15} {'stats GFLOP/s':>14} {'stats/matmul':>13}")
    peaks = {}
    for d in a.dims:
        peak = gemm_peak(a.tokens, d)
        rate = stats_rate(a.tokens, d)
        peaks[d] = peak
        print(f"{d:>5} {a.tokens:>7} {peak / 1e9:>15.1f} {rate / 1e9:>14.1f} {rate / peak:>13.2f}", flush=True)
    d = 1024
    tok_s, limit = pipeline(d, layers=8, blocks=8, seq=512, peak=peaks.get(d) or gemm_peak(a.tokens, d))
    print(f"\npipeline (in-process, d={d}, 8 layers, 8 x 512 tokens, float32): {tok_s:,.0f} tok/s; "
          f"FLOP limit at the measured peak {limit:,.0f} tok/s; fraction {tok_s / limit:.2f}")


if __name__ == "__main__":
    main()
