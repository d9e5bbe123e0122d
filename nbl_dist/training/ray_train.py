"""Ray Train for nbl-dist's training workflows (healing; drafting): the trainer set-up, the checkpoint each report
carries, resuming from it, and where a run keeps them. Each workflow's loop stays a plain function of its config
(`train_loop_per_worker`) that calls these; gloo on CPUs, NCCL on GPUs; the same with one worker or many.

A checkpoint is a folder of STATE_NAME (the loop's state: trained tensors, optimizer, schedule, step, history),
written by rank 0 (every worker holds the same state), plus any files the loop adds to the last one. Ray Train
restarts the workers from the latest checkpoint when one dies (FailureConfig), and a run started again under the
same name and storage continues from it (a stopped driver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

STATE_NAME = "state.pt"
# Where a worker's progress lines go: its process's own stdout, which Ray forwards to the driver once. Ray Train's
# print patch sends what is printed to sys.stdout both to that stream and to its logger, which Ray forwards too.
WORKER_OUT = sys.__stdout__


def storage_folder(out: str | Path, storage: str | None, suffix: str) -> Path:
    """Where a run keeps its checkpoints: --storage, or `.OUT.<suffix>` beside --out; absolute (Ray Train refuses
    a relative path), and shared by every node on a cluster."""
    out = Path(out)
    return (Path(storage) if storage else out.parent / f".{out.name}.{suffix}").resolve()


def fit(loop: Callable[[dict], None], config, *, workers: int, use_gpu: bool, cpus_per_worker: float,
        storage: Path, name: str, max_failures: int):
    """Run `loop(config as a dict)` on a TorchTrainer's workers and return its Result (raises nothing: the caller
    checks result.error).

    Args:
        loop: the workflow's train_loop_per_worker.
        config: a dataclass of plain values (and object refs) every worker needs.
        workers, use_gpu, cpus_per_worker: the scaling.
        storage, name: where the run's checkpoints go, under which run name.
        max_failures: worker failures survived, each resumed from the last checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop, train_loop_config={f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    return trainer.fit()


def start_worker(threads: int | None) -> tuple[int, int, torch.device]:
    """(rank, workers, device) of this Ray Train worker, with torch's thread count set to its CPUs (CPU workers;
    None leaves it)."""
    from nbl_dist.training.distributed import world

    if threads:
        torch.set_num_threads(threads)
    rank, workers = world()
    return rank, workers, worker_device()


def resume(trainer, label: str, rank: int) -> None:
    """Load the latest checkpoint's state into `trainer` (a TrainerState) when there is one (a worker restarted by
    Ray Train, or a run started again), and say so once (rank 0)."""
    state = restored_state()
    if state is None:
        return
    trainer.load_state_dict(state)
    if rank == 0:
        print(f"{label}: resumed from the checkpoint of step {trainer.step}", file=WORKER_OUT, flush=True)


def progress(total_tokens: int, done_tokens: int, label: str, rank: int, detail: Callable[[], str]) \
        -> Callable[[int], None]:
    """Rank 0's progress lines (runtime.progress.Progress on the worker's stdout); the other ranks' do nothing."""
    from nbl_dist.runtime.progress import Progress

    if rank != 0:
        return lambda tokens: None
    return Progress(total_tokens, label=label, stream=WORKER_OUT, done=done_tokens, detail=detail)


def run(loop: Callable[[dict], None], config, *, log: Callable[[str], None], storage: Path, name: str,
        **scaling) -> tuple[object, float]:
    """fit() announced in one log line and timed: (the finished run's Result, its seconds).

    Raises:
        the run's own error (a worker's exception once --max-failures are spent).
    """
    log(f"  Ray Train run {name!r} in {storage} (a rerun of this command resumes it)")
    t0 = time.perf_counter()
    result = fit(loop, config, storage=storage, name=name, **scaling)
    if result.error:
        raise result.error
    return result, time.perf_counter() - t0


def saved_history(folder: Path) -> dict:
    """The history (training and held-out measurements) in a checkpoint folder's state."""
    return torch.load(folder / STATE_NAME, weights_only=False)["history"]


def worker_device() -> torch.device:
    """This worker's device (its GPU, or the CPU)."""
    import ray.train.torch

    return ray.train.torch.get_device()


def fetch(ref):
    """An object the driver put in Ray's object store (the token blocks), in this worker."""
    import ray

    return ray.get(ref)


def restored_state() -> dict | None:
    """The loop's state from the latest checkpoint (after a restart, or in a run started again), else None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_NAME, weights_only=False)


def report(metrics: dict, rank: int, state: Callable[[], dict],
           files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """ray.train.report from every worker; rank 0 attaches the checkpoint: state() saved as STATE_NAME, and each of
    `files` (name -> a function that writes it to the given path)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state(), Path(tmp) / STATE_NAME)
        for name, write in (files or {}).items():
            write(Path(tmp) / name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@contextlib.contextmanager
def final_checkpoint(result) -> Iterator[Path]:
    """The folder of a finished run's last checkpoint, for the duration of the block."""
    with result.checkpoint.as_directory() as folder:
        yield Path(folder)


def clear_run(storage: Path, name: str) -> None:
    """Remove a finished run's checkpoints (and the storage folder, once empty): its result is in the output now."""
    shutil.rmtree(storage / name, ignore_errors=True)
    if storage.is_dir() and not any(storage.iterdir()):
        storage.rmdir()
