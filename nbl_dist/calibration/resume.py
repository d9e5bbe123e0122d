"""Resuming a calibration: the run's fingerprint, the snapshot folder and its manifest, each actor's snapshot
file, and which micro-batches must be sent again after a restart.

A snapshot holds one actor's statistics and the ids of the micro-batches they contain, written atomically. A
restored actor forwards a micro-batch it already holds without counting it again, so replaying is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from nbl_dist.core.stats import LayerStats
from nbl_dist.errors import CheckpointError
from nbl_dist.model.safetensors_io import weight_map

MANIFEST = "manifest.json"


def run_fingerprint(model_dir: str | Path, blocks: torch.Tensor, stages: int, replicas: int, batch_size: int,
                    dtype: torch.dtype, stats_precision: str = "fp32") -> str:
    """Identifies what a snapshot's statistics depend on: the model, the exact token blocks, and the options
    that change what each actor accumulates (the statistics precision among them: a run must not mix them)."""
    h = hashlib.sha256()
    model = Path(model_dir)
    h.update((model / "config.json").read_bytes())
    for name, fname in sorted(weight_map(model).items()):
        h.update(f"{name}:{fname}:{(model / fname).stat().st_size};".encode())
    h.update(blocks.numpy().tobytes())
    h.update(json.dumps([list(blocks.shape), stages, replicas, batch_size, str(dtype), stats_precision]).encode())
    return h.hexdigest()[:32]


def default_folder(out: str | Path) -> Path:
    """.OUT.ckpt beside the output folder (the output folder itself stays atomic)."""
    final = Path(out)
    return final.parent / f".{final.name}.ckpt"


def open_folder(folder: Path, fingerprint: str, require: bool, options: dict, log) -> bool:
    """Prepare the run's snapshot folder. Returns True when it holds a matching run to resume.

    Args:
        require: --resume: refuse to start from nothing.
        options: what the manifest records of the run, to say what differs when a later run does not match.
    """
    manifest = folder / MANIFEST
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{folder} holds a checkpoint of a different run (model, token blocks, stages, replicas, batch "
                f"size, dtype or statistics precision differ: {saved.get('options')}); delete it, or pass "
                "another --checkpoint-dir")
        log(f"Resuming from the checkpoint in {folder}")
        return True
    if require:
        raise CheckpointError(f"--resume: there is no checkpoint in {folder} to resume from")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, **options}, indent=2))
    os.replace(tmp, manifest)
    return False


def snapshot_path(folder: str | Path, replica: int, stage: int) -> Path:
    return Path(folder) / f"replica{replica:03d}_stage{stage:03d}.safetensors"


def save_snapshot(path: Path, stats: dict[int, LayerStats], done: Iterable[int], layers: tuple[int, int],
                  fingerprint: str) -> None:
    """Statistics and done micro-batch ids in one file, atomically (temp file, fsync, rename)."""
    from safetensors.numpy import save_file

    arrays = {f"layer{i}.{k}": np.ascontiguousarray(v) for i, s in stats.items() for k, v in s.to_numpy().items()}
    meta = {"done": json.dumps(sorted(done)), "layers": f"{layers[0]},{layers[1]}", "fingerprint": fingerprint}
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata=meta)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_snapshot(path: Path, layers: tuple[int, int], fingerprint: str,
                  device: torch.device) -> tuple[dict[int, LayerStats], set[int]] | None:
    """(statistics by layer, done ids) from a snapshot, or None when there is none; a snapshot of another run
    or shard layout is refused."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        if meta.get("fingerprint") != fingerprint or meta.get("layers") != f"{layers[0]},{layers[1]}":
            raise CheckpointError(
                f"{path} was saved by a different run (model, data, options or shard layout differ); delete the "
                "checkpoint folder or use another --checkpoint-dir")
        stats = {}
        for i in range(*layers):
            prefix = f"layer{i}."
            arrays = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
            stats[i] = LayerStats.from_numpy(arrays, device=device)
    return stats, set(json.loads(meta["done"]))


def missing_batches(share: list[int], done_by_stage: list[Iterable[int]]) -> list[int]:
    """Micro-batches of a replica's share that some stage of it does not hold yet, in order: what a restarted
    replica must be sent (again)."""
    done = [set(d) for d in done_by_stage]
    return [k for k in share if any(k not in d for d in done)]


class SnapshotSchedule:
    """Where and how often one worker snapshots its statistics: after every `every` newly counted micro-batches
    (0: only when asked), into its own file of the run's folder (None: never)."""

    def __init__(self, folder: str | Path | None, replica: int, stage: int, fingerprint: str, every: int):
        self.path = snapshot_path(folder, replica, stage) if folder else None
        self.fingerprint, self.every = fingerprint, every
        self.since = 0  # micro-batches counted since the last snapshot
        self.seconds = 0.0  # time spent writing snapshots

    def counted(self) -> bool:
        """One more micro-batch is in the statistics; True when a snapshot is due."""
        self.since += 1
        return bool(self.every) and self.since >= self.every

    def save(self, stats) -> str | None:
        """Snapshot `stats` (a ShardStats); returns the file, or None without a folder."""
        if self.path is None:
            return None
        t0 = time.perf_counter()
        stats.save(self.path, self.fingerprint)
        self.since = 0
        self.seconds += time.perf_counter() - t0
        return str(self.path)

    def restore(self, stats) -> int:
        """Load this worker's snapshot into `stats`, if there is one; returns the micro-batches it holds."""
        return stats.restore(self.path, self.fingerprint) if self.path else 0


