"""ShardWorker: one contiguous range of decoder layers of one pipeline replica, run on the micro-batches that
stream through it, accumulating each layer's statistics in place.

A facade over three parts, each with one job: ShardModel (its layers, read alone from the checkpoint, and the
forward), ShardStats (the statistics and what is done with them) and SetCandidates (the measured rules' layer
sets linearized together on held-back blocks: their loss and KL divergence from the original). An ordinary class:
unit tests drive it directly, and the Ray backend wraps it as an actor. It never imports Ray. Activations enter and
leave as numpy arrays (zero-copy through Ray's object store); bf16 travels as its raw 16-bit pattern, since numpy has
no bfloat16.
"""

from __future__ import annotations

import os
import resource
import socket
import time
import warnings

import numpy as np
import torch
from torch import nn

from nbl_dist.calibration import resume
from nbl_dist.calibration.backend import Placement, WorkerReport
from nbl_dist.calibration.shard_stats import ShardStats
from nbl_dist.core.capture import capture_stats
from nbl_dist.model.safetensors_io import torch_dtype
from nbl_dist.model.shard_model import ShardModel
from nbl_dist.model.surgery import linearize_layer

Wire = dict  # {"data": np.ndarray, "dtype": str}: activations between stages


def to_wire(t: torch.Tensor) -> Wire:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return {"data": t.view(torch.int16).numpy(), "dtype": "bfloat16"}
    return {"data": t.numpy(), "dtype": str(t.dtype).removeprefix("torch.")}


def readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a numpy array without copying. Ray hands out zero-copy, read-only arrays; nothing here
    writes into its inputs (every op makes a new tensor), so torch's warning about them does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(a))


def from_wire(w: Wire, device: torch.device) -> torch.Tensor:
    t = readonly_tensor(w["data"])
    if w["dtype"] == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device)


class SetCandidates:
    """For the measured rules: layers of the shard linearized with their fitted maps (each sharing its layer's MLP
    block), and each held-back block's input to this stage from the base pass."""

    def __init__(self, model: ShardModel):
        self.model = model
        self.maps: dict[int, nn.Module] = {}  # layer -> that layer linearized
        self.inputs: dict[int, torch.Tensor] = {}  # held-back block -> this stage's input
        self.reference: dict[int, torch.Tensor] = {}  # held-back block -> the original's output (last stage)

    def set(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        m = self.model
        self.maps[layer] = linearize_layer(m.layers[layer], layer, m.adapter, m.config.hidden_size, (weight, bias))

    def map_of(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        lin = self.maps[layer].nbl_linear
        return lin.weight, lin.bias

    def run(self, key: int, h: torch.Tensor | None, layers: tuple[int, ...], cache: bool) -> torch.Tensor:
        """This stage's forward of held-back block `key`, with those of `layers` this shard holds linearized.

        Without h, the input cached under `key` is used (a candidate restarting at this stage). With h, that
        input is used, and kept under `key` only when `cache` (the base pass): a candidate's modified
        activations flowing downstream must never replace the input a later candidate restarts from."""
        if h is None:
            h = self.inputs[key]
        elif cache:
            self.inputs[key] = h
        m = self.model
        return m.forward(h, replace={i: self.maps[i] for i in layers if m.start <= i < m.end})

    def head_sums(self, key: int, h: torch.Tensor, ids: torch.Tensor, original: bool) -> dict:
        """The last stage: summed loss of block `key` and, once the original's output for it is known, the KL
        divergence from it. The original's own output (`original`: no layer linearized) becomes that reference."""
        if original:
            self.reference[key] = h
        return self.model.head_sums(h, ids, None if original else self.reference.get(key))

    def clear(self) -> None:
        self.maps.clear()
        self.inputs.clear()
        self.reference.clear()


class WorkerMeter:
    """What a worker spent (seconds), sent (bytes) and did: the timings and counters of its report."""

    def __init__(self, read_s: float):
        # load: the whole constructor; read: the weights alone (the rest is mostly transformers' module imports)
        self.timings = {"load": 0.0, "read": read_s, "forward": 0.0, "statistics": 0.0, "wait": 0.0,
                        "checkpoint": 0.0, "calls": 0}
        self.bytes_out = self.batches = self.replayed_forward = 0
        self._last_return: float | None = None

    def call_starts(self) -> float:
        """A micro-batch arrives: the time since the last one left counts as waiting. Returns now."""
        now = time.perf_counter()
        if self._last_return is not None:
            self.timings["wait"] += now - self._last_return
        return now

    def call_ends(self, started: float, computed: float, statistics: float, replay: bool, bytes_out: int) -> None:
        """It leaves: `computed` is when its forward (statistics included) finished."""
        self.timings["statistics"] += statistics
        self.timings["forward"] += computed - started - statistics
        self.timings["calls"] += 1
        self.batches += 1
        self.replayed_forward += replay
        self.bytes_out += bytes_out
        self._last_return = time.perf_counter()


class ShardWorker:
    """Holds decoder layers [start, end) of one pipeline replica.

    Args:
        model_dir, start, end, embed: the shard (see ShardModel); every node must see model_dir at this path.
        dtype, device: forward dtype name ("float32", "bfloat16", ...) and "cpu" or "cuda" (Ray's GPU).
        stats_device: where the float64 statistics live (default: device).
        stats_precision: how the statistics' Gram products are formed (stats.PRECISIONS).
        replica, stage: this worker's coordinates, for the report.
        num_threads: torch intra-op threads (match the CPUs reserved for the actor).
        checkpoint_dir, checkpoint_every, fingerprint: this worker's snapshots (see resume.SnapshotSchedule).
        restore: start from this worker's snapshot in checkpoint_dir, if there is one.
    """

    def __init__(self, model_dir: str, start: int, end: int, *, embed: bool, dtype: str = "float32",
                 device: str = "cpu", stats_device: str | None = None, replica: int = 0, stage: int = 0,
                 num_threads: int | None = None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 restore: bool = False, fingerprint: str = "", stats_precision: str = "fp32"):
        t0 = time.perf_counter()
        if num_threads:
            torch.set_num_threads(num_threads)
        self.replica, self.stage, self.device = replica, stage, torch.device(device)
        self.stats_precision = stats_precision
        self.model = ShardModel(model_dir, start, end, embed=embed, dtype=torch_dtype(dtype), device=self.device)
        self.statistics = ShardStats(start, end, self.model.config.hidden_size, stats_device or device)
        self.candidates = SetCandidates(self.model)
        self.meter = WorkerMeter(self.model.read_s)
        self.snapshots = resume.SnapshotSchedule(checkpoint_dir, replica, stage, fingerprint, checkpoint_every)
        self.restored_batches = self.snapshots.restore(self.statistics) if restore else 0
        self.meter.timings["load"] = time.perf_counter() - t0

    @property
    def stats(self):  # layer -> LayerStats of this shard
        return self.statistics.layers

    @property
    def bytes_read(self) -> int:
        return self.model.bytes_read

    def info(self) -> Placement:
        """Where this worker runs and what it loaded (for the plan printout and the report)."""
        m = self.model
        return Placement(replica=self.replica, stage=self.stage, layers=(m.start, m.end), node="local",
                         device=str(self.device), embed=m.embed_tokens is not None, host=socket.gethostname(),
                         pid=os.getpid(), bytes_read=m.bytes_read, keys=tuple(m.loaded_keys))

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def run_batch(self, inp, last: bool = False, batch_id: int = -1):
        """Run this shard's layers on one micro-batch, accumulating statistics unless it holds it already.

        Args:
            inp: (B, T) int64 token ids (numpy) on the first stage, else a Wire of (B, T, d) hidden states.
            last: return only a receipt instead of the activations (nothing downstream needs them).
        Returns:
            Wire of (B, T, d) hidden states, or {"tokens": B*T, "batch": batch_id} when last.
        """
        started = self.meter.call_starts()
        h, counted, stats_s = self._forward_counted(self._input(inp), batch_id)  # (B, T, d)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        computed = time.perf_counter()
        out = {"tokens": h.shape[0] * h.shape[1], "batch": batch_id} if last else to_wire(h)
        if counted and batch_id >= 0 and self.snapshots.counted():
            self.checkpoint()
        self.meter.call_ends(started, computed, stats_s, not counted, 0 if last else out["data"].nbytes)
        return out

    def _forward_counted(self, h: torch.Tensor, batch_id: int) -> tuple[torch.Tensor, bool, float]:
        """The shard's forward of h, its activations counted into the statistics unless these hold batch_id
        already (a replay after a restart). Returns (output, counted, seconds spent on statistics)."""
        if self.statistics.holds(batch_id):
            return self.model.forward(h), False, 0.0
        timer = {"statistics": 0.0}
        with capture_stats(self.model.layers, self.stats, self.model.adapter.attention,
                           tag=f" (micro-batch {batch_id})", timer=timer, precision=self.stats_precision):
            h = self.model.forward(h)
        self.statistics.mark_done(batch_id)
        return h, True, timer["statistics"]

    def _input(self, inp) -> torch.Tensor:
        """(B, T, d) hidden states: embedded token ids on the first stage, the upstream output elsewhere."""
        if self.model.embed_tokens is not None:
            return self.model.embed(readonly_tensor(inp))
        return from_wire(inp, self.device)

    def done_batches(self) -> list[int]:
        return sorted(self.statistics.done)

    def pid(self) -> int:
        return os.getpid()

    def checkpoint(self) -> str | None:
        """Snapshot statistics and done ids (atomically); None when no checkpoint folder was given."""
        path = self.snapshots.save(self.statistics)
        self.meter.timings["checkpoint"] = self.snapshots.seconds
        return path

    # ------------------------------------------------------------------ the measured rules (loss, auto, greedy)
    def load_head(self, model_dir: str) -> int:
        return self.model.load_head(model_dir)

    @torch.no_grad()
    def score_batch(self, key: int, inp=None, layers: tuple[int, ...] = (), ids=None, cache: bool = False):
        """Forward of a held-back block for the measured rules (SetCandidates.run); no statistics are touched.
        The last stage (given ids) returns the summed loss and KL divergence (SetCandidates.head_sums), the
        others their output."""
        h = self.candidates.run(key, None if inp is None else self._input(inp), tuple(layers), cache)
        if ids is None:
            return to_wire(h)
        return self.candidates.head_sums(key, h, readonly_tensor(ids), original=not layers)

    def prepare_candidates(self, layers: list[int]) -> int:
        """Linearize each of `layers` with its fitted map (forward dtype, on the device), for candidate passes."""
        for i in layers:
            self.candidates.set(i, self.statistics.fits[i].weight, self.statistics.fits[i].bias)
        return len(layers)

    def candidate_map(self, layer: int) -> tuple[Wire, Wire]:
        return tuple(to_wire(t) for t in self.candidates.map_of(layer))

    def set_candidate(self, layer: int, wb: tuple) -> None:
        """Receive a candidate map fitted on another replica's actor (same layer range)."""
        self.candidates.set(layer, from_wire(wb[0], self.device), from_wire(wb[1], self.device))

    def clear_scoring(self) -> None:
        self.candidates.clear()

    # ------------------------------------------------------------------ reduce, rank, fit, report
    def export_layer(self, layer: int) -> dict[str, np.ndarray]:
        return self.statistics.export_layer(layer)

    def merge_layer(self, layer: int, arrays: dict[str, np.ndarray]) -> int:
        return self.statistics.merge_layer(layer, arrays)

    def scores(self, ridge: float | None = None):
        return self.statistics.scores(ridge)

    def fit(self, layers: list[int], ridge: float | None = None) -> dict[int, float]:
        return self.statistics.fit(layers, ridge)

    def get_fit(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return tuple(t.numpy() for t in self.statistics.pop_fit(layer))

    def report(self) -> WorkerReport:
        """Timings, bytes and peak memory of this worker."""
        m = self.meter
        return WorkerReport(
            replica=self.replica, stage=self.stage, timings=dict(m.timings), bytes_out=m.bytes_out,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
            batches=m.batches, restored_batches=self.restored_batches, replayed_forward=m.replayed_forward,
            peak_gpu_bytes=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None)
