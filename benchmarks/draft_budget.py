"""How `nbl-dist draft` should spend its budget on SmolLM2-135M: passes over the generated sequences, the peak
learning rate, the draft's starting point. Each variant trains in this process (drafting.trainer.DraftTrainer, the
loop Ray Train's workers run, without Ray) on the same sequences, the ones the default run generates, and is scored
by vLLM's count replayed (trainer.replay_rounds) on the raw-text prompts benchmarks/speculative.py measures in vLLM:
the target's greedy continuations of 32 blocks of 64 tokens of the held-out plays, 128 tokens each.

    .venv-vllm/bin/python benchmarks/draft_budget.py generate     # the sequences, once (about 11 min on 2 CPUs)
    .venv-vllm/bin/python benchmarks/draft_budget.py train --name 2-passes --epochs 2
    .venv-vllm/bin/python benchmarks/draft_budget.py train --name lr-3e-3 --lr 3e-3
    .venv-vllm/bin/python benchmarks/draft_budget.py train --name lens --init lens
    .venv-vllm/bin/python benchmarks/draft_budget.py score runs/speculative/draft-K=0   # a draft folder, replayed

Generating costs more than a pass over what was generated (about 650 s against 300 s here), so the question is
whether a second pass buys what new sequences would. Results in runs/speculative/budget/results.json, a line per
variant and scoring (every 48 steps: the replayed tokens per step on the prompts, and on the run's 8 held-out
sequences).
"""

import argparse
import json
import time
from pathlib import Path

import common
import torch

OUT = common.REPO / "runs" / "speculative" / "budget"
BENCH_PROMPTS, BENCH_PROMPT_LEN, BENCH_NEW_TOKENS = 32, 64, 128  # as benchmarks/speculative.py's raw-text set
SCORE_EVERY = 48


def config():
    from nbl_dist.drafting.config import DraftConfig

    model_dir, calib, _ = common.smollm2_and_plays()
    return DraftConfig.from_dict({"target": str(model_dir), "data": str(calib), "out": str(OUT / "unused")})


def generate() -> None:
    """The default run's training and held-out sequences (same prompts: the seed's choice), and the benchmark's."""
    from transformers import AutoTokenizer

    from nbl_dist.data.blocks import load_blocks
    from nbl_dist.data.sources import DataSource
    from nbl_dist.drafting.data import choose_prompts
    from nbl_dist.drafting.data import generate as continue_greedily
    from nbl_dist.drafting.pipeline import plan_draft

    cfg = config()
    plan = plan_draft(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.target)
    eos = tokenizer.eos_token_id
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "bench.pt").exists():
        _, _, heldout = common.smollm2_and_plays()
        prompts = load_blocks(heldout, tokenizer, BENCH_PROMPTS, BENCH_PROMPT_LEN)
        torch.save(continue_greedily(cfg.target, prompts, BENCH_NEW_TOKENS, eos, "vllm", "float32").to_dict(),
                   OUT / "bench.pt")
    if not (OUT / "sequences.pt").exists():
        source = DataSource(cfg.data, cfg.text_column, None, None)
        prompts = choose_prompts(source, tokenizer, cfg.prompt_len, plan.target.folder.data_records,
                                 cfg.batches_for() * cfg.batch_size, cfg.heldout_samples, cfg.seed)
        t0 = time.perf_counter()
        seqs = continue_greedily(cfg.target, torch.cat([prompts.train, prompts.heldout]), cfg.continuation, eos,
                                 "vllm", "float32")
        torch.save({**seqs.to_dict(), "heldout": len(prompts.heldout_indices),
                    "generate_s": time.perf_counter() - t0}, OUT / "sequences.pt")


def load(name: str):
    from nbl_dist.drafting.data import Sequences

    raw = torch.load(OUT / name)
    return Sequences.from_dict(raw), raw


def logit_lens(draft, target) -> None:
    """The draft started as the target's logit lens at its last tap: the fc passes the last tap through, the layer's
    attention and MLP add nothing (output projections zero), the final norm is the target's."""
    d = draft.config.transformer_layer_config.hidden_size
    layer = draft.layers[0]
    with torch.no_grad():
        draft.fc.weight.zero_()
        draft.fc.weight[:, -d:].copy_(torch.eye(d))
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        draft.norm.weight.copy_(target.shard.final_norm.weight)


def train(name: str, epochs: int, lr: float, init: str) -> None:
    from nbl_dist.drafting.data import draft_vocabulary
    from nbl_dist.drafting.loop import pass_order
    from nbl_dist.drafting.model import TargetTaps, draft_config, new_draft
    from nbl_dist.drafting.pipeline import plan_draft
    from nbl_dist.drafting.trainer import DraftTrainer, step_counts
    from nbl_dist.model.safetensors_io import load_tensors

    cfg = config()
    plan = plan_draft(cfg)
    seqs, raw = load("sequences.pt")
    bench, _ = load("bench.pt")
    train_seqs, held = seqs.split(seqs.ids.shape[0] - raw["heldout"])
    adapter = plan.target.folder.adapter
    embed = load_tensors(plan.target.path, [adapter.embed_key], dtype=torch.float32)[0][adapter.embed_key]
    draft_ids, _ = draft_vocabulary(train_seqs, plan.target.vocab, plan.draft_vocab)
    # SmolLM2 ties its head to the embedding: the head's rows are the embedding's
    draft = new_draft(draft_config(plan.target.path, plan.aux_layers, plan.draft_vocab, cfg.speculative_tokens),
                      embed, embed[draft_ids], draft_ids, cfg.seed)
    target = TargetTaps(plan.target.path, plan.aux_layers, draft_ids, torch.float32, torch.device("cpu"))
    if init == "lens":
        logit_lens(draft, target)
    per_pass = train_seqs.ids.shape[0] // cfg.batch_size
    steps = epochs * per_pass
    trainer = DraftTrainer(target, draft, ttt_steps=cfg.ttt_steps, lr=lr, schedule=cfg.schedule,
                           warmup_steps=round(cfg.warmup * steps), total_steps=steps)
    mask = train_seqs.loss_mask()
    t0, curve = time.perf_counter(), []
    while trainer.step < steps:
        order = pass_order(train_seqs.ids.shape[0], cfg.seed, trainer.step // per_pass)
        k = trainer.step % per_pass
        batch = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        trainer.train_step(train_seqs.ids[batch], mask[batch], step_counts(mask[batch], cfg.ttt_steps))
        if trainer.step % SCORE_EVERY == 0 or trainer.step == steps:
            on_held = trainer.heldout(held.ids, held.loss_mask(), cfg.batch_size)
            on_bench = trainer.heldout(bench.ids, bench.loss_mask(), cfg.batch_size)
            curve.append({"step": trainer.step, "seconds": round(time.perf_counter() - t0), "held-out": on_held,
                          "benchmark prompts": on_bench})
            print(f"{name}: step {trainer.step}/{steps}, {curve[-1]['seconds']} s: tokens per step replayed "
                  f"{on_bench['acceptance']:.3f} on the benchmark's prompts (per position "
                  f"{' '.join(f'{a:.2f}' for a in on_bench['per_position'])}), {on_held['acceptance']:.3f} held out",
                  flush=True)
    record(name, {"epochs": epochs, "lr": lr, "init": init, "steps": steps, "curve": curve,
                  "generate_s": raw.get("generate_s")})


def score(folder: Path) -> None:
    """A trained draft folder, replayed on the benchmark's prompts (against vLLM's own count in speculative.py)."""
    from safetensors.torch import load_file

    from nbl_dist.drafting.model import TargetTaps, config_from_dict, draft_target_ids, load_draft
    from nbl_dist.drafting.trainer import DraftTrainer

    cfg = config()
    bench, _ = load("bench.pt")
    draft = load_draft(config_from_dict(json.loads((folder / "config.json").read_text())),
                       load_file(str(folder / "model.safetensors")))
    target = TargetTaps(cfg.target, draft.config.eagle_aux_hidden_state_layer_ids, draft_target_ids(draft),
                        torch.float32, torch.device("cpu"))
    trainer = DraftTrainer(target, draft, ttt_steps=cfg.ttt_steps, lr=0.0, schedule="constant", warmup_steps=0,
                           total_steps=1)
    result = trainer.heldout(bench.ids, bench.loss_mask(), cfg.batch_size)
    print(f"{folder}: tokens per step replayed {result['acceptance']:.3f} (per position "
          f"{' '.join(f'{a:.3f}' for a in result['per_position'])})")
    record(f"score {folder.name}", result)


def record(key: str, value) -> None:
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = value
    path.write_text(json.dumps(results, indent=2))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="step", required=True)
    sub.add_parser("generate")
    t = sub.add_parser("train")
    t.add_argument("--name", required=True)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--init", choices=("random", "lens"), default="random")
    s = sub.add_parser("score")
    s.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.step == "generate":
        generate()
    elif args.step == "train":
        generate()
        train(args.name, args.epochs, args.lr, args.init)
    else:
        for folder in args.folders:
            score(folder)


if __name__ == "__main__":
    main()
