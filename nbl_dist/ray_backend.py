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


class WorkerLostError(NBLError):
    pass


class _RayShardWorker(ShardWorker):
    """ShardWorker as an actor: its info also names the Ray node it runs on (ShardWorker never imports Ray)."""

    def info(self) -> dict:
        import ray

        return {**super().info(), "node": ray.get_runtime_context().get_node_id()}


def pending_any(pending: dict) -> bool:
    return any(pending.values())


def connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a local Ray in this process. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if address and address not in ("auto", "local") and not address.startswith("ray://"):
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayStartError(
            f"could not reach a Ray cluster at --address {address!r}: {e}. Start one with `ray start --head` "
            "(with RAY_AUTH_MODE=disabled for a local test cluster) or leave --address out to run locally"
        ) from e
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at host:port (Ray itself retries for a long time)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        raise RayStartError(
            f"--address {address!r} does not answer ({e}); check the head node's address and port "
            "(`ray start --head` prints it), or leave --address out to run on a local Ray") from e


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
        checkpoint_dir, checkpoint_every: each actor saves its statistics there every so many micro-batches.
        restore: actors start from their checkpoints (resume).
        fingerprint: identifies the run; a checkpoint with another is refused.
        max_restarts: actor deaths survived before giving up.
        pg_timeout_s: how long to wait for the placement group before giving up with a clear error.
    """

    name = "ray"
    worker_cls = _RayShardWorker  # the actor class (a benchmark may substitute a variant)

    def __init__(self, model_dir: str, plan: ShardPlan, dtype: torch.dtype, device: str = "cpu",
                 address: str | None = None, placement: str = "PACK", cpus_per_actor: float | None = None,
                 max_inflight: int = 2, pg_timeout_s: float = 120.0, stats_device: str | None = None,
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0, restore: bool = False,
                 fingerprint: str = "", max_restarts: int = 3):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.started_ray = connect(address)
        self.plan, self.max_inflight = plan, max_inflight
        n = plan.num_actors
        gpus = 1 if device == "cuda" else 0
        if cpus_per_actor is None:
            # The cluster's CPUs shared out: the actors are all that runs, and each uses as many torch threads
            # as CPUs it reserved (one actor on a 2-CPU machine gets both, like the in-process backend).
            # No more than the smallest node has, so every bundle can land somewhere.
            cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
            node_cpus = [nd["Resources"].get("CPU", 0.0) for nd in ray.nodes() if nd.get("Alive")]
            cpus_per_actor = max(0.01, min(cluster_cpus / n, min(node_cpus or [cluster_cpus])))
            if cpus_per_actor >= 1:
                cpus_per_actor = float(int(cpus_per_actor))  # whole CPUs: whole torch threads
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

        self._remote_cls = ray.remote(self.worker_cls)
        self._strategy = lambda r, s: PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=r * len(plan.stages) + s)
        self._actor_kwargs = dict(dtype=str(dtype).removeprefix("torch."), device=device, stats_device=stats_device,
                                  num_threads=max(1, int(cpus_per_actor)), checkpoint_dir=checkpoint_dir,
                                  checkpoint_every=checkpoint_every, fingerprint=fingerprint)
        self._options = dict(num_cpus=cpus_per_actor, num_gpus=gpus, max_concurrency=1)
        self.model_dir, self.max_restarts, self.checkpoint_dir = str(model_dir), max_restarts, checkpoint_dir
        self.restarts = self.replayed = 0
        self.actors: list[list] = []  # [replica][stage]
        t0 = time.perf_counter()
        try:
            self.actors = [[self._make_actor(r, s.stage, restore) for s in plan.stages]
                           for r in range(plan.replicas)]
            self.placement = ray.get([a.info.remote() for row in self.actors for a in row])
        except Exception:
            self.close()
            raise
        self.startup_s = time.perf_counter() - t0

    def _make_actor(self, r: int, s: int, restore: bool):
        st = self.plan.stages[s]
        return self._remote_cls.options(scheduling_strategy=self._strategy(r, s), **self._options).remote(
            self.model_dir, st.start, st.end, embed=st.embed, replica=r, stage=s, restore=restore,
            **self._actor_kwargs)

    # ------------------------------------------------------------------ streaming
    def stream(self, blocks: torch.Tensor, batch_size: int,
               progress: Callable[[int], None] | None = None) -> dict:
        """Push every micro-batch through its replica's chain. blocks: (N, T) token ids.

        Micro-batch k goes to replica k % R (disjoint shares); each replica keeps at most max_inflight
        micro-batches in its chain, waiting with ray.wait before sending more. A micro-batch that every stage
        of its replica already holds (restored from a checkpoint) is skipped. When an actor dies, it is
        recreated in its bundle from its checkpoint, and only the micro-batches some stage of that replica
        lacks are sent again (stages that have one already forward it without counting it twice).
        """
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        arr = blocks.numpy().astype(np.int64)
        n_batches = -(-arr.shape[0] // batch_size)
        R = len(self.actors)
        share = {r: [k for k in range(n_batches) if k % R == r] for r in range(R)}
        pending = {r: self._missing(r, share[r]) for r in range(R)}
        restored = sum(len(share[r]) - len(pending[r]) for r in range(R))
        counted: set[int] = {k for r in range(R) for k in share[r] if k not in pending[r]}
        inflight: dict = {}  # ref -> (replica, batch id)
        wait_s, t0 = 0.0, time.perf_counter()

        def submit(r: int, k: int):
            ref = arr[k * batch_size:(k + 1) * batch_size]
            for s, actor in enumerate(self.actors[r]):
                ref = actor.run_batch.remote(ref, last=(s == len(self.actors[r]) - 1), batch_id=k)
            inflight[ref] = (r, k)

        while pending_any(pending) or inflight:
            for r in range(R):
                while pending[r] and sum(1 for v in inflight.values() if v[0] == r) < self.max_inflight:
                    submit(r, pending[r].pop(0))
            tw = time.perf_counter()
            done, _ = ray.wait(list(inflight), num_returns=1)
            wait_s += time.perf_counter() - tw
            for ref in done:
                r, k = inflight.pop(ref)
                try:
                    receipt = ray.get(ref)
                except RayActorError:  # also a downstream task whose input's actor died (it is both kinds)
                    self._recover(r, share[r], inflight, pending)
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
            ray.get([a.checkpoint.remote() for row in self.actors for a in row])
        return {"tokens": int(blocks.numel()), "driver_wait_s": wait_s, "stream_s": time.perf_counter() - t0,
                "restored_batches": restored, "replayed_batches": self.replayed, "actor_restarts": self.restarts}

    def _missing(self, r: int, share: list[int]) -> list[int]:
        """Micro-batches of replica r that some stage of it does not hold yet, in order."""
        done = [set(d) for d in self._ray.get([a.done_batches.remote() for a in self.actors[r]])]
        return [k for k in share if any(k not in d for d in done)]

    def _recover(self, r: int, share: list[int], inflight: dict, pending: dict) -> None:
        """An actor of replica r died: drain the replica, recreate its dead actors from their checkpoints, and
        queue again what any of its stages lacks."""
        ray = self._ray
        from ray.exceptions import RayActorError, RayTaskError

        self.restarts += 1
        if self.restarts > self.max_restarts:
            saved = f"statistics checkpointed in {self.checkpoint_dir}" if self.checkpoint_dir else \
                "no checkpoint directory was set"
            raise WorkerLostError(
                f"actors died {self.restarts} times (limit {self.max_restarts}); {saved}. Fix the cause "
                "(memory? a lost node?) and rerun the same command to resume from the checkpoint")
        mine = [ref for ref, (rr, _) in inflight.items() if rr == r]
        for ref in mine:
            inflight.pop(ref)
        ray.wait(mine, num_returns=len(mine), timeout=60)
        for s, actor in enumerate(self.actors[r]):
            try:
                ray.get(actor.pid.remote(), timeout=60)
            except (RayActorError, RayTaskError, ray.exceptions.GetTimeoutError):
                ray.kill(actor)
                self.actors[r][s] = self._make_actor(r, s, restore=True)
        submitted = [k for k in share if k not in pending[r]]
        again = self._missing(r, submitted)
        self.replayed += len(again)
        pending[r] = again + pending[r]

    def _verify(self, share: dict[int, list[int]]) -> None:
        """Every actor holds exactly its replica's micro-batches, each once."""
        for r, row in enumerate(self.actors):
            for s, done in enumerate(self._ray.get([a.done_batches.remote() for a in row])):
                if sorted(done) != share[r]:
                    raise NBLError(f"replica {r} stage {s} holds micro-batches {done[:8]}..., expected "
                                   f"{share[r][:8]}...: the statistics would be wrong; please report this")

    def reduce(self, window: int = 2) -> None:
        """Merge every replica's statistics into replica 0's actors, actor to actor (Chan's update).

        One layer per object, at most `window` layers in flight per stage: replica 0's actor holds at most that
        many incoming layers' statistics (3 d x d float64 each) besides its own, and the object store never
        needs a replica's whole shard at once (15 GiB per actor for 10 layers at d = 8192, more than a store
        usually holds: sent whole, it spills to disk)."""
        ray = self._ray
        todo = {s.stage: [(r, i) for i in s.layers for r in range(1, len(self.actors))] for s in self.plan.stages}
        inflight: dict = {}  # merge ref -> stage
        while any(todo.values()) or inflight:
            for stage, queue in todo.items():
                while queue and sum(1 for v in inflight.values() if v == stage) < window:
                    r, i = queue.pop(0)
                    export = self.actors[r][stage].export_layer.remote(i)
                    inflight[self.actors[0][stage].merge_layer.remote(i, export)] = stage
            done, _ = ray.wait(list(inflight), num_returns=1)
            ray.get(done)
            for ref in done:
                inflight.pop(ref)

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

    def loss_scores(self, score_blocks: torch.Tensor, batch_size: int) -> dict[int, float]:
        """The measured rule: mean next-token loss increase on held-back blocks when each layer alone is
        linearized with its fitted map (the fits must exist: call fit(all layers) first).

        Every replica first runs the held-back blocks once, each stage caching its input; a candidate then
        restarts at its own stage (upstream activations are the same for every candidate downstream of them).
        Candidates go round-robin to replicas; a replica r > 0 receives the map from replica 0's actor.
        """
        ray = self._ray
        P, R = len(self.plan.stages), len(self.actors)
        ids = score_blocks.numpy().astype(np.int64)
        keys = list(range(-(-ids.shape[0] // batch_size)))
        part = {k: ids[k * batch_size:(k + 1) * batch_size] for k in keys}
        ray.get([row[-1].load_head.remote(self.model_dir) for row in self.actors])
        ray.get([a.prepare_candidates.remote(s.layers) for a, s in zip(self.actors[0], self.plan.stages)])

        def chain(r: int, k: int, layer: int | None, first: int):
            ref = None
            for s in range(first, P):
                inp = part[k] if (layer is None and s == 0) else ref
                ref = self.actors[r][s].score_batch.remote(
                    k, inp=inp, layer=layer if s == first else None, ids=part[k] if s == P - 1 else None,
                    cache=layer is None)
            return ref

        # Baseline pass on every replica: fills each stage's cache of its inputs.
        base = ray.get([chain(r, k, None, 0) for r in range(R) for k in keys])[: len(keys)]
        base_loss = sum(x["loss_sum"] for x in base)
        tokens = sum(x["tokens"] for x in base)
        layers = [i for s in self.plan.stages for i in s.layers]
        jobs = []  # (layer, replica, ref)
        for n, layer in enumerate(layers):
            r = n % R
            s = next(st.stage for st in self.plan.stages if layer in st.layers)
            if r:
                self.actors[r][s].set_candidate.remote(layer, self.actors[0][s].candidate_map.remote(layer))
            jobs += [(layer, r, s, k) for k in keys]
        results: dict[int, float] = {i: 0.0 for i in layers}
        inflight: dict = {}
        limit = self.max_inflight * P * R
        while jobs or inflight:
            while jobs and len(inflight) < limit:
                layer, r, s, k = jobs.pop(0)
                inflight[chain(r, k, layer, s)] = layer
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                results[inflight.pop(ref)] += ray.get(ref)["loss_sum"]
        ray.get([a.clear_scoring.remote() for row in self.actors for a in row])
        return {i: (results[i] - base_loss) / tokens for i in layers}

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
