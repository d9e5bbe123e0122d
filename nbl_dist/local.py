"""The single-process backend: the whole model in this process, every layer's statistics captured with hooks.

It is the reference the Ray pipeline must agree with, and the backend that runs without Ray at all (a laptop, a
single GPU, a debugging session). Same interface as RayBackend: stream -> scores -> fit -> get_fit -> close.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from nbl_dist.arch import adapter_for
from nbl_dist.capture import capture_stats
from nbl_dist.linalg import LayerScores, LinearFit, layer_scores, lmmse_fit
from nbl_dist.stats import LayerStats


class InProcessBackend:
    """Calibrate a whole model in this process.

    Args:
        model_dir: Hugging Face checkpoint folder (safetensors).
        dtype: forward dtype.
        device: torch device for the forward and the statistics.
        model: an already-loaded model to use instead of reading model_dir (tests, notebooks).
    """

    name = "in-process"

    def __init__(self, model_dir: str | Path | None, dtype: torch.dtype, device: str | torch.device = "cpu",
                 model: torch.nn.Module | None = None):
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.adapter = adapter_for(self.model.config)
        layers = self.adapter.layers(self.model)
        d = self.model.config.hidden_size
        self.stats = {i: LayerStats.empty(d, self.device) for i in range(len(layers))}
        self.fits: dict[int, LinearFit] = {}
        self.timings = {"load": time.perf_counter() - t0, "forward": 0.0}
        self.placement = [{"replica": 0, "stage": 0, "layers": [0, len(layers)], "node": "local",
                           "device": str(self.device)}]

    @torch.no_grad()
    def stream(self, blocks: torch.Tensor, batch_size: int,
               progress: Callable[[int], None] | None = None) -> dict:
        """Run every block through the model, accumulating statistics. blocks: (N, T) token ids."""
        layers = dict(enumerate(self.adapter.layers(self.model)))
        decoder = self.adapter.decoder(self.model)
        timer = {"statistics": 0.0}
        with capture_stats(layers, self.stats, self.adapter, timer=timer):
            for start in range(0, blocks.shape[0], batch_size):
                batch = blocks[start:start + batch_size].to(self.device)  # (B, T)
                t0 = time.perf_counter()
                decoder(input_ids=batch, use_cache=False)
                self.timings["forward"] += time.perf_counter() - t0
                if progress:
                    progress(batch.numel())
        self.timings["statistics"] = timer["statistics"]
        self.timings["forward"] -= timer["statistics"]  # the hooks ran inside the forward
        return {"tokens": int(blocks.numel()), "timings": dict(self.timings)}

    def reduce(self) -> None:
        """Nothing to merge: one process holds every layer's statistics."""

    def worker_reports(self) -> list[dict]:
        import resource

        return [{"replica": 0, "stage": 0, "timings": dict(self.timings), "bytes_out": 0,
                 "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}]

    def scores(self, ridge: float | None = None) -> list[LayerScores]:
        return [layer_scores(i, s, ridge) for i, s in sorted(self.stats.items())]

    def fit(self, layers: list[int], ridge: float | None = None) -> dict[int, float]:
        """Fit the LMMSE map of each layer; returns layer -> ridge used."""
        for i in layers:
            self.fits[i] = lmmse_fit(self.stats[i], ridge)
        return {i: self.fits[i].ridge for i in layers}

    @torch.no_grad()
    def loss_scores(self, score_blocks: torch.Tensor, batch_size: int) -> dict[int, float]:
        """Mean next-token loss increase on held-back blocks with each layer alone linearized (fits needed)."""
        from nbl_dist.evaluate import loss_sum
        from nbl_dist.linearized import linearize_layer

        layers = self.adapter.layers(self.model)
        base, tokens = loss_sum(self.model, score_blocks, batch_size)
        out = {}
        for i, fit in sorted(self.fits.items()):
            original = layers[i]
            new = linearize_layer(original, i, self.model.config.hidden_size)
            new.nbl_linear.weight.copy_(fit.weight)
            new.nbl_linear.bias.copy_(fit.bias)
            layers[i] = new
            try:
                out[i] = (loss_sum(self.model, score_blocks, batch_size)[0] - base) / tokens
            finally:
                layers[i] = original
        return out

    def get_fit(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.fits.pop(layer)
        return f.weight.cpu(), f.bias.cpu()

    def layer_stats(self, layer: int) -> LayerStats:
        return self.stats[layer]

    def close(self) -> None:
        self.model = None
