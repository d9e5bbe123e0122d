"""Scaling study: calibration time, tokens/s and memory per actor across model sizes, stages and replicas.

Synthetic Llama configs from tiny to as large as the machine allows are written once (one tensor at a time) and
calibrated with the Ray pipeline for every (stages, replicas) in the sweep. Writes a CSV and three plots:
calibration time vs parameters, tokens/s vs stages, peak memory per actor vs parameters.

    python jobs/scaling_study.py --out runs/scaling                      # local Ray, the default sweep
    ray job submit --working-dir . -- python jobs/scaling_study.py --config jobs/configs/studies/scaling.yaml
"""

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

from nbl_dist import calibrate
from nbl_dist.model import synthetic
from nbl_dist.options import load_yaml  # noqa: E402

DEFAULTS = {"hidden": [256, 512, 768, 1024], "layers": 8, "stages": [1, 2], "replicas": [1, 2], "samples": 8,
            "seq_len": 256, "batch_size": 2, "address": None, "out": "runs/scaling"}


def model_for(hidden: int, layers: int, root: Path) -> tuple[Path, int]:
    cfg = synthetic.llama_like(hidden, layers)
    path, _ = synthetic.cached_random_checkpoint(cfg, root / "models" / f"llama-{layers}x{hidden}")
    from nbl_dist.model.arch import layer_param_counts

    return path, layer_param_counts(cfg)[2]


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, x, y, ylabel, group in (
            ("time_vs_params.png", "params", "calibration_s", "calibration time (s)", ("stages", "replicas")),
            ("tokens_per_s_vs_stages.png", "stages", "tokens_per_s", "streaming tokens/s", ("params", "replicas")),
            ("memory_per_actor.png", "params", "peak_rss_gib", "peak RSS per actor (GiB)", ("stages", "replicas"))):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({tuple(r[g] for g in group) for r in rows}):
            pts = sorted((r[x], r[y]) for r in rows if tuple(r[g] for g in group) == key)
            label = ", ".join(f"{g}={v / 1e6:.0f}M" if g == "params" else f"{g}={v}" for g, v in zip(group, key))
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xlabel(x if x != "params" else "parameters")
        ax.set_ylabel(ylabel)
        if x == "params":
            ax.set_xscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML with any of: hidden, layers, stages, replicas, samples, seq_len, ...")
    ap.add_argument("--hidden", type=int, nargs="+")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--stages", type=int, nargs="+")
    ap.add_argument("--replicas", type=int, nargs="+")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--address")
    ap.add_argument("--out")
    args = ap.parse_args()
    opts = {**DEFAULTS, **(load_yaml(args.config) if args.config else {}),
            **{k: v for k, v in vars(args).items() if v is not None and k != "config"}}
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    import ray

    ray.init(address=opts["address"] or "local", **({} if opts["address"] else {"include_dashboard": False}))
    rows = []
    for hidden in opts["hidden"]:
        model_dir, params = model_for(hidden, opts["layers"], out)
        blocks = torch.randint(0, 32000, (opts["samples"], opts["seq_len"]), generator=torch.Generator().manual_seed(0))
        for stages in opts["stages"]:
            for replicas in opts["replicas"]:
                t0 = time.perf_counter()
                rep = calibrate(str(model_dir), str(out / "last-output"), blocks=blocks, linearize=2, stages=stages,
                                replicas=replicas, batch_size=opts["batch_size"], dtype="float32", overwrite=True,
                                plot=False, address=opts["address"], rank_by="cca", log=lambda *a: None)
                row = {"hidden": hidden, "layers": opts["layers"], "params": params, "stages": stages,
                       "replicas": replicas, "tokens": rep["tokens"], "calibration_s": time.perf_counter() - t0,
                       "stream_s": rep["timings"]["stream"], "tokens_per_s": rep["timings"]["tokens_per_s"],
                       "peak_rss_gib": max(w["peak_rss_bytes"] for w in rep["workers"]) / 2**30}
                rows.append(row)
                print(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)
    with open(out / "scaling.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for p in plot(rows, out):
        print(f"wrote {p}")
    print(f"wrote {out / 'scaling.csv'}")
    ray.shutdown()


if __name__ == "__main__":
    main()
