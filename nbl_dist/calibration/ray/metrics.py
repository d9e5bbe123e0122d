"""A calibration run's progress exported as Ray metrics (the dashboard's Metrics view, Prometheus)."""

from __future__ import annotations

import numpy as np


class RunMetrics:
    """A run's progress as Ray metrics (ray.util.metrics; the dashboard's Metrics view and Prometheus show them as
    ray_nbl_*): per phase, units done and in all, units per second and the ETA; and actor restarts. Every series
    is tagged with the run's name and the phase. Recorded by the driver, exported by its node's metrics agent."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        tags = ("run", "phase")
        self.run = run
        self.done = Gauge("nbl_progress_done", "units done in the phase (tokens, layers, bytes)", tag_keys=tags)
        self.total = Gauge("nbl_progress_total", "units in the phase", tag_keys=tags)
        self.rate = Gauge("nbl_progress_rate", "units per second so far in the phase", tag_keys=tags)
        self.eta = Gauge("nbl_progress_eta_seconds", "estimated seconds left in the phase", tag_keys=tags)
        self.restarts = Counter("nbl_actor_restarts", "actors recreated after dying, by phase", tag_keys=tags)

    def update(self, phase: str, done: int, total: int, rate: float, eta_s: float) -> None:
        tags = {"run": self.run, "phase": phase}
        self.done.set(done, tags=tags)
        self.total.set(total, tags=tags)
        self.rate.set(rate, tags=tags)
        self.eta.set(eta_s if np.isfinite(eta_s) else -1.0, tags=tags)

    def restart(self, phase: str) -> None:
        self.restarts.inc(1, tags={"run": self.run, "phase": phase})
