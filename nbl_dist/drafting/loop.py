"""Draft training on Ray Train: a TorchTrainer whose workers each run `draft_loop` (docs/method.md §14).

`draft_loop` is a plain function of its config: it builds the target (TargetTaps) and the draft from the initial
draft the driver wrote, takes its share of each global batch of sequences (each pass over them in its own order,
fixed by the seed and the pass, the same on every worker and after a restart), measures the held-out accuracy before, every --eval-every steps and
after, prints a progress line (rank 0), and every --checkpoint-every steps reports a checkpoint through
`ray.train.report`: the DraftTrainer's state (trained tensors, AdamW, schedule, step, history), written by rank 0.
Ray Train restarts the workers from the latest checkpoint when one dies, and a run started again under the same
name and storage continues from it (a stopped driver). The last checkpoint also holds the whole trained draft
(DRAFT_NAME), which the driver writes into the draft folder. Ray Train itself is behind training/ray_train.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from nbl_dist.training import ray_train

DRAFT_NAME = "draft.safetensors"  # the trained draft's tensors (as save_pretrained writes them) in a checkpoint


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What every worker needs, as plain values (unpacked from DraftConfig by the pipeline)."""

    target: str
    draft_config: dict  # the draft's config.json (speculators format)
    initial: str  # safetensors file of the initial draft's tensors (embedding and vocabulary maps included)
    aux_layers: list[int]
    dtype: str
    compute_dtype: str  # the draft's training compute (bfloat16: autocast), resolved by the driver
    ttt_steps: int
    lr: float
    schedule: str
    warmup_steps: int
    steps: int
    batch_size: int  # global, in sequences
    eval_every: int
    checkpoint_every: int
    seed: int
    threads: int | None
    target_cache: int  # bytes per worker of the target's features kept after a sequence's first pass (TargetCache)
    data: object  # ray.ObjectRef of {"train": Sequences dict, "heldout": Sequences dict}


def draft_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    from safetensors.torch import load_file

    from nbl_dist.drafting.data import Sequences
    from nbl_dist.drafting.model import TargetCache, TargetTaps, config_from_dict, draft_target_ids, load_draft
    from nbl_dist.drafting.trainer import DraftTrainer, step_counts
    from nbl_dist.model.safetensors_io import torch_dtype
    from nbl_dist.training.distributed import step_share

    cfg = LoopConfig(**config)
    rank, workers, device = ray_train.start_worker(cfg.threads)
    data = ray_train.fetch(cfg.data)
    train, heldout = Sequences.from_dict(data["train"]), Sequences.from_dict(data["heldout"])
    draft = load_draft(config_from_dict(cfg.draft_config), load_file(cfg.initial)).to(device)
    target = TargetTaps(cfg.target, cfg.aux_layers, draft_target_ids(draft), torch_dtype(cfg.dtype), device)
    trainer = DraftTrainer(target, draft, ttt_steps=cfg.ttt_steps, lr=cfg.lr, schedule=cfg.schedule,
                           warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                           compute_dtype=torch_dtype(cfg.compute_dtype))
    ray_train.resume(trainer, "drafting", rank)
    train_mask, heldout_mask = train.loss_mask(), heldout.loss_mask()
    # The held-out rows first (a few, measured ~10 times), then the training rows in what the budget has left.
    held_cache = TargetCache(target, heldout.ids, cfg.target_cache)
    train_cache = TargetCache(target, train.ids, cfg.target_cache - held_cache.capacity * held_cache.row_bytes)
    share = cfg.batch_size // workers
    if trainer.step == 0:
        trainer.heldout(heldout.ids, heldout_mask, share, held_cache)  # before any step
    per_pass = train.ids.shape[0] // cfg.batch_size  # global batches in one pass over the sequences
    tokens_per_step = cfg.batch_size * train.ids.shape[1]
    progress = ray_train.progress(cfg.steps * tokens_per_step, trainer.step * tokens_per_step, "drafting", rank,
                                  lambda: detail(trainer))
    while trainer.step < cfg.steps:
        order = pass_order(train.ids.shape[0], cfg.seed, trainer.step // per_pass)
        k = trainer.step % per_pass
        batch = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        mine = step_share(order, k, cfg.batch_size, rank, workers)
        trainer.train_step(train.ids[mine], train_mask[mine], step_counts(train_mask[batch], cfg.ttt_steps),
                           train_cache(mine))
        if trainer.step % cfg.eval_every == 0 or trainer.step == cfg.steps:
            trainer.heldout(heldout.ids, heldout_mask, share, held_cache)
        progress(tokens_per_step)
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            report(trainer, rank, final=trainer.step == cfg.steps)


def pass_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training sequences in pass `epoch` (the first pass's is the seed's own permutation)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003 * epoch))


def detail(trainer) -> str:
    """The progress line's end: step, loss, and the held-out acceptance length and acceptance per position (vLLM's
    count replayed, trainer.replay_rounds)."""
    train, held = trainer.history["train"], trainer.history["heldout"]
    loss = f"loss {train[-1]['loss']:.3f}" if train else ""
    acc = (f", held-out acceptance {held[-1]['acceptance']:.2f} tokens per step (before "
           f"{held[0]['acceptance']:.2f}), accepted per position "
           f"{' '.join(f'{a:.2f}' for a in held[-1].get('per_position', []))}") if held else ""
    return f"step {trainer.step}, {loss}{acc}"


def report(trainer, rank: int, final: bool) -> None:
    """The step's metrics and checkpoint (the trainer's state); the final one also holds the whole draft."""
    metrics = {"step": trainer.step, "loss": trainer.history["train"][-1]["loss"],
               "heldout_acceptance": trainer.history["heldout"][-1]["acceptance"]}
    ray_train.report(metrics, rank, trainer.state_dict,
                     {DRAFT_NAME: lambda path: save_draft(trainer.draft, path)} if final else None)


def save_draft(draft, path: Path) -> None:
    """Every tensor of the draft that its folder keeps (speculators' save list: not the verifier's norm and head)."""
    from safetensors.torch import save_file

    skip = set(draft._keys_to_ignore_on_save or [])  # noqa: SLF001
    save_file({k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items() if k not in skip}, str(path))
