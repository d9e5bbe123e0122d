"""ShardStats: the statistics of a range of decoder layers and what is done with them where they live.

It holds each layer's LayerStats, the ids of the micro-batches they contain, and the fitted maps until they are
handed over; it scores, fits, exports and merges one layer at a time, and snapshots and restores itself. The
in-process backend keeps one for the whole model, every ShardWorker one for its layers. Plain torch, no Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nbl_dist.calibration import resume
from nbl_dist.core.linalg import LayerScores, LinearFit, layer_scores, lmmse_fit
from nbl_dist.core.stats import LayerStats


class ShardStats:
    """Statistics of layers [start, end), float64 on `device`.

    Args:
        start, end: the layer range.
        hidden_size: d.
        device: where the statistics and the fits live.
    """

    def __init__(self, start: int, end: int, hidden_size: int, device: torch.device | str = "cpu"):
        self.start, self.end, self.device = start, end, torch.device(device)
        self.layers: dict[int, LayerStats] = {i: LayerStats.empty(hidden_size, self.device) for i in range(start, end)}
        # Micro-batch ids whose activations are in the statistics: a replayed id is forwarded, not counted again.
        self.done: set[int] = set()
        self.fits: dict[int, LinearFit] = {}

    def holds(self, batch_id: int) -> bool:
        """Whether micro-batch `batch_id` is already in the statistics (a replay after a restart)."""
        return batch_id >= 0 and batch_id in self.done

    def mark_done(self, batch_id: int) -> None:
        """Micro-batch `batch_id` is now in the statistics (ids below 0 are not tracked)."""
        if batch_id >= 0:
            self.done.add(batch_id)

    # ---------------------------------------------------------------- rank and fit
    def scores(self, ridge: float | None = None) -> list[LayerScores]:
        """Every ranking score of every layer held here, in layer order: scalars only."""
        return [layer_scores(i, s, ridge) for i, s in sorted(self.layers.items())]

    def fit(self, layers: list[int], ridge: float | None = None) -> dict[int, float]:
        """Fit the LMMSE maps of `layers` (held here); they stay until handed over. Returns layer -> ridge."""
        for i in layers:
            self.fits[i] = lmmse_fit(self.layers[i], ridge)
        return {i: self.fits[i].ridge for i in layers}

    def pop_fit(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand over one layer's (W (d, d), b (d,)) on the host, and let go of it here."""
        f = self.fits.pop(layer)
        return f.weight.cpu(), f.bias.cpu()

    # ---------------------------------------------------------------- replicas
    def export_layer(self, layer: int) -> dict[str, np.ndarray]:
        """One layer's statistics as numpy, for a merge on another actor through the object store."""
        return self.layers[layer].to_numpy()

    def merge_layer(self, layer: int, arrays: dict[str, np.ndarray]) -> int:
        """Chan-merge another replica's statistics of `layer` into these. Returns the merged token count.

        The incoming arrays are read where they are (no copy on the host; one copy onto a GPU), so a call holds
        one layer's extra statistics."""
        self.layers[layer].merge_(LayerStats.from_numpy(arrays, self.device, copy=False))
        return self.layers[layer].n

    # ---------------------------------------------------------------- snapshots
    def save(self, path: Path, fingerprint: str) -> None:
        resume.save_snapshot(path, self.layers, self.done, (self.start, self.end), fingerprint)

    def restore(self, path: Path, fingerprint: str) -> int:
        """Load the snapshot at path, if there is one. Returns the number of micro-batches it holds."""
        saved = resume.load_snapshot(path, (self.start, self.end), fingerprint, self.device)
        if saved is not None:
            self.layers, self.done = saved
        return len(self.done)
