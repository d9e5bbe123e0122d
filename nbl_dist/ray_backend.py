"""The Ray backend: the only module of nbl-dist that imports Ray.

One ShardWorker actor per (replica, stage), placed with one placement-group bundle each. Micro-batches flow
stage to stage as object refs (Ray hands each stage's output to the next actor directly; the driver only holds
refs), with a bounded number in flight per replica. Replicas take disjoint shares of the data; their statistics
are merged on replica 0's actors (actor to actor), ranked there, and fitted there.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from nbl_dist.errors import NBLError
from nbl_dist.plan import ShardPlan
from nbl_dist.shard import ShardWorker, readonly_tensor


class RayStartError(NBLError):
    pass


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start a local Ray in this process. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayStartError(
            f"could not reach a Ray cluster at --address {address!r}: {e}. Start one with `ray start --head` "
            "(with RAY_AUTH_MODE=disabled for a local test cluster) or leave --address out to run locally"
        ) from e
    return True


class RayBackend:
    """Calibration on Ray actors (same phases as InProcessBackend: stream, scores, fit, get_fit, close).

    Args:
        model_dir: checkpoint folder, visible at this path on every node.
        plan: the shard plan (stages x replicas).
        dtype, device: forward dtype and device ("cpu" or "cuda": one GPU per actor).
        address: Ray cluster address, or None for a local Ray started here.
        placement: placement-group strategy (PACK, SPREAD, ...).
        cpus_per_actor: CPUs reserved per actor (default: what the cluster has, shared out).
        max_inflight: micro-batches in flight per replica.
        stats_device: where actors keep statistics (None: on their device; "cpu": host memory).
        pg_timeout_s: how long to wait for the placement group before giving up with a clear error.
    """

    name = "ray"

    def __init__(self, model_dir: str, plan: ShardPlan, dtype: torch.dtype, device: str = "cpu",
                 address: str | None = None, placement: str = "PACK", cpus_per_actor: float | None = None,
                 max_inflight: int = 2, pg_timeout_s: float = 120.0, stats_device: str | None = None):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.started_ray = connect(address)
        self.plan, self.max_inflight = plan, max_inflight
        n = plan.num_actors
        gpus = 1 if device == "cuda" else 0
        if cpus_per_actor is None:
            cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
            cpus_per_actor = max(0.01, min(1.0, float(cluster_cpus) / n)) if not gpus else 1.0
        bundle = {"CPU": cpus_per_actor, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=placement.upper())
        ready, _ = ray.wait([self.pg.ready()], timeout=pg_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            self._shutdown_ray()
            raise RayStartError(
                f"the cluster cannot place {n} actors of {bundle} with strategy {placement} within "
                f"{pg_timeout_s:.0f} s (cluster has {ray.cluster_resources()}). Lower --stages/--replicas, "
                "set --cpus-per-actor, add nodes, or use --placement PACK")

        remote_cls = ray.remote(ShardWorker)
        threads = max(1, int(cpus_per_actor))
        self.actors: list[list] = []  # [replica][stage]
        t0 = time.perf_counter()
        try:
            for r in range(plan.replicas):
                row = []
                for s in plan.stages:
                    strategy = PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=r * len(plan.stages) + s.stage)
                    row.append(remote_cls.options(num_cpus=cpus_per_actor, num_gpus=gpus,
                                                  scheduling_strategy=strategy, max_concurrency=1).remote(
                        str(model_dir), s.start, s.end, embed=s.embed, dtype=str(dtype).removeprefix("torch."),
                        device=device, stats_device=stats_device, replica=r, stage=s.stage,
                        num_threads=threads))
                self.actors.append(row)
            self.placement = ray.get([a.info.remote() for row in self.actors for a in row])
        except Exception:
            self.close()
            raise
        self.startup_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ streaming
    def stream(self, blocks: torch.Tensor, batch_size: int,
               progress: Callable[[int], None] | None = None) -> dict:
        """Push every micro-batch through its replica's chain. blocks: (N, T) token ids.

        Micro-batch k goes to replica k % R (disjoint shares); each replica keeps at most max_inflight
        micro-batches in its chain, waiting with ray.wait for the oldest before sending more.
        """
        ray = self._ray
        arr = blocks.numpy().astype(np.int64)
        inflight: list[list] = [[] for _ in self.actors]
        wait_s = 0.0
        t0 = time.perf_counter()

        def drain(r: int, keep: int):
            nonlocal wait_s
            while len(inflight[r]) > keep:
                tw = time.perf_counter()
                done, inflight[r] = ray.wait(inflight[r], num_returns=1)
                wait_s += time.perf_counter() - tw
                for receipt in ray.get(done):
                    if progress:
                        progress(receipt["tokens"])

        for k, start in enumerate(range(0, arr.shape[0], batch_size)):
            r = k % len(self.actors)
            drain(r, self.max_inflight - 1)
            ref = arr[start:start + batch_size]
            chain = self.actors[r]
            for s, actor in enumerate(chain):
                ref = actor.run_batch.remote(ref, last=(s == len(chain) - 1), batch_id=k)
            inflight[r].append(ref)
        for r in range(len(self.actors)):
            drain(r, 0)
        return {"tokens": int(blocks.numel()), "driver_wait_s": wait_s, "stream_s": time.perf_counter() - t0}

    def reduce(self) -> None:
        """Merge every replica's statistics into replica 0's actors, actor to actor (Chan's update)."""
        if len(self.actors) == 1:
            return
        ray = self._ray
        merges = []
        for s, owner in enumerate(self.actors[0]):
            exports = [self.actors[r][s].export_stats.remote() for r in range(1, len(self.actors))]
            merges.append(owner.merge_stats.remote(*exports))
        ray.get(merges)

    # ------------------------------------------------------------------ rank and fit
    def _owner(self, layer: int):
        for s in self.plan.stages:
            if s.start <= layer < s.end:
                return self.actors[0][s.stage]
        raise KeyError(layer)

    def scores(self, ridge: float | None = None):
        from nbl_dist.linalg import LayerScores

        per_stage = self._ray.get([a.scores.remote(ridge) for a in self.actors[0]])
        return [LayerScores(**d) for stage in per_stage for d in stage]

    def fit(self, layers: list[int], ridge: float | None = None) -> dict[int, float]:
        """All selected layers' fits at once, each on the actor holding its statistics."""
        by_stage: dict[int, list[int]] = {}
        for i in layers:
            by_stage.setdefault(id(self._owner(i)), []).append(i)
        refs = [self._owner(ls[0]).fit.remote(ls, ridge) for ls in by_stage.values()]
        ridges: dict[int, float] = {}
        for part in self._ray.get(refs):
            ridges.update(part)
        return ridges

    def get_fit(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self._ray.get(self._owner(layer).get_fit.remote(layer))
        return readonly_tensor(w), readonly_tensor(b)

    def worker_reports(self) -> list[dict]:
        return self._ray.get([a.report.remote() for row in self.actors for a in row])

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        ray = self._ray
        from ray.util.placement_group import remove_placement_group

        for row in getattr(self, "actors", []):
            for a in row:
                ray.kill(a)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        if self.started_ray:
            self._ray.shutdown()
            self.started_ray = False
