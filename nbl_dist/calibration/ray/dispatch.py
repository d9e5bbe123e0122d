"""Bounded dispatch of Ray object refs: every phase of the calibration actors goes through a Window of refs in
flight, and gather waits for a list of refs while a progress line counts them."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator


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


def gather(ray, refs: list, tick: Callable[[int], None], weights: list[int]) -> list:
    """ray.get(refs) in order, ticking `tick` with each ref's weight as it completes, in whatever order."""
    weight = dict(zip(refs, weights))
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        tick(weight[done[0]])
    return ray.get(refs)
