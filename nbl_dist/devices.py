"""Where the forward runs and how much memory each actor has, decided for the actors, where they run.

The in-process backend computes in this process, so its device is this process's own. The Ray driver often runs
on a head node without a GPU (`ray job submit` runs the entry point there, and KubeRay or cloud heads have none):
its device comes from the cluster's resources, its memory budget from what a probe holding one GPU reports on
each GPU node, and the driver itself never initialises CUDA. Nothing here imports Ray; ray_cluster.py runs
`gpu_memory_report` on the nodes.
"""

from __future__ import annotations

import dataclasses

from nbl_dist.errors import ConfigError, PlanError


def resolve_local_device(device: str) -> str:
    """The device of a run in this process (the in-process backend): auto is CUDA when this process sees it."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    return device


def resolve_actor_device(device: str, cluster_gpus: float, actors: int) -> str:
    """The actors' device from the cluster's GPU count: one GPU per actor when the cluster has GPUs (auto or
    cuda), else CPU (auto); refused before anything is loaded when the GPUs cannot hold one actor each.

    Args:
        device: --device (auto, cpu or cuda).
        cluster_gpus: GPUs the Ray cluster advertises (ray.cluster_resources()["GPU"]), whatever the driver sees.
        actors: stages x replicas.
    Returns:
        "cuda" or "cpu".
    Raises:
        ConfigError: --device cuda on a cluster without GPUs, or with fewer GPUs than actors.
    """
    if device == "cpu" or (device == "auto" and cluster_gpus == 0):
        return "cpu"
    if cluster_gpus == 0:
        raise ConfigError("--device cuda but the Ray cluster has no GPUs (its resources list none); add GPU nodes "
                          "to the cluster, or use --device cpu (or auto)")
    if cluster_gpus < actors:
        raise ConfigError(f"the plan needs one GPU per actor ({actors} actors: --stages x --replicas) but the Ray "
                          f"cluster has {cluster_gpus:g} GPUs; lower --stages or --replicas, add GPU nodes, or "
                          "use --device cpu")
    return "cuda"


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


@dataclasses.dataclass(frozen=True)
class DeviceBudget:
    """Memory per actor's device (None: not checked) and where that number came from, for the plan's log."""

    bytes: int | None
    source: str


def gpu_budget(reports: dict[str, dict | None], timeout_s: float) -> DeviceBudget:
    """The smallest GPU the probes found: every actor must fit on any GPU node its bundle may land on.

    Args:
        reports: node id -> gpu_memory_report() of that node, or None when its probe did not answer in time.
        timeout_s: how long the probes were given (for the message).
    Returns:
        The budget per actor.
    Raises:
        PlanError: a GPU node did not answer, or its torch sees no CUDA: the budget would be a guess, so the
            message names --device-memory.
    """
    silent = [node[:12] for node, r in reports.items() if r is None]
    no_cuda = [node[:12] for node, r in reports.items() if r is not None and not r["cuda"]]
    if silent or no_cuda or not reports:
        why = (f"GPU node(s) {', '.join(silent)} did not answer a memory probe within {timeout_s:.0f} s (GPUs "
               "busy?)" if silent else f"torch on GPU node(s) {', '.join(no_cuda)} sees no CUDA device (a CPU-only "
               "torch build there?)" if no_cuda else "the cluster lists no GPU node")
        raise PlanError(f"cannot tell how much memory the actors' GPUs have: {why}. Pass --device-memory with the "
                        "memory of one GPU, e.g. --device-memory 80GiB")
    smallest = min(reports.values(), key=lambda r: r["total"])
    return DeviceBudget(smallest["total"], f"the smallest GPU reported by the actors' nodes ({smallest['name']}, "
                                           f"{len(reports)} GPU node(s) probed)")
