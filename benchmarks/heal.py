"""Healing on SmolLM2-135M: held-out perplexity before and after `nbl-dist heal`, for K = 4, 8, 12 layers
linearized under the default rule, with the kl loss (the default), the ce loss and LoRA rank 32 (kl), each with its
tokens and wall time; the held-out KL curves as a plot.

    .venv/bin/python benchmarks/heal.py [--ks 4 8 12] [--variants kl ce lora32] [--tokens N] [--eval-blocks 16] \
        [--out runs/heal]

The NBL folders are the demo's calibration (benchmarks/common.py default_rule_folder, shared with serve_vllm.py);
healing trains on the calibration plays' blocks after the ones the calibration recorded and the 32 left for eval
(--data is the calibration's), with every other option at its default (`nbl-dist heal` on a local Ray, 1 worker).
Held-out: (a) the first --eval-blocks blocks of 256 tokens of the other plays, (b) of unrelated English, the Python
documentation that ships with the standard library: the sets of benchmarks/selection.py.
"""

import argparse
import json
import time
from pathlib import Path

import common  # noqa: F401  (the repository importable, offline)
import torch

from nbl_dist.data.blocks import load_blocks
from nbl_dist.data.corpora import pydoc_blocks
from nbl_dist.evaluation.perplexity import perplexity

OUT = common.REPO / "runs" / "heal"
VARIANTS = {"kl": {"loss": "kl"}, "ce": {"loss": "ce"}, "kl+ce": {"loss": "kl+ce"},
            "lora32": {"loss": "kl", "lora_rank": 32}}


def perplexities(folder, sets) -> dict[str, float]:
    from nbl_dist import load_linearized

    model = load_linearized(folder, dtype=torch.float32)
    return {name: perplexity(model, blocks) for name, blocks in sets.items()}


def closed(before: float, after: float, original: float) -> float:
    """Share of the gap to the original that healing closed."""
    return (before - after) / (before - original)


def plot(curves: dict[str, list[dict]], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors, styles = {}, {"kl": "-", "ce": ":", "kl+ce": "-.", "lora32": "--"}
    for name, points in curves.items():  # name: "K=<k> <variant>"; a colour per K, a line style per variant
        k, variant = name.split()
        color = colors.setdefault(k, f"C{len(colors)}")
        ax.plot([p["tokens"] for p in points], [p["kl"] for p in points], marker="o", markersize=3, color=color,
                linestyle=styles.get(variant, "-"), label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out KL from the original (nats/token)")
    ax.set_title("SmolLM2-135M: healing the linearized layers' maps")
    ax.legend(fontsize="small", ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--variants", nargs="+", default=["kl", "ce", "lora32"], choices=sorted(VARIANTS))
    ap.add_argument("--tokens", type=int, help="training tokens of every run (default: heal's default budget)")
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--out", type=Path, default=OUT, help="healed folders, results.json (runs of the same folder "
                    "accumulate) and kl_curves.png")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from nbl_dist.healing.pipeline import heal_api

    model_dir, calib, held = common.smollm2_and_plays()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sets = {"plays": load_blocks(held, tok, a.eval_blocks, 256), "pydoc": pydoc_blocks(tok, a.eval_blocks, 256)}
    results_path = a.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["original"] = perplexities(model_dir, sets)
    print(f"original: plays {results['original']['plays']:.2f}, pydoc {results['original']['pydoc']:.2f}",
          flush=True)
    for k in a.ks:
        folder = common.default_rule_folder(model_dir, calib, k)
        row = results.setdefault(str(k), {})
        row["nbl"] = perplexities(folder, sets)
        row["layers"] = json.loads((folder / "config.json").read_text())["nbl"]["linearized_layers"]
        for variant in a.variants:
            out = a.out / f"k{k}-{variant}"
            t0 = time.perf_counter()
            report = heal_api(str(folder), str(model_dir), str(calib), str(out), overwrite=True,
                              **({"tokens": a.tokens} if a.tokens else {}), **VARIANTS[variant])
            wall = time.perf_counter() - t0
            tokens_per_step = report["batch_size"] * report["seq_len"]
            row[variant] = {"ppl": perplexities(out, sets), "tokens": report["tokens"], "wall_s": wall,
                            "train_s": report["timings"]["train_s"], "kl_before": report["heldout_kl_before"],
                            "kl_after": report["heldout_kl_after"],
                            "curve": [{"tokens": p["step"] * tokens_per_step, "kl": p["kl"]}
                                      for p in report["curve"]["heldout"]]}
            r = row[variant]
            print(f"K = {k} {variant}: plays {row['nbl']['plays']:.2f} -> {r['ppl']['plays']:.2f}, pydoc "
                  f"{row['nbl']['pydoc']:.2f} -> {r['ppl']['pydoc']:.2f}; {r['tokens']:,} tokens in {wall:.0f} s",
                  flush=True)
            a.out.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=2))
    orig = results["original"]
    print(f"\nheld-out perplexity, other plays / pydoc (original {orig['plays']:.2f} / {orig['pydoc']:.2f}); share "
          "of the gap to the original closed; training tokens, wall time (1 worker, 2 CPUs)")
    for k in sorted(int(x) for x in results if x != "original"):
        row = results[str(k)]
        print(f"K = {k:>2} {row['layers']}: NBL {row['nbl']['plays']:.2f} / {row['nbl']['pydoc']:.2f}")
        for variant in VARIANTS:
            if variant not in row:
                continue
            r = row[variant]
            print(f"    {variant:<7} {r['ppl']['plays']:6.2f} / {r['ppl']['pydoc']:6.2f}   closed "
                  f"{closed(row['nbl']['plays'], r['ppl']['plays'], orig['plays']):6.1%} / "
                  f"{closed(row['nbl']['pydoc'], r['ppl']['pydoc'], orig['pydoc']):6.1%}   held-out KL "
                  f"{r['kl_before']:.4f} -> {r['kl_after']:.4f}   {r['tokens']:,} tokens, {r['wall_s']:.0f} s")
    plot({f"K={k} {v}": results[str(k)][v]["curve"] for k in sorted(int(x) for x in results if x != "original")
          for v in VARIANTS if v in results[str(k)]}, a.out / "kl_curves.png")  # this run's and earlier runs
    print(f"\nwrote {results_path} and {a.out / 'kl_curves.png'}")


if __name__ == "__main__":
    main()
