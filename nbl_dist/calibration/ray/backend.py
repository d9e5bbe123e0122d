"""The Ray backend: ShardWorker actors on a Ray cluster (calibration/ray/ holds what imports Ray for calibration).

One ShardWorker actor per (replica, stage), placed with one placement-group bundle each (the actor grid).
Micro-batches flow stage to stage as object refs (Ray hands each stage's output to the next actor directly; the
driver only holds refs); every phase dispatches through one bounded window of refs in flight. Replicas take
disjoint shares of the data; their statistics are merged on replica 0's actors (actor to actor), ranked there,
and fitted there.

A run is watchable from Ray's own tools: its placement group carries the run's name and each actor its stage and
replica (`ray list actors`, the dashboard's Actors view), every long phase prints a progress line and feeds
RunMetrics (the dashboard's Metrics view, Prometheus), and each actor restart is printed and counted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import torch

from nbl_dist.calibration.backend import Placement, StreamResult, WorkerReport
from nbl_dist.calibration.plan import ShardPlan
from nbl_dist.calibration.ray.actors import ActorGrid, RayShardWorker, RestartBudget
from nbl_dist.calibration.ray.dispatch import gather
from nbl_dist.calibration.ray.metrics import RunMetrics
from nbl_dist.calibration.ray.passes import OwnerState, SetPass, StreamPass
from nbl_dist.calibration.worker import readonly_tensor
from nbl_dist.core.linalg import LayerScores
from nbl_dist.core.selection import SetMeasure, increases
from nbl_dist.errors import WorkerLostError
from nbl_dist.runtime.cluster import RayCluster
from nbl_dist.runtime.progress import RunProgress
from nbl_dist.runtime.shared import check_shared


class RayBackend:
    """Calibration on Ray actors; keeps the Backend contract of calibration/backend.py.

    Args:
        model_dir: checkpoint folder, visible at this path on every node.
        plan: the shard plan (stages x replicas).
        dtype, device: forward dtype and device ("cpu" or "cuda": one GPU per actor).
        address: Ray cluster address, or None for a local Ray started here.
        placement: placement-group strategy (PACK, SPREAD, ...).
        cpus_per_actor: CPUs reserved per actor (default: what the cluster has, shared out).
        max_inflight: micro-batches in flight per replica.
        stats_device: where actors keep statistics (None: on their device; "cpu": host memory).
        stats_precision: how actors form the statistics' Gram products (stats.PRECISIONS).
        checkpoint_dir, checkpoint_every: each actor snapshots its statistics there every so many micro-batches.
        restore: actors start from their snapshots (resume).
        fingerprint: identifies the run; a snapshot with another is refused.
        max_restarts: actor deaths survived before giving up.
        pg_timeout_s: how long to wait for the placement group before giving up with a clear error.
        run_name: names the placement group and, with stage and replica, each actor (default: nbl- and a random
            id); two runs at once on one cluster need different names.
        cluster: the cluster already joined (the pipeline joins it first, to resolve the device there).
    """

    name = "ray"
    worker_cls = RayShardWorker  # the actor class (a benchmark may substitute a variant)

    def __init__(self, model_dir: str, plan: ShardPlan, dtype: torch.dtype, device: str = "cpu",
                 address: str | None = None, placement: str = "PACK", cpus_per_actor: float | None = None,
                 max_inflight: int = 2, pg_timeout_s: float = 120.0, stats_device: str | None = None,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0, restore: bool = False,
                 fingerprint: str = "", max_restarts: int = 3, run_name: str = "",
                 cluster: RayCluster | None = None, stats_precision: str = "fp32"):
        self.cluster = cluster or RayCluster(address)
        self._ray = self.cluster.ray
        self.plan, self.max_inflight = plan, max_inflight
        self.model_dir, self.checkpoint_dir = str(model_dir), checkpoint_dir
        self.run_name = run_name or f"nbl-{uuid.uuid4().hex[:8]}"
        self.grid: ActorGrid | None = None
        gpus = 1 if device == "cuda" else 0
        try:
            self.progress = RunProgress(sink=RunMetrics(self.run_name))
            self.budget = RestartBudget(max_restarts, checkpoint_dir, self.progress)
            if cpus_per_actor is None:
                cpus_per_actor = self.cluster.cpus_per_actor(plan.num_actors, gpu=bool(gpus))
            self.cluster.reserve(plan.num_actors, {"CPU": cpus_per_actor, **({"GPU": gpus} if gpus else {})},
                                 placement, pg_timeout_s, name=self.run_name)
            check_shared(self.cluster, self.cluster.bundle_nodes(), checkpoint_dir, {"model folder": self.model_dir},
                         fix="Put the model, --out and --checkpoint-dir (by default beside --out) on a filesystem that "
                             "the driver's node and every actor's node mount at the same path (NFS, a cluster "
                             "filesystem), or pass a --checkpoint-dir there")
            self.grid = ActorGrid(self.cluster, plan, self.model_dir, self.worker_cls,
                                  options=dict(num_cpus=cpus_per_actor, num_gpus=gpus, max_concurrency=1),
                                  worker_kwargs=dict(dtype=str(dtype).removeprefix("torch."), device=device,
                                                     stats_device=stats_device, stats_precision=stats_precision,
                                                     num_threads=max(1, int(cpus_per_actor)),
                                                     checkpoint_dir=checkpoint_dir,
                                                     checkpoint_every=checkpoint_every, fingerprint=fingerprint),
                                  run=self.run_name)
            self.owners = OwnerState(self._ray, self.grid, self.progress)
            t0 = time.perf_counter()
            self.grid.start(restore)
            self.placement: list[Placement] = self._phase("loading weights",
                                                          lambda: self.grid.placements(self.progress))
            self.startup_s = time.perf_counter() - t0
        except Exception:
            self.close()
            raise

    def _phase(self, name: str, run: Callable[[], object]):
        """Run one phase. When an actor dies in it, the dead actors are recreated in their bundles from their
        snapshots, replica 0's merged statistics and fits are brought back to where the phase expects them, and
        the phase runs again: within --max-restarts, the result is the undisturbed one."""
        from ray.exceptions import ObjectLostError, RayActorError

        revive = False
        while True:
            try:
                if revive:
                    self._revive()
                    revive = False
                self.owners.catch_up()
                return run()
            except (RayActorError, ObjectLostError):
                self.budget.spend(name)
                revive = True

    def _revive(self) -> None:
        if self.owners.streamed and not self.checkpoint_dir:
            raise WorkerLostError("an actor died after the statistics pass, and without a checkpoint folder its "
                                  "statistics cannot be restored; run through nbl-dist calibrate (it always "
                                  "checkpoints) or pass checkpoint_dir")
        self.owners.lost(self.grid.restart_dead())
        self.placement = self.grid.placements(self.progress)

    def stream(self, blocks: torch.Tensor, batch_size: int,
               progress: Callable[[int], None] | None = None) -> StreamResult:
        """Push every micro-batch of blocks (N, T) through its replica's chain of actors (see StreamPass)."""
        restarts = self.budget.used
        result = StreamPass(self._ray, self.grid, self.max_inflight, self.budget,
                            self.checkpoint_dir).run(blocks, batch_size, progress)
        self.owners.streamed = True
        if self.budget.used > restarts:  # recreated actors may run elsewhere now (a lost node's bundle moved)
            self.placement = self._phase("loading weights", lambda: self.grid.placements(self.progress))
        return result

    def reduce(self, window: int = 2) -> None:
        """Merge every replica's statistics into replica 0's actors, actor to actor (Chan's update); see
        OwnerState.merge_missing."""
        self.owners.reduced = True
        self._phase("merging replicas", lambda: self.owners.merge_missing(window))

    # ------------------------------------------------------------------ rank and fit
    def scores(self, ridge: float | None = None) -> list[LayerScores]:
        def run():
            refs = [a.scores.remote(ridge) for a in self.grid.rows[0]]
            sizes = [len(s.layers) for s in self.plan.stages]
            tick = self.progress.phase("scoring", sum(sizes), "layers")
            return [s for stage in gather(self._ray, refs, tick, sizes) for s in stage]
        return self._phase("scoring", run)

    def fit(self, layers: list[int], ridge: float | None = None) -> dict[int, float]:
        """All selected layers' fits at once, each on the actor holding its statistics."""
        return self._phase("fitting", lambda: self.owners.fit(layers, ridge))

    def loss_scores(self, score_blocks: torch.Tensor, batch_size: int) -> dict[int, float]:
        """The loss rule: mean next-token loss increase on held-back blocks when each layer alone is linearized
        with its fitted map (the fits must exist: call fit(all layers) first)."""
        layers = [i for s in self.plan.stages for i in s.layers]
        measured = self.measure_sets([(), *((i,) for i in layers)], score_blocks, batch_size)
        return dict(zip(layers, increases(measured)))

    def measure_sets(self, sets: list[tuple[int, ...]], score_blocks: torch.Tensor,
                     batch_size: int) -> list[SetMeasure]:
        """Each set linearized together (fit their union first), measured on held-back blocks: loss, and KL
        divergence from the original when () is among the sets. See SetPass."""
        candidates = SetPass(self._ray, self.grid, self.model_dir, self.max_inflight, self.progress)
        return self._phase("scoring candidates", lambda: candidates.run(sets, score_blocks, batch_size))

    def get_fit(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self._phase("handing over fits", lambda: self._ray.get(self.grid.owner(layer).get_fit.remote(layer)))
        self.owners.handed_over(layer)
        return readonly_tensor(w), readonly_tensor(b)

    def worker_reports(self) -> list[WorkerReport]:
        return self._phase("reporting", lambda: self._ray.get([a.report.remote() for a in self.grid.all()]))

    def recovery(self) -> dict:
        """Actor restarts by phase, and the seconds spent bringing actors back (reloading, re-placing)."""
        return {"actor_restarts": self.budget.used, "restarts_by_phase": dict(self.budget.by_phase),
                "restart_wait_s": self.grid.waited_s if self.grid else 0.0}

    def close(self) -> None:
        if self.grid is not None:
            self.grid.kill_all()
        self.cluster.close()


