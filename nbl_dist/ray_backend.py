"""The Ray backend: ShardWorker actors on a Ray cluster (with ray_cluster.py, the only modules importing Ray).

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

import dataclasses
import time
import uuid
from collections.abc import Callable, Hashable, Iterator

import numpy as np
import torch

from nbl_dist.backend import Placement, StreamResult, WorkerReport
from nbl_dist.errors import NBLError, RayStartError, WorkerLostError
from nbl_dist.linalg import LayerScores
from nbl_dist.plan import ShardPlan
from nbl_dist.progress import RunProgress
from nbl_dist.ray_cluster import RayCluster
from nbl_dist.resume import missing_batches
from nbl_dist.selection import SetMeasure, increases, measure_of
from nbl_dist.shard import ShardWorker, readonly_tensor


class RayShardWorker(ShardWorker):
    """ShardWorker as an actor: its placement also names the Ray node it runs on (ShardWorker never imports Ray)."""

    def info(self) -> Placement:
        import ray

        return dataclasses.replace(super().info(), node=ray.get_runtime_context().get_node_id())


class Window:
    """Bounded dispatch: items from per-key queues are submitted while their key has fewer than `limit` refs in
    flight; iterating yields (key, item, ref) as each ref completes, refilling before every wait.

    The queues are read afresh each round, so a caller may put items back (a replay) while iterating."""

    def __init__(self, ray, queues: dict[Hashable, list], submit: Callable[[Hashable, object], object], limit: int):
        self.ray, self.queues, self.submit, self.limit = ray, queues, submit, limit
        self.inflight: dict = {}  # ref -> (key, item)
        self.wait_s = 0.0  # time spent waiting for a ref to complete

    def _fill(self) -> None:
        for key, queue in self.queues.items():
            while queue and sum(1 for k, _ in self.inflight.values() if k == key) < self.limit:
                item = queue.pop(0)
                self.inflight[self.submit(key, item)] = (key, item)

    def __iter__(self) -> Iterator[tuple[Hashable, object, object]]:
        while True:
            self._fill()
            if not self.inflight:
                return
            t0 = time.perf_counter()
            done, _ = self.ray.wait(list(self.inflight), num_returns=1)
            self.wait_s += time.perf_counter() - t0
            for ref in done:
                key, item = self.inflight.pop(ref)
                yield key, item, ref

    def forget(self, key: Hashable) -> list:
        """Stop tracking key's refs in flight (its actors died); returns them, to wait out."""
        refs = [ref for ref, (k, _) in self.inflight.items() if k == key]
        for ref in refs:
            del self.inflight[ref]
        return refs


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


def gather(ray, refs: list, tick: Callable[[int], None], weights: list[int]) -> list:
    """ray.get(refs) in order, ticking `tick` with each ref's weight as it completes, in whatever order."""
    weight = dict(zip(refs, weights))
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        tick(weight[done[0]])
    return ray.get(refs)


class RestartBudget:
    """Actor deaths survived so far, by phase, against --max-restarts, and the time spent bringing actors back;
    each restart is printed and counted by the run's progress."""

    def __init__(self, limit: int, checkpoint_dir: str | None, progress: RunProgress):
        self.limit, self.checkpoint_dir, self.progress = limit, checkpoint_dir, progress
        self.by_phase: dict[str, int] = {}
        self.wait_s = 0.0

    @property
    def used(self) -> int:
        return sum(self.by_phase.values())

    def spend(self, phase: str) -> None:
        self.by_phase[phase] = self.by_phase.get(phase, 0) + 1
        if self.used > self.limit:
            saved = f"statistics checkpointed in {self.checkpoint_dir}" if self.checkpoint_dir else \
                "no checkpoint directory was set"
            raise WorkerLostError(
                f"actors died {self.used} times (limit {self.limit}; the last while {phase}); {saved}. Fix the "
                "cause (memory? a lost node?) and rerun the same command to resume from the checkpoint")
        self.progress.restart(phase, self.used, self.limit)


class ActorGrid:
    """The actors, [replica][stage], each in its own bundle: made, restarted from its snapshot, found by layer.

    A recreated actor gets restart_timeout_s to answer: it reloads its weights, and on a lost node Ray must first
    place its bundle on another node with room. Each actor is named after the run, its stage and its replica
    (`ray list actors`); a recreated one takes the name of the one it replaces.

    Args:
        cluster: where the bundles are reserved.
        plan: the shard plan (stages x replicas).
        model_dir: checkpoint folder, visible at this path on every node.
        options: Ray actor options (CPUs, GPUs).
        worker_kwargs: ShardWorker arguments common to every actor.
        run: the run's name, first in every actor's name.
    """

    restart_timeout_s = 600.0

    def __init__(self, cluster: RayCluster, plan: ShardPlan, model_dir: str, worker_cls: type, options: dict,
                 worker_kwargs: dict, run: str):
        self.cluster, self.plan, self.model_dir, self.run = cluster, plan, model_dir, run
        self.remote_cls = cluster.ray.remote(worker_cls)
        self.options, self.worker_kwargs = options, worker_kwargs
        self.rows: list[list] = []
        self.waited_s = 0.0  # time spent bringing actors back

    def start(self, restore: bool) -> None:
        self.rows = [[self.make(r, s.stage, restore) for s in self.plan.stages] for r in range(self.plan.replicas)]

    def placements(self, progress: RunProgress) -> list[Placement]:
        """Every actor's placement; waits until each has loaded its weights, a progress line counting them."""
        refs = [a.info.remote() for a in self.all()]
        tick = progress.phase("loading weights", len(refs), "actors")
        return gather(self.cluster.ray, refs, tick, [1] * len(refs))

    def actor_name(self, r: int, s: int) -> str:
        return f"{self.run}-stage{s}-replica{r}"

    def make(self, r: int, s: int, restore: bool):
        st = self.plan.stages[s]
        strategy = self.cluster.bundle(r * len(self.plan.stages) + s)
        name = self.actor_name(r, s)
        try:
            return self.remote_cls.options(scheduling_strategy=strategy, name=name, **self.options).remote(
                self.model_dir, st.start, st.end, embed=st.embed, replica=r, stage=s, restore=restore,
                **self.worker_kwargs)
        except ValueError as e:  # Ray refuses a name taken in this namespace
            raise RayStartError(f"an actor named {name!r} is already running: another run of the same --out on "
                                "the same data is going on in this Ray namespace; let it finish, or use another "
                                f"--out ({e})") from e

    def all(self) -> list:
        return [a for row in self.rows for a in row]

    def owner(self, layer: int):
        """Replica 0's actor holding `layer` (where the merged statistics are)."""
        return self.rows[0][self.stage_of(layer)]

    def stage_of(self, layer: int) -> int:
        for s in self.plan.stages:
            if s.start <= layer < s.end:
                return s.stage
        raise KeyError(layer)

    def restart_dead(self, replicas: list[int] | None = None, ping_timeout_s: float = 60) -> list[tuple[int, int]]:
        """Recreate, in their bundles and from their snapshots, the actors (of `replicas`, default all) that do
        not answer. Returns the (replica, stage) of each one recreated."""
        ray = self.cluster.ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        dead = []
        for r in range(len(self.rows)) if replicas is None else replicas:
            for s, actor in enumerate(self.rows[r]):
                try:
                    ray.get(actor.pid.remote(), timeout=ping_timeout_s)
                except (RayActorError, RayTaskError, GetTimeoutError):
                    ray.kill(actor)
                    self.rows[r][s] = self._remake(r, s)
                    dead.append((r, s))
        return dead

    def _remake(self, r: int, s: int):
        """The actor made again from its snapshot, once it answers. When its node was lost, Ray places the
        bundle on another node with room; a new actor that cannot start meanwhile is made again, until
        restart_timeout_s, after which the run stops with a message saying what the cluster lacks."""
        ray = self.cluster.ray
        from ray.exceptions import GetTimeoutError, RayActorError

        t0 = time.perf_counter()
        while True:
            actor = self.make(r, s, restore=True)
            try:
                ray.get(actor.pid.remote(), timeout=max(1.0, self.restart_timeout_s - (time.perf_counter() - t0)))
                self.waited_s += time.perf_counter() - t0
                return actor
            except (RayActorError, GetTimeoutError) as e:
                ray.kill(actor)
                if time.perf_counter() - t0 >= self.restart_timeout_s:
                    raise WorkerLostError(
                        f"replica {r} stage {s} could not start again within {self.restart_timeout_s:.0f} s "
                        f"({type(e).__name__}): no live node has room for its bundle ({self.options}). Add a node "
                        "and rerun the same command to resume from the checkpoint") from e
                time.sleep(1.0)

    def done_batches(self, r: int) -> list[list[int]]:
        return self.cluster.ray.get([a.done_batches.remote() for a in self.rows[r]])

    def kill_all(self) -> None:
        for a in self.all():
            self.cluster.ray.kill(a)
        self.rows = []


class RayBackend:
    """Calibration on Ray actors; keeps the Backend contract of backend.py.

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
            self.cluster.check_shared(checkpoint_dir, self.model_dir)
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
            self.placement: list[Placement] = self._phase("loading weights", lambda: self.grid.placements(self.progress))
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


class OwnerState:
    """What replica 0's actors (the owners of the merged statistics) hold beyond their snapshots: the merges
    done and the fits not yet handed over. After an owner is recreated from its snapshot (statistics as at the
    end of the stream, before any merge), catch_up merges its stage again and refits what it had fitted."""

    def __init__(self, ray, grid: ActorGrid, progress: RunProgress):
        self.ray, self.grid, self.progress = ray, grid, progress
        self.streamed = self.reduced = False
        self.merged: set[tuple[int, int, int]] = set()  # (stage, replica, layer) merged into replica 0
        self.fitted: dict[int, float] = {}  # layer -> ridge asked for, fitted and not yet handed over
        self.stale: set[int] = set()  # stages whose owner was recreated since it fitted
        self.ridge: float | None = None

    def lost(self, recreated: list[tuple[int, int]]) -> None:
        for r, s in recreated:
            if r == 0:
                self.merged = {m for m in self.merged if m[0] != s}
                self.stale.add(s)

    def catch_up(self) -> None:
        if self.reduced:
            self.merge_missing()
        refit = [i for i in self.fitted if self.grid.stage_of(i) in self.stale]
        if refit:
            self.fit(refit, self.ridge)
        self.stale.clear()

    def merge_missing(self, window: int = 2) -> None:
        """Merge into replica 0 every (replica, layer) not merged yet, one layer per object and at most `window`
        layers in flight per stage: replica 0's actor holds at most that many incoming layers' statistics (3 d x d
        float64 each) besides its own, and the object store never needs a replica's whole shard at once (15 GiB
        per actor for 10 layers at d = 8192: sent whole, it spills to disk). After a failure nothing more is sent
        and what is in flight is waited out, so every merge that happened is recorded, none twice. A progress
        line counts the layers merged."""
        rows = self.grid.rows
        queues = {s.stage: [(r, i) for i in s.layers for r in range(1, len(rows))
                            if (s.stage, r, i) not in self.merged] for s in self.grid.plan.stages}
        todo = sum(len(q) for q in queues.values())
        tick = self.progress.phase("merging replicas", todo, "layers") if todo else None

        def submit(stage: int, item: tuple[int, int]):
            r, i = item
            return rows[0][stage].merge_layer.remote(i, rows[r][stage].export_layer.remote(i))

        failure = None
        for stage, (r, i), ref in Window(self.ray, queues, submit, window):
            try:
                self.ray.get(ref)
                self.merged.add((stage, r, i))
                if tick:
                    tick(1)
            except Exception as e:  # noqa: BLE001 - drained first, raised below
                failure = failure or e
                for queue in queues.values():
                    queue.clear()
        if failure is not None:
            raise failure

    def fit(self, layers: list[int], ridge: float | None) -> dict[int, float]:
        """Fit `layers` on the actors holding their statistics; a progress line counts the layers fitted."""
        by_stage: dict[int, list[int]] = {}
        for i in layers:
            by_stage.setdefault(self.grid.stage_of(i), []).append(i)
        refs = [self.grid.rows[0][s].fit.remote(ls, ridge) for s, ls in by_stage.items()]
        sizes = [len(ls) for ls in by_stage.values()]
        parts = gather(self.ray, refs, self.progress.phase("fitting", len(layers), "layers"), sizes)
        ridges = {i: r for part in parts for i, r in part.items()}
        self.ridge = ridge
        self.fitted.update({i: ridge for i in layers})
        return ridges

    def handed_over(self, layer: int) -> None:
        self.fitted.pop(layer, None)


class StreamPass:
    """The statistics pass on the actors.

    Micro-batch k goes to replica k % R (disjoint shares); each replica keeps at most max_inflight micro-batches
    in its chain. A micro-batch that every stage of its replica already holds (restored from a snapshot) is
    skipped. When an actor dies, it is recreated in its bundle from its snapshot, and only the micro-batches
    some stage of that replica lacks are sent again (stages that have one already forward it without counting
    it twice); past the restart budget the run stops, its snapshots kept for a resume.
    """

    def __init__(self, ray, grid: ActorGrid, max_inflight: int, budget: RestartBudget, checkpoint_dir: str | None):
        self.ray, self.grid, self.max_inflight = ray, grid, max_inflight
        self.budget, self.checkpoint_dir = budget, checkpoint_dir
        self.replayed = 0

    def run(self, blocks: torch.Tensor, batch_size: int, progress: Callable[[int], None] | None) -> StreamResult:
        from ray.exceptions import RayActorError, RayTaskError

        arr = blocks.numpy().astype(np.int64)
        R, t0 = self.grid.plan.replicas, time.perf_counter()
        share = {r: list(range(r, -(-arr.shape[0] // batch_size), R)) for r in range(R)}
        pending = {r: missing_batches(share[r], self.grid.done_batches(r)) for r in range(R)}
        counted: set[int] = {k for r in range(R) for k in share[r] if k not in pending[r]}
        restored = len(counted)

        def submit(r: int, k: int):
            ref, row = arr[k * batch_size:(k + 1) * batch_size], self.grid.rows[r]
            for s, actor in enumerate(row):
                ref = actor.run_batch.remote(ref, last=(s == len(row) - 1), batch_id=k)
            return ref

        window = Window(self.ray, pending, submit, self.max_inflight)
        for r, k, ref in window:
            try:
                receipt = self.ray.get(ref)
            except RayActorError:  # also a downstream task whose input's actor died (it is both kinds)
                self._recover(r, share[r], window, pending)
                # a micro-batch every stage had finished (and snapshotted) is not sent again, but its receipt
                # died with the actor: count it here, or the progress line would stop short of 100%
                for k in (k for k in share[r] if k not in counted and k not in pending[r]):
                    if progress:
                        progress(int(arr[k * batch_size:(k + 1) * batch_size].size))
                    counted.add(k)
                continue
            except RayTaskError as e:
                if isinstance(e.cause, NBLError):
                    raise e.cause from None
                raise
            if progress and k not in counted:
                progress(receipt["tokens"])
            counted.add(k)
        self._verify(share)
        if self.checkpoint_dir:
            self.ray.get([a.checkpoint.remote() for a in self.grid.all()])
        return StreamResult(tokens=int(blocks.numel()), stream_s=time.perf_counter() - t0,
                            driver_wait_s=window.wait_s, restored_batches=restored,
                            replayed_batches=self.replayed, actor_restarts=self.budget.used)

    def _recover(self, r: int, share: list[int], window: Window, pending: dict[int, list[int]]) -> None:
        """An actor of replica r died: drain the replica, recreate its dead actors from their snapshots, and
        queue again what any of its stages lacks."""
        self.budget.spend("streaming")
        lost = window.forget(r)
        if lost:
            self.ray.wait(lost, num_returns=len(lost), timeout=60)
        self.grid.restart_dead([r])
        submitted = [k for k in share if k not in pending[r]]
        again = missing_batches(submitted, self.grid.done_batches(r))
        self.replayed += len(again)
        pending[r] = again + pending[r]

    def _verify(self, share: dict[int, list[int]]) -> None:
        """Every actor holds exactly its replica's micro-batches, each once."""
        for r in range(self.grid.plan.replicas):
            for s, done in enumerate(self.grid.done_batches(r)):
                if sorted(done) != share[r]:
                    raise NBLError(f"replica {r} stage {s} holds micro-batches {done[:8]}..., expected "
                                   f"{share[r][:8]}...: the statistics would be wrong; please report this")


class SetPass:
    """The measured rules on the actors: the held-back loss and KL divergence of layer sets linearized together
    (the loss rule's sets are its single layers). Every replica that has sets to run first passes the held-back
    blocks through with the base (the layers common to every set) linearized, each stage caching its input; a set
    then restarts at the stage of its first layer outside the base, since upstream of that stage the set and the
    base linearize the same layers. When the base is the original, the last stage also keeps its output: the
    reference of each set's KL. Sets go round-robin to replicas; a replica r > 0 receives the maps it needs from
    replica 0's actors, which fitted them."""

    def __init__(self, ray, grid: ActorGrid, model_dir: str, max_inflight: int, progress: RunProgress):
        self.ray, self.grid, self.model_dir, self.max_inflight = ray, grid, model_dir, max_inflight
        self.progress = progress
        self.parts: dict[int, np.ndarray] = {}

    def _chain(self, r: int, k: int, layers: tuple[int, ...], first: int, cache: bool):
        """Block k through replica r from stage `first` on (a later stage starts from its cached input), with
        `layers` linearized; `cache`: each stage keeps its input (the base pass)."""
        row, ref = self.grid.rows[r], None
        for s in range(first, len(row)):
            ref = row[s].score_batch.remote(k, inp=self.parts[k] if s == 0 else ref, layers=layers,
                                            ids=self.parts[k] if s == len(row) - 1 else None, cache=cache)
        return ref

    def _prepare(self, base: tuple[int, ...], sets: list[tuple[int, ...]], replica_of: dict[int, int]) -> None:
        """The last stages read the head; replica 0's actors linearize the sets' layers with their fits, and each
        replica r > 0 gets from them the maps of the base and of the sets it runs."""
        ray, rows = self.ray, self.grid.rows
        union = set().union(*sets)
        ray.get([row[-1].load_head.remote(self.model_dir) for row in rows])
        ray.get([a.prepare_candidates.remote([i for i in st.layers if i in union])
                 for a, st in zip(rows[0], self.grid.plan.stages)])
        wanted = {(r, i) for r in set(replica_of.values()) - {0} for i in base}
        wanted |= {(r, i) for n, r in replica_of.items() if r for i in sets[n]}
        for r, i in sorted(wanted):
            s = self.grid.stage_of(i)
            rows[r][s].set_candidate.remote(i, rows[0][s].candidate_map.remote(i))

    def _base_pass(self, base: tuple[int, ...], replicas: list[int]) -> SetMeasure:
        """Every block through each of `replicas` with the base linearized, caching each stage's input (and, when
        the base is the original, the last stage's output: the KL reference). Returns replica 0's measure."""
        done = self.ray.get([self._chain(r, k, base, 0, cache=True) for r in replicas for k in self.parts])
        return measure_of(done[:len(self.parts)], original=base == ())

    def _restarts(self, sets: list[tuple[int, ...]], base: tuple[int, ...], replica_of: dict[int, int]):
        """Each set of replica_of (index -> replica) from the stage of its first layer outside the base; returns
        set index -> its measure."""
        jobs = [(n, r, self.grid.stage_of(min(set(sets[n]) - set(base))), k)
                for n, r in replica_of.items() for k in self.parts]  # (set, replica, first stage, block)
        parts: dict[int, list[dict]] = {n: [] for n in replica_of}
        limit = self.max_inflight * len(self.grid.plan.stages) * len(self.grid.rows)
        submit = lambda _, job: self._chain(job[1], job[3], sets[job[0]], job[2], cache=False)  # noqa: E731
        tick = self.progress.phase("scoring candidates", len(jobs), "blocks")
        for _, job, ref in Window(self.ray, {"sets": jobs}, submit, limit):
            parts[job[0]].append(self.ray.get(ref))
            tick(1)
        return {n: measure_of(p) for n, p in parts.items()}

    def run(self, sets: list[tuple[int, ...]], score_blocks: torch.Tensor, batch_size: int) -> list[SetMeasure]:
        """Each set (sorted layer tuples; () is the original) measured on score_blocks (N, T): mean loss, and KL
        divergence from the original when () is among the sets (its pass is then the base pass)."""
        sets = [tuple(sorted(x)) for x in sets]
        ids = score_blocks.numpy().astype(np.int64)
        self.parts = {k: ids[k * batch_size:(k + 1) * batch_size] for k in range(-(-ids.shape[0] // batch_size))}
        base = tuple(sorted(set.intersection(*map(set, sets))))
        todo = [n for n, x in enumerate(sets) if x != base]
        replica_of = {n: j % len(self.grid.rows) for j, n in enumerate(todo)}
        self._prepare(base, sets, replica_of)
        base_measure = self._base_pass(base, sorted({0, *replica_of.values()}))
        measured = self._restarts(sets, base, replica_of)
        self.ray.get([a.clear_scoring.remote() for a in self.grid.all()])
        return [measured.get(n, base_measure) for n in range(len(sets))]
