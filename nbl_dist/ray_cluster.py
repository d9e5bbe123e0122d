"""Cluster set-up for the Ray backend: join or start Ray, size each actor's CPUs, reserve one placement-group
bundle per actor, and tear down what this run created. With ray_backend.py, the only modules that import Ray."""

from __future__ import annotations

import os
import socket

from nbl_dist.errors import RayStartError


def cluster_address(address: str | None) -> tuple[str | None, str]:
    """(the cluster to join, where that came from). `address` when given; else the cluster this process runs in:
    `ray job submit` sets RAY_ADDRESS for its entry point, and starting a private local Ray inside a job would run
    the actors outside the job's cluster, without its working dir. An http(s) RAY_ADDRESS names a dashboard for
    `ray job submit`, not a cluster to join, and is left alone. None: start a local Ray."""
    if address:
        return address, "--address"
    env = os.environ.get("RAY_ADDRESS", "")
    if env and not env.startswith(("http://", "https://")):
        return env, "RAY_ADDRESS"
    return None, ""


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (or the one this process runs in), or start a local Ray in this process.
    Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address, source = cluster_address(address)
    if address and address not in ("auto", "local") and not address.startswith("ray://"):
        check_reachable(address, source)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address="local", include_dashboard=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayStartError(
            f"could not reach a Ray cluster at {source} {address!r}: {e}. Start one with `ray start --head` "
            "(with RAY_AUTH_MODE=disabled for a local test cluster) or leave --address out to run locally"
        ) from e
    return True


def check_reachable(address: str, source: str = "--address", timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at host:port (Ray itself retries for a long time)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        raise RayStartError(
            f"{source} {address!r} does not answer ({e}); check the head node's address and port "
            "(`ray start --head` prints it), or leave --address out to run on a local Ray") from e


class RayCluster:
    """The Ray cluster a run uses and the placement group holding one bundle per actor.

    Args:
        address: cluster to join, or None for a local Ray started here (and shut down by close()).
    """

    def __init__(self, address: str | None):
        import ray

        self.ray = ray
        self.started_ray = connect(address)
        self.pg = None

    def cpus_per_actor(self, n_actors: int) -> float:
        """The cluster's CPUs shared out: the actors are all that runs, and each uses as many torch threads as
        CPUs it reserved (one actor on a 2-CPU machine gets both, like the in-process backend). No more than
        the smallest node has, so every bundle can land somewhere."""
        cluster_cpus = float(self.ray.cluster_resources().get("CPU", 1.0))
        node_cpus = [nd["Resources"].get("CPU", 0.0) for nd in self.ray.nodes() if nd.get("Alive")]
        cpus = max(0.01, min(cluster_cpus / n_actors, min(node_cpus or [cluster_cpus])))
        return float(int(cpus)) if cpus >= 1 else cpus  # whole CPUs: whole torch threads

    def reserve(self, n: int, bundle: dict, strategy: str, timeout_s: float) -> None:
        """One bundle per actor; a clear error (after tearing down) when the cluster cannot place them in time."""
        from ray.util.placement_group import placement_group

        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy.upper())
        ready, _ = self.ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            resources = self.ray.cluster_resources()
            self.close()
            raise RayStartError(
                f"the cluster cannot place {n} actors of {bundle} with strategy {strategy} within "
                f"{timeout_s:.0f} s (cluster has {resources}). Lower --stages/--replicas, "
                "set --cpus-per-actor, add nodes, or use --placement PACK")

    def bundle(self, index: int):
        """The scheduling strategy that puts an actor into bundle `index` of the placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=index)

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        if self.started_ray:
            self.ray.shutdown()
            self.started_ray = False
