"""The single-process backend: the whole model in this process, every layer's statistics captured with hooks.

It is the reference the Ray pipeline must agree with, and the backend that runs without Ray at all (a laptop, a
single GPU, a debugging session). It keeps the Backend contract of calibration/backend.py.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nbl_dist.calibration.backend import Placement, StreamResult, WorkerReport
from nbl_dist.calibration.shard_stats import ShardStats
from nbl_dist.core.capture import capture_stats
from nbl_dist.core.linalg import LayerScores
from nbl_dist.core.losses import next_token_sums
from nbl_dist.core.selection import SetMeasure, increases, measure_of
from nbl_dist.model.arch import adapter_for
from nbl_dist.model.surgery import linearized_in_place
from nbl_dist.runtime.progress import RunProgress


class InProcessBackend:
    """Calibrate a whole model in this process.

    Args:
        model_dir: Hugging Face checkpoint folder (safetensors).
        dtype: forward dtype.
        device: torch device for the forward and the statistics.
        model: an already-loaded model to use instead of reading model_dir (tests, notebooks).
        stats_precision: how the statistics' Gram products are formed (stats.PRECISIONS).
    """

    name = "in-process"

    def __init__(self, model_dir: str | Path | None, dtype: torch.dtype, device: str | torch.device = "cpu",
                 model: torch.nn.Module | None = None, stats_precision: str = "fp32"):
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.stats_precision = stats_precision
        self.adapter = adapter_for(self.model.config)
        n_layers = len(self.adapter.layers(self.model))
        self.statistics = ShardStats(0, n_layers, self.model.config.hidden_size, self.device)
        self.timings = {"load": time.perf_counter() - t0, "forward": 0.0}
        self.placement = [Placement(replica=0, stage=0, layers=(0, n_layers), node="local", device=str(self.device))]
        self.progress = RunProgress()

    @property
    def fits(self):
        """layer -> LinearFit, until handed over."""
        return self.statistics.fits

    @torch.no_grad()
    def stream(self, blocks: torch.Tensor, batch_size: int,
               progress: Callable[[int], None] | None = None) -> StreamResult:
        """Run every block through the model, accumulating statistics. blocks: (N, T) token ids."""
        layers = dict(enumerate(self.adapter.layers(self.model)))
        decoder = self.adapter.decoder(self.model)
        timer = {"statistics": 0.0}
        with capture_stats(layers, self.statistics.layers, self.adapter.attention, timer=timer,
                           precision=self.stats_precision):
            for start in range(0, blocks.shape[0], batch_size):
                batch = blocks[start:start + batch_size].to(self.device)  # (B, T)
                t0 = time.perf_counter()
                decoder(input_ids=batch, use_cache=False)
                self.timings["forward"] += time.perf_counter() - t0
                if progress:
                    progress(batch.numel())
        self.timings["statistics"] = timer["statistics"]
        self.timings["forward"] -= timer["statistics"]  # the hooks ran inside the forward
        return StreamResult(tokens=int(blocks.numel()))

    def reduce(self) -> None:
        """Nothing to merge: one process holds every layer's statistics."""

    def scores(self, ridge: float | None = None) -> list[LayerScores]:
        return self.statistics.scores(ridge)

    def fit(self, layers: list[int], ridge: float | None = None) -> dict[int, float]:
        """Fit the LMMSE map of each layer; returns layer -> ridge used."""
        return self.statistics.fit(layers, ridge)

    def loss_scores(self, score_blocks: torch.Tensor, batch_size: int) -> dict[int, float]:
        """Mean next-token loss increase on held-back blocks with each layer alone linearized (fits needed)."""
        layers = sorted(self.fits)
        measured = self.measure_sets([(), *((i,) for i in layers)], score_blocks, batch_size)
        return dict(zip(layers, increases(measured)))

    @torch.no_grad()
    def measure_sets(self, sets: list[tuple[int, ...]], score_blocks: torch.Tensor,
                     batch_size: int) -> list[SetMeasure]:
        """Each set linearized together, measured on held-back blocks by a whole forward (the reference the Ray
        backend's stage-restarting pass must equal). The original () runs first when asked for: its final
        hidden states are the reference of every set's KL divergence."""
        decoder, head = self.adapter.decoder(self.model), self.model.get_output_embeddings()
        reference: dict[int, torch.Tensor] = {}  # batch start -> the original's final hidden states (B, T, d)
        out: dict[int, SetMeasure] = {}
        for n in sorted(range(len(sets)), key=lambda n: sets[n] != ()):
            parts = []
            with linearized_in_place(self.model, {i: (self.fits[i].weight, self.fits[i].bias) for i in sets[n]}):
                for start in range(0, score_blocks.shape[0], batch_size):
                    ids = score_blocks[start:start + batch_size].to(self.device)  # (B, T)
                    h = decoder(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, d), final norm applied
                    if sets[n] == ():
                        reference[start] = h
                    parts.append(next_token_sums(head, h, ids, reference.get(start) if sets[n] else None))
            out[n] = measure_of(parts, original=sets[n] == ())
        return [out[n] for n in range(len(sets))]

    def get_fit(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.statistics.pop_fit(layer)

    def worker_reports(self) -> list[WorkerReport]:
        return [WorkerReport(replica=0, stage=0, timings=dict(self.timings), bytes_out=0,
                             peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)]

    def recovery(self) -> dict:
        """Nothing to restart: no actors."""
        return {"actor_restarts": 0, "restarts_by_phase": {}, "restart_wait_s": 0.0}

    def close(self) -> None:
        self.model = None
