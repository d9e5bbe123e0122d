"""Per-layer cost of the research code's method vs nbl-dist's, same data, same machine, one run.

research: materialise X and Y = X + A for all tokens in float64, covariances, the CCA bound from two
          eigendecompositions (C_xx^-1/2, C_yy^-1/2) and an SVD, and W = C_ax C_xx^-1 with an explicit inverse.
nbl-dist: stream the same tokens in float32 batches into LayerStats (float64 co-moments), the bound and W
          from Cholesky factors.

Times exclude generating the synthetic stream (the same generator feeds both). Each (method, d, tokens) runs in a
fresh subprocess, so its peak RSS above the process's own baseline (after
imports) is the method's memory. The two methods alternate, and both report their bound and W, which are compared.

    .venv/bin/python benchmarks/research_vs_nbl.py [--dims 512 1024 2048] [--tokens 16384 65536]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = 2048  # tokens per streamed batch (one micro-batch of 1 x 2048)


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Batches:
    """The same correlated (x, a) stream for both methods, generated batch by batch in float32 with elementwise
    operations only: no BLAS call, so generating never contends with the measured method's threads (numpy's
    OpenBLAS threads spin after each call and slowed torch's by 2x in a first version). Time spent here is
    kept apart (gen_s) and subtracted."""

    def __init__(self, d: int, tokens: int, seed: int = 0):
        import numpy as np

        self.np, self.d, self.tokens = np, d, tokens
        self.rng = np.random.default_rng(seed)
        self.offset = (self.rng.standard_normal(d) * 5).astype(np.float32)  # large channel means, as in LLMs
        self.gen_s = 0.0

    def __iter__(self):
        np = self.np
        for start in range(0, self.tokens, BATCH):
            t0 = time.perf_counter()
            z = self.rng.standard_normal((min(BATCH, self.tokens - start), self.d), dtype=np.float32)
            x = z + 0.6 * np.roll(z, 1, axis=1) + self.offset  # neighbouring channels correlated
            noise = self.rng.standard_normal(x.shape, dtype=np.float32)
            a = 0.5 * np.roll(x, 7, axis=1) - 0.3 * x + noise  # partly a linear function of x
            self.gen_s += time.perf_counter() - t0
            yield x, a


def run_research(d: int, tokens: int) -> dict:
    import numpy as np
    import scipy.linalg

    base = rss()
    t0 = time.perf_counter()
    xs, ys = [], []
    data = Batches(d, tokens)
    for x, a in data:
        xs.append(x.astype(np.float64))
        ys.append((x + a).astype(np.float64))
    X, Y = np.concatenate(xs), np.concatenate(ys)  # (tokens, d) each, float64: what the research code keeps
    del xs, ys
    c = np.cov(np.hstack([X, Y]).T)  # (2d, 2d)
    cxx, cyx, cyy = c[:d, :d], c[d:, :d], c[d:, d:]

    def inv_sqrt(m):
        w, v = scipy.linalg.eigh(m)
        return (v / np.sqrt(w)) @ v.T

    rho = scipy.linalg.svd(inv_sqrt(cyy) @ cyx @ inv_sqrt(cxx), compute_uv=False)
    bound = float(np.sum(1 - rho ** 2))
    cax = cyx - cxx  # a = y - x
    w = cax @ np.linalg.inv(cxx)
    elapsed = time.perf_counter() - t0 - data.gen_s
    return {"time_s": elapsed, "peak_bytes": rss() - base, "bound": bound, "w": w}


def run_nbl(d: int, tokens: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from nbl_dist.core.linalg import cca_bound, lmmse_fit
    from nbl_dist.core.stats import LayerStats

    torch.zeros(1) @ torch.zeros(1)  # load BLAS before measuring
    base = rss()
    t0 = time.perf_counter()
    s = LayerStats.empty(d)
    data = Batches(d, tokens)
    for x, a in data:
        s.update(torch.from_numpy(x), torch.from_numpy(a))
    bound = cca_bound(s)[0]
    w = lmmse_fit(s).weight.numpy()
    elapsed = time.perf_counter() - t0 - data.gen_s
    return {"time_s": elapsed, "peak_bytes": rss() - base, "bound": bound, "w": w}


def child(method: str, d: int, tokens: int, out: str) -> None:
    import numpy as np

    res = (run_research if method == "research" else run_nbl)(d, tokens)
    np.save(out + ".npy", res.pop("w"))
    Path(out + ".json").write_text(json.dumps(res))


def measure(method: str, d: int, tokens: int, tmp: Path) -> dict:
    import numpy as np

    out = str(tmp / f"{method}-{d}-{tokens}")
    subprocess.run([sys.executable, __file__, "--child", method, str(d), str(tokens), out], check=True)
    res = json.loads(Path(out + ".json").read_text())
    res["w"] = np.load(out + ".npy")
    return res


def main():
    import tempfile

    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), int(a.child[2]), a.child[3])
        return
    tmp = Path(tempfile.mkdtemp())
    print(f"{'d':>5} {'tokens':>7} {'research s':>11} {'nbl s':>8} {'time x':>7} {'research MiB':>13} "
          f"{'nbl MiB':>8} {'memory x':>9} {'bound rel.diff':>15} {'W rel.diff':>11}")
    for d in a.dims:
        for tokens in a.tokens:
            r = measure("research", d, tokens, tmp)
            n = measure("nbl", d, tokens, tmp)
            bound_diff = abs(r["bound"] - n["bound"]) / abs(r["bound"])
            w_diff = np.abs(r["w"] - n["w"]).max() / np.abs(r["w"]).max()
            print(f"{d:>5} {tokens:>7} {r['time_s']:>11.2f} {n['time_s']:>8.2f} "
                  f"{r['time_s'] / n['time_s']:>7.2f} {r['peak_bytes'] / 2**20:>13.0f} "
                  f"{n['peak_bytes'] / 2**20:>8.0f} {r['peak_bytes'] / max(n['peak_bytes'], 1):>9.1f} "
                  f"{bound_diff:>15.1e} {w_diff:>11.1e}", flush=True)


if __name__ == "__main__":
    main()
