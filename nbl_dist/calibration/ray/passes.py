"""The passes of a calibration over the actor grid: the statistics stream (StreamPass), the merge of replicas and
the fits on the owners of the merged statistics (OwnerState), and the measured rules' held-back forwards of layer
sets (SetPass)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from nbl_dist.calibration.backend import StreamResult
from nbl_dist.calibration.ray.actors import ActorGrid, RestartBudget
from nbl_dist.calibration.ray.dispatch import Window, gather
from nbl_dist.calibration.resume import missing_batches
from nbl_dist.core.selection import SetMeasure, measure_of
from nbl_dist.errors import NBLError
from nbl_dist.runtime.progress import RunProgress


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
