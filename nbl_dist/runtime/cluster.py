"""The Ray cluster every workflow runs on: join it or start a local Ray, read its GPUs and probe their memory, size
each worker's CPUs, run a task on chosen nodes, reserve one placement-group bundle per actor, name a run, and tear
down what this run created. The Ray importers are this module, calibration/ray/ (the calibration actors) and
training/ray_train.py (Ray Train); everything else receives a RayCluster as an object."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

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


def connect(address: str | None, dashboard: bool = False) -> bool:
    """Join the cluster at `address` (or the one this process runs in), or start a local Ray in this process, with
    its dashboard when asked (Ray Train's controller watches its actors through the dashboard's state API).
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
            ray.init(address="local", include_dashboard=dashboard)
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
        dashboard: start a local Ray with its dashboard (Ray Train needs its state API).
    """

    def __init__(self, address: str | None, dashboard: bool = False):
        import ray

        self.ray = ray
        # A Ray on this machine (started here, or this process's own): its memory is this machine's RAM.
        self.local = cluster_address(address)[0] is None
        self.started_ray = connect(address, dashboard)
        self.pg = None

    def gpus(self) -> float:
        """GPUs the cluster advertises, whatever the driver's own node has (often none: a head node)."""
        return float(self.ray.cluster_resources().get("GPU", 0.0))

    def alive_nodes(self) -> list[dict]:
        return [nd for nd in self.ray.nodes() if nd.get("Alive")]

    def cpus_per_actor(self, n_actors: int, gpu: bool = False) -> float:
        """The cluster's CPUs shared out: the actors are all that runs, and each uses as many torch threads as
        CPUs it reserved (one actor on a 2-CPU machine gets both, like the in-process backend). No more than
        the smallest node has, so every bundle can land somewhere; nodes without CPUs (a head started with
        --num-cpus 0) hold no actor and do not count. A GPU actor gets its GPU node's CPUs over its GPUs."""
        resources = [nd["Resources"] for nd in self.alive_nodes()]
        if gpu:
            cpus = min(r.get("CPU", 0.0) / r["GPU"] for r in resources if r.get("GPU"))
        else:
            cluster_cpus = float(self.ray.cluster_resources().get("CPU", 1.0))
            node_cpus = [r["CPU"] for r in resources if r.get("CPU")]
            cpus = min(cluster_cpus / n_actors, min(node_cpus or [cluster_cpus]))
        cpus = max(0.01, cpus)
        return float(int(cpus)) if cpus >= 1 else cpus  # whole CPUs: whole torch threads

    def memory_per_actor(self, n_actors: int, cpus_per_actor: float | None) -> int | None:
        """Memory a CPU actor can count on: of the nodes that can hold one, the smallest share of a node's memory
        (Ray's `memory` resource, what its raylet reported) over the actors its CPUs can hold. None when no node
        can hold one (the placement group then says so)."""
        cpus = cpus_per_actor or self.cpus_per_actor(n_actors)
        shares = [int(r.get("memory", 0) // min(n_actors, int(r["CPU"] // cpus)))
                  for r in (nd["Resources"] for nd in self.alive_nodes()) if r.get("CPU", 0.0) >= cpus]
        return min(shares) if shares else None

    def run_on_nodes(self, fn: Callable, calls: dict[str, tuple], timeout_s: float, num_gpus: int = 0) -> dict:
        """fn(*args) once on each node of `calls` (node id -> args), as a task pinned to that node, holding
        num_gpus GPUs and no CPU (the cluster may be busy). Returns node id -> result, None for a node that did
        not answer within timeout_s (its task is cancelled)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = self.ray.remote(fn)
        refs = {node: task.options(num_cpus=0, num_gpus=num_gpus, max_retries=0, name=f"nbl-{fn.__name__}",
                                   scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                                   ).remote(*args) for node, args in calls.items()}
        ready, pending = self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for ref in pending:
            self.ray.cancel(ref, force=True)
        return {node: self.ray.get(ref) if ref in ready else None for node, ref in refs.items()}

    def run_task(self, fn: Callable, args: tuple, num_cpus: float, num_gpus: int = 0, name: str = "") -> object:
        """fn(*args) as one task anywhere the cluster can place it (a workflow's single step on a GPU node, e.g.
        quantization's llm-compressor step), its result returned; an exception it raises is re-raised here as it
        was (Ray wraps it in a subclass of its own type), so an NBLError keeps its one-line message."""
        task = self.ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0,
                                           name=name or f"nbl-{fn.__name__}")
        try:
            return self.ray.get(task.remote(*args))
        except self.ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    def probe_gpus(self, timeout_s: float = 60.0) -> dict[str, dict | None]:
        """Each GPU node's gpu_memory_report, from a task holding one of its GPUs, before anything is loaded:
        the driver's own node may have no GPU and never initialises CUDA. Node id -> report (None: no answer)."""
        nodes = [nd["NodeID"] for nd in self.alive_nodes() if nd["Resources"].get("GPU")]
        return self.run_on_nodes(gpu_memory_report, {node: () for node in nodes}, timeout_s, num_gpus=1)

    def reserve(self, n: int, bundle: dict, strategy: str, timeout_s: float, name: str = "") -> None:
        """One bundle per actor, in a placement group named after the run (the dashboard shows it); a clear
        error (after tearing down) when the cluster cannot place them in time."""
        from ray.util.placement_group import placement_group

        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy.upper(), name=name)
        ready, _ = self.ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            resources = self.ray.cluster_resources()
            self.close()
            raise RayStartError(
                f"the cluster cannot place {n} actors of {bundle} with strategy {strategy} within "
                f"{timeout_s:.0f} s (cluster has {resources}). Lower --stages/--replicas, "
                "set --cpus-per-actor, add nodes, or use --placement PACK")

    def bundle_nodes(self) -> set[str]:
        """The nodes holding the placement group's bundles (once it is ready)."""
        from ray.util.placement_group import placement_group_table

        return set(placement_group_table(self.pg)["bundles_to_node_id"].values())

    def driver_node(self) -> str:
        return self.ray.get_runtime_context().get_node_id()

    def worker_nodes(self, cpus: float, gpus: float = 0) -> set[str]:
        """The alive nodes that can hold a worker of `cpus` CPUs and `gpus` GPUs (where Ray Train may put one)."""
        return {nd["NodeID"] for nd in self.alive_nodes()
                if nd["Resources"].get("CPU", 0.0) >= cpus and nd["Resources"].get("GPU", 0.0) >= gpus}

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


@contextlib.contextmanager
def closed_on_error(cluster: RayCluster | None):
    """Leave the cluster as it was (a Ray started here shut down) when set-up fails before the work owns it."""
    try:
        yield
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise


def run_name(kind: str, out: str | Path, fingerprint: str) -> str:
    """A run's name on the cluster, `<kind>-<out folder name>-<8 hex digits of its fingerprint>`: calibration
    names its placement group and actors with it, healing its Ray Train run. Two runs into one folder on the same
    inputs share it (Ray refuses the second actor group; Ray Train resumes the first)."""
    return f"{kind}-{Path(out).name}-{fingerprint[:8]}"


def gpu_memory_report() -> dict:
    """Run on a node by a probe task holding one GPU (Ray sets CUDA_VISIBLE_DEVICES to it), never in the driver.

    Returns:
        {"cuda": False} when torch there sees no CUDA device; else {"cuda": True, "total": bytes, "free": bytes,
        "name": the GPU's name}.
    """
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    free, total = torch.cuda.mem_get_info(0)
    return {"cuda": True, "total": int(total), "free": int(free), "name": torch.cuda.get_device_name(0)}
