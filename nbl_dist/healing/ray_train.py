"""Healing on Ray Train: a TorchTrainer whose workers each run `heal_loop` (docs/method.md §12).

`heal_loop` is a plain function of its config: it builds HealModel and Healer, takes its share of each global
batch (the order of the training blocks is fixed by the seed, the same on every worker and after a restart),
measures the held-out KL divergence before, every --eval-every steps and after, prints a progress line (rank 0),
and every --checkpoint-every steps reports a checkpoint through `ray.train.report`: the Healer's state (maps,
AdamW, schedule, step, history), written by rank 0. Ray Train restarts the workers from the latest checkpoint
when one dies (FailureConfig), and a run started again under the same name and storage continues from it (a
stopped driver). The last checkpoint also holds the merged maps (writer.MAPS_NAME), which the driver writes into
the healed folder. With ray_cluster.py, the healing module that imports Ray.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from nbl_dist.healing.writer import MAPS_NAME

STATE_NAME = "healer.pt"
# Where a worker's progress lines go: its process's own stdout, which Ray forwards to the driver once. Ray Train's
# print patch sends what is printed to sys.stdout both to that stream and to its logger, which Ray forwards too.
WORKER_OUT = sys.__stdout__


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


def step_blocks(order: torch.Tensor, step: int, batch_size: int, rank: int, workers: int) -> torch.Tensor:
    """Indices of the training blocks this worker takes at `step`: its contiguous share of the global batch."""
    batch = order[step * batch_size:(step + 1) * batch_size]
    share = batch_size // workers
    return batch[rank * share:(rank + 1) * share]


def heal_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray
    import ray.train
    import ray.train.torch

    from nbl_dist.healing.model import HealModel
    from nbl_dist.healing.trainer import Healer, world
    from nbl_dist.progress import Progress
    from nbl_dist.safetensors_io import torch_dtype

    cfg = LoopConfig(**config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, workers = world()
    device = ray.train.torch.get_device()
    blocks = ray.get(cfg.blocks)
    mesh = None
    if cfg.shard_weights and workers > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (workers,))
    model = HealModel(cfg.baseline, cfg.model, cfg.layers, torch_dtype(cfg.dtype), device, cfg.lora_rank,
                      cfg.lora_alpha, cfg.seed, mesh=mesh)
    healer = Healer(model, loss=cfg.loss, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                    warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            healer.load_state_dict(torch.load(Path(folder) / STATE_NAME, weights_only=False))
        if rank == 0:
            print(f"healing: resumed from the checkpoint of step {healer.step}", file=WORKER_OUT, flush=True)
    kl_blocks, train_blocks = blocks["kl"], blocks["train"]
    if healer.step == 0:
        healer.heldout(kl_blocks, cfg.batch_size)  # before any step
    order = torch.randperm(train_blocks.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    progress = Progress(cfg.steps * tokens_per_step, label="healing", stream=WORKER_OUT,
                        done=healer.step * tokens_per_step, detail=lambda: detail(healer)) if rank == 0 \
        else (lambda tokens: None)
    positions = cfg.batch_size * (cfg.seq_len - 1)
    while healer.step < cfg.steps:
        mine = step_blocks(order, healer.step, cfg.batch_size, rank, workers)
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
    """ray.train.report from every worker; rank 0 attaches the checkpoint (the state is the same everywhere), and
    the final one also the merged maps under their checkpoint keys."""
    import ray.train
    from safetensors.torch import save_file

    last = healer.history["train"][-1]
    metrics = {"step": healer.step, "loss": last["loss"], "heldout_kl": healer.history["heldout"][-1]["kl"]}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(healer.state_dict(), Path(tmp) / STATE_NAME)
        if final:
            maps = healer.model.merged_maps()
            tensors = {}
            for i, (w_key, b_key) in zip(cfg.layers, cfg.map_keys):
                tensors[w_key], tensors[b_key] = maps[i][0].contiguous(), maps[i][1].contiguous()
            save_file(tensors, str(Path(tmp) / MAPS_NAME))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train(cfg: LoopConfig, *, workers: int, use_gpu: bool, cpus_per_worker: float, storage: Path, name: str,
          max_failures: int):
    """Run the TorchTrainer (gloo on CPU, NCCL on GPUs) and return its Result; raises the training's error."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        heal_loop, train_loop_config={f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    return trainer.fit()
