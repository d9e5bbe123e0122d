"""The calibration actors: ShardWorker as a Ray actor, the grid of them ([replica][stage], one placement-group
bundle each) with their restarts from snapshots, and the budget of restarts a run survives."""

from __future__ import annotations

import dataclasses
import time

from nbl_dist.calibration.backend import Placement
from nbl_dist.calibration.plan import ShardPlan
from nbl_dist.calibration.ray.dispatch import gather
from nbl_dist.calibration.worker import ShardWorker
from nbl_dist.errors import RayStartError, WorkerLostError
from nbl_dist.runtime.cluster import RayCluster
from nbl_dist.runtime.progress import RunProgress


class RayShardWorker(ShardWorker):
    """ShardWorker as an actor: its placement also names the Ray node it runs on (ShardWorker never imports Ray)."""

    def info(self) -> Placement:
        import ray

        return dataclasses.replace(super().info(), node=ray.get_runtime_context().get_node_id())


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
    name_release_s = 60.0  # how long a recreated actor waits for Ray to free its dead predecessor's name

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

    def make(self, r: int, s: int, restore: bool, name_wait_s: float = 0.0):
        """The actor of replica r, stage s, in its bundle. A name still taken after name_wait_s is another run's.

        A recreated actor takes the name of the one it replaces, which Ray frees only once its control store has
        marked the old actor dead; that can come after a call to the old actor has already failed (a worker killed
        by the OS), so _remake waits for the name instead of mistaking its own dead actor for another run."""
        st = self.plan.stages[s]
        strategy = self.cluster.bundle(r * len(self.plan.stages) + s)
        name = self.actor_name(r, s)
        deadline = time.perf_counter() + name_wait_s
        while True:
            try:
                return self.remote_cls.options(scheduling_strategy=strategy, name=name, **self.options).remote(
                    self.model_dir, st.start, st.end, embed=st.embed, replica=r, stage=s, restore=restore,
                    **self.worker_kwargs)
            except ValueError as e:  # Ray refuses a name taken in this namespace
                if time.perf_counter() < deadline:
                    time.sleep(0.2)
                    continue
                raise RayStartError(f"an actor named {name!r} is already running: another run of the same --out "
                                    "on the same data is going on in this Ray namespace; let it finish, or use "
                                    f"another --out ({e})") from e

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
            actor = self.make(r, s, restore=True, name_wait_s=self.name_release_s)
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
