"""The backend contract: the phases every backend runs, and the typed results they return.

Two backends keep it: `InProcessBackend` (calibration/local.py: the whole model in this process, the reference)
and `RayBackend` (calibration/ray/backend.py: ShardWorker actors on a cluster). The pipeline talks to this interface
only, so a result never depends on which one ran it (docs/method.md §9).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import torch

from nbl_dist.core.linalg import LayerScores
from nbl_dist.core.selection import SetMeasure
from nbl_dist.runtime.progress import RunProgress


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one worker runs and what it loaded."""

    replica: int
    stage: int
    layers: tuple[int, int]  # [start, end)
    node: str  # Ray node id, or "local"
    device: str
    embed: bool = False
    host: str = ""
    pid: int = 0
    bytes_read: int = 0
    keys: tuple[str, ...] = ()  # checkpoint tensors read (left out of the report)

    def to_report(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("keys")
        d["layers"] = list(self.layers)
        return d


@dataclasses.dataclass(frozen=True)
class WorkerReport:
    """What one worker spent (seconds), sent (bytes), did and held at its peak."""

    replica: int
    stage: int
    timings: dict[str, float]
    bytes_out: int
    peak_rss_bytes: int
    batches: int = 0
    restored_batches: int = 0
    replayed_forward: int = 0
    peak_gpu_bytes: int | None = None

    def to_report(self) -> dict:
        d = dataclasses.asdict(self)
        if d["peak_gpu_bytes"] is None:
            del d["peak_gpu_bytes"]
        return d


@dataclasses.dataclass(frozen=True)
class StreamResult:
    """The statistics pass: tokens accumulated and what it took to get them there."""

    tokens: int
    stream_s: float | None = None  # wall time of the pass, seen by the driver (Ray)
    driver_wait_s: float | None = None  # of it, time the driver waited on results (Ray)
    restored_batches: int = 0  # micro-batches already in a restored snapshot, not sent again
    replayed_batches: int = 0  # micro-batches sent again after an actor died
    actor_restarts: int = 0

    def timings(self) -> dict[str, float]:
        return {k: v for k, v in (("stream_s", self.stream_s), ("driver_wait_s", self.driver_wait_s))
                if v is not None}

    def recovery(self) -> dict[str, int]:
        return {"restored_batches": self.restored_batches, "replayed_batches": self.replayed_batches,
                "actor_restarts": self.actor_restarts}


Fit = tuple[torch.Tensor, torch.Tensor]  # (W (d, d), b (d,)), float64, on the host


class Backend(Protocol):
    """stream -> reduce -> scores -> fit [-> loss_scores | measure_sets ...] -> get_fit ... -> worker_reports -> close."""

    name: str
    placement: list[Placement]
    progress: RunProgress  # the progress lines (and, on Ray, metrics) of the run's long phases

    def stream(self, blocks: torch.Tensor, batch_size: int,
               progress: Callable[[int], None] | None = None) -> StreamResult:
        """Accumulate every layer's statistics over blocks (N, T) of token ids, in micro-batches."""

    def reduce(self) -> None:
        """Merge the statistics of replicas of the same layer (Chan's update, docs/method.md §3)."""

    def scores(self, ridge: float | None = None) -> list[LayerScores]:
        """Every ranking score of every layer, in layer order."""

    def fit(self, layers: list[int], ridge: float | None = None) -> dict[int, float]:
        """Fit the LMMSE maps of `layers` where their statistics live; returns layer -> ridge used."""

    def loss_scores(self, score_blocks: torch.Tensor, batch_size: int) -> dict[int, float]:
        """Mean next-token loss increase on held-back blocks with each fitted layer alone linearized."""

    def measure_sets(self, sets: list[tuple[int, ...]], score_blocks: torch.Tensor,
                     batch_size: int) -> list[SetMeasure]:
        """Each set's layers linearized together with their fitted maps (fit their union first), measured on
        held-back blocks: mean next-token loss, and KL divergence from the original when the empty set () (the
        original model) is among the sets."""

    def get_fit(self, layer: int) -> Fit:
        """Hand over one fitted layer's (W, b) (once: the backend lets go of it)."""

    def worker_reports(self) -> list[WorkerReport]:
        ...

    def recovery(self) -> dict:
        """Actor restarts (in all, and by phase) and the seconds spent bringing actors back."""

    def close(self) -> None:
        ...
