"""Merging replicas when the object store is smaller than an actor's statistics (as it is for a 70B model: 10
layers at d = 8192 hold 15 GiB of float64 statistics per actor): the reduce as nbl-dist runs it (one layer per
object, two layers in flight per stage) against each replica's whole shard sent as one object (what it did
before), alternating in one run.

    .venv/bin/python benchmarks/merge_reduce.py [--object-store-mib 100 --rounds 3]
"""

import argparse
import statistics
import time

import torch
from common import REPO

from nbl_dist.calibration.plan import make_plan
from nbl_dist.calibration.ray.actors import RayShardWorker
from nbl_dist.calibration.ray.backend import RayBackend
from nbl_dist.model import synthetic


class WholeShardWorker(RayShardWorker):
    def export_shard(self) -> dict:
        return {i: s.to_numpy() for i, s in self.stats.items()}

    def merge_shards(self, *exports: dict) -> None:
        for exp in exports:
            for i, arrays in exp.items():
                self.merge_layer(int(i), arrays)


class WholeShardBackend(RayBackend):
    """The reduce before: every other replica's whole shard as one object, merged in one call per stage."""

    worker_cls = WholeShardWorker

    def reduce(self) -> None:
        rows = self.grid.rows
        self._ray.get([owner.merge_shards.remote(*[rows[r][s].export_shard.remote() for r in range(1, len(rows))])
                       for s, owner in enumerate(rows[0])])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--object-store-mib", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    import ray

    cfg = synthetic.llama_like(a.hidden, a.layers)
    model_dir, _ = synthetic.cached_random_checkpoint(cfg, REPO / "runs" / f"bench-merge-{a.layers}x{a.hidden}")
    blocks = torch.randint(0, 32000, (4, 128), generator=torch.Generator().manual_seed(0))
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=a.object_store_mib * 2**20)
    plan = make_plan(cfg, 1, replicas=2, seq_len=128)
    times = {"per layer": [], "whole shard": []}
    for r in range(a.rounds):
        for name in (list(times) if r % 2 == 0 else list(reversed(times))):
            backend = (RayBackend if name == "per layer" else WholeShardBackend)(str(model_dir), plan, torch.float32)
            try:
                backend.stream(blocks, 1)
                t = time.perf_counter()
                backend.reduce()
                times[name].append(time.perf_counter() - t)
                n = backend.scores()[0].tokens
                assert n == blocks.numel(), n  # both merged every token
            finally:
                backend.close()
    stats_mib = a.layers * 3 * a.hidden ** 2 * 8 / 2**20
    print(f"2 replicas x 1 stage, llama {a.layers} x d={a.hidden}: {stats_mib:.0f} MiB of statistics per actor "
          f"({stats_mib / a.layers:.0f} MiB per layer); object store {a.object_store_mib} MiB; {a.rounds} rounds")
    base = statistics.median(times["per layer"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>15}: reduce {med:6.2f} s (median; {min(ts):.2f}-{max(ts):.2f})  {med / base:5.1f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
