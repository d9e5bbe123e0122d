"""The plan's time estimate against the measured phases: SmolLM2-135M on the demo's data (64 x 256 tokens of half
the plays), float32 on this machine's CPU, rates measured on the spot (--measure: one micro-batch through one
layer, with the threads each actor gets). Each run's nbl_report.json records estimate vs measured; this prints
them side by side, for the demo's setting (Ray, 2 stages) and the in-process backend (1 actor).

    .venv/bin/python benchmarks/time_estimate.py [--samples 64] [--seq-len 256] [--precision fp32]
"""

import argparse
import json
import tempfile
from pathlib import Path

from common import REPO, smollm2_and_plays

from nbl_dist import calibrate

SETTINGS = {"ray, 2 stages": {"stages": 2}, "in-process": {"backend": "in-process"}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default=str(REPO / "runs" / "time_estimate.json"))
    a = ap.parse_args()
    model_dir, calib, _ = smollm2_and_plays()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.settings:
            rep = calibrate(model_dir, Path(tmp) / name.replace(" ", "_"), data=str(calib), samples=a.samples,
                            seq_len=a.seq_len, linearize=4, batch_size=4, dtype="float32", device="cpu",
                            measure=True, plot=False, stats_precision=a.precision, log=lambda *x: None,
                            **SETTINGS[name])
            est = rep["time_estimate"]
            rows.append({"setting": name, "stats_precision": rep["stats_precision"], **est})
            print(f"{name}: {a.samples} x {a.seq_len} tokens, statistics {rep['stats_precision']}; rates "
                  f"{est['rates']['source']}")
            for phase, seconds in est["phases"].items():
                m = est["measured"][phase]
                ratio = f"{m / seconds:6.2f}" if m and seconds else "     -"
                print(f"  {phase:>8}: estimated {seconds:8.2f} s   measured {m:8.2f} s   measured/estimated {ratio}",
                      flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
