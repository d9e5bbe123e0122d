"""Healing on Ray Train: a TorchTrainer whose workers each run `heal_loop` (docs/method.md §12).

`heal_loop` is a plain function of its config: it builds HealModel and Healer, takes its share of each global
batch (the order of the training blocks is fixed by the seed, the same on every worker and after a restart),
measures the held-out KL divergence before, every --eval-every steps and after, prints a progress line (rank 0),
and every --checkpoint-every steps reports a checkpoint through `ray.train.report`: the Healer's state (maps,
AdamW, schedule, step, history), written by rank 0. Ray Train restarts the workers from the latest checkpoint
when one dies (FailureConfig), and a run started again under the same name and storage continues from it (a
stopped driver). The last checkpoint also holds the merged maps (writer.MAPS_NAME), which the driver writes into
the healed folder. Ray Train itself is behind training/ray_train.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from nbl_dist.healing.writer import MAPS_NAME
from nbl_dist.training import ray_train


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What every worker needs, as plain values (unpacked from HealConfig by the pipeline)."""

    baseline: str
    model: str
    layers: list[int]
    map_keys: list[tuple[str, str]]  # layer order: (W key, b key)
    dtype: str
    loss: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    steps: int
    batch_size: int  # global
    seq_len: int
    eval_every: int
    checkpoint_every: int
    lora_rank: int | None
    lora_alpha: float | None
    seed: int
    threads: int | None
    shard_weights: bool  # FSDP2 over the workers (HealModel's mesh)
    blocks: object  # ray.ObjectRef of {"train": (N, T), "kl": (M, T)} int64 tensors


def heal_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    from nbl_dist.healing.model import HealModel
    from nbl_dist.healing.trainer import Healer
    from nbl_dist.model.safetensors_io import torch_dtype
    from nbl_dist.training.distributed import step_share

    cfg = LoopConfig(**config)
    rank, workers, device = ray_train.start_worker(cfg.threads)
    blocks = ray_train.fetch(cfg.blocks)
    mesh = None
    if cfg.shard_weights and workers > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (workers,))
    model = HealModel(cfg.baseline, cfg.model, cfg.layers, torch_dtype(cfg.dtype), device, cfg.lora_rank,
                      cfg.lora_alpha, cfg.seed, mesh=mesh)
    healer = Healer(model, loss=cfg.loss, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                    warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    ray_train.resume(healer, "healing", rank)
    kl_blocks, train_blocks = blocks["kl"], blocks["train"]
    if healer.step == 0:
        healer.heldout(kl_blocks, cfg.batch_size)  # before any step
    order = torch.randperm(train_blocks.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    progress = ray_train.progress(cfg.steps * tokens_per_step, healer.step * tokens_per_step, "healing", rank,
                                  lambda: detail(healer))
    positions = cfg.batch_size * (cfg.seq_len - 1)
    while healer.step < cfg.steps:
        mine = step_share(order, healer.step, cfg.batch_size, rank, workers)
        healer.train_step(train_blocks[mine], positions)
        if healer.step % cfg.eval_every == 0 or healer.step == cfg.steps:
            healer.heldout(kl_blocks, cfg.batch_size)
        progress(tokens_per_step)
        if healer.step % cfg.checkpoint_every == 0 or healer.step == cfg.steps:
            report(healer, cfg, rank, final=healer.step == cfg.steps)


def detail(healer) -> str:
    """The progress line's end: step, loss, held-out KL now and before."""
    train, held = healer.history["train"], healer.history["heldout"]
    loss = f"loss {train[-1]['loss']:.4f}" if train else ""
    kl = f", held-out KL {held[-1]['kl']:.4f} (before {held[0]['kl']:.4f})" if held else ""
    return f"step {healer.step}, {loss}{kl}"


def report(healer, cfg: LoopConfig, rank: int, final: bool) -> None:
    """The step's metrics and checkpoint (the Healer's state); the final one also holds the merged maps under their
    checkpoint keys (MAPS_NAME)."""
    last = healer.history["train"][-1]
    metrics = {"step": healer.step, "loss": last["loss"], "heldout_kl": healer.history["heldout"][-1]["kl"]}
    ray_train.report(metrics, rank, healer.state_dict, {MAPS_NAME: lambda path: save_maps(healer, cfg, path)}
                     if final else None)


def save_maps(healer, cfg: LoopConfig, path: Path) -> None:
    """The trained maps (float32, LoRA merged) under their checkpoint keys, in layer order."""
    from safetensors.torch import save_file

    maps = healer.model.merged_maps()
    tensors = {}
    for i, (w_key, b_key) in zip(cfg.layers, cfg.map_keys):
        tensors[w_key], tensors[b_key] = maps[i][0].contiguous(), maps[i][1].contiguous()
    save_file(tensors, str(path))
