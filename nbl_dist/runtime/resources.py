"""What a workflow's workers run on, decided before anything is loaded: their device, the forward dtype and the
memory each one has (one function, `memory_budget`, for every workflow), and the byte sizes those are written in.

The in-process paths compute in this process, so their device is this process's own. A Ray driver often runs on a
head node without a GPU (`ray job submit` runs the entry point there, and KubeRay or cloud heads have none): the
workers' device comes from the cluster's resources, their GPU memory from what a probe holding one GPU reports on
each GPU node, and the driver itself never initialises CUDA. Nothing here imports Ray: runtime/cluster.py runs
its `gpu_memory_report` on the nodes and is passed in as an object.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING

from nbl_dist.errors import ConfigError, PlanError

if TYPE_CHECKING:
    import torch

    from nbl_dist.runtime.cluster import RayCluster

GPU_PROBE_TIMEOUT_S = 60.0  # for the memory probe on each GPU node


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


def resolve_device(device: str, cluster: RayCluster | None, workers: int) -> str:
    """--device for the workers, from the cluster's resources (the driver's own CUDA is never asked), or for
    this process when there is no cluster (an in-process run)."""
    if cluster is None:
        return resolve_local_device(device)
    return resolve_actor_device(device, cluster.gpus(), workers)


def resolve_dtype(dtype: str, hf_config, device: str) -> torch.dtype:
    """auto: the checkpoint's dtype on GPU; float32 on CPU (CPU bf16 matmuls are slow and gain nothing here)."""
    import torch

    from nbl_dist.model.safetensors_io import torch_dtype

    if dtype != "auto":
        return torch_dtype(dtype)
    if device == "cpu":
        return torch.float32
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return torch_dtype(str(stored).removeprefix("torch.")) if stored else torch.bfloat16


def cpu_has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX), where oneDNN runs them
    about twice as fast as float32 (elsewhere bfloat16 is emulated and gains nothing). Linux's flags; False where
    they cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def memory_budget(device_memory: str | None, device: str, cluster: RayCluster | None, workers: int,
                  cpus_per_worker: float | None = None) -> DeviceBudget:
    """Memory per worker's device, before any weights are read, for every workflow: --device-memory when given;
    else, on GPUs, the smallest GPU that a probe on each GPU node reports (in-process: this process's GPU); on
    CPUs, the available RAM over the workers (a run on this machine: in-process, or a Ray started here) or each
    node's memory over the workers it can hold (a joined cluster, from Ray's resources).

    Args:
        device_memory: the --device-memory option as written, or None.
        device: the workers' resolved device, "cpu" or "cuda".
        cluster: the joined Ray cluster, or None for an in-process run.
        workers: how many workers share the cluster (actors, Ray Train workers).
        cpus_per_worker: CPUs each reserves (default: the cluster's CPUs shared out).
    Raises:
        PlanError: a GPU budget that cannot be read (the message names --device-memory).
    """
    if device_memory is not None:
        return DeviceBudget(parse_bytes(device_memory), "--device-memory")
    if device == "cuda" and cluster is None:
        import torch

        return DeviceBudget(torch.cuda.get_device_properties(0).total_memory, "this process's GPU")
    if device == "cuda":
        return gpu_budget(cluster.probe_gpus(GPU_PROBE_TIMEOUT_S), GPU_PROBE_TIMEOUT_S)
    if cluster is None or cluster.local:
        import psutil

        return DeviceBudget(psutil.virtual_memory().available // workers, f"available RAM over {workers} worker(s)")
    return DeviceBudget(cluster.memory_per_actor(workers, cpus_per_worker),
                        "the smallest node's memory (Ray's resources) over the workers it can hold")


def parse_bytes(text: str | int | None) -> int | None:
    """A memory size: '80GiB', '1.5GB', '512MiB', '1e9' or a number of bytes.

    Args:
        text: the size as written, a number of bytes, or None.
    Returns:
        The size in bytes (None for None).
    Raises:
        PlanError: the text is not a size.
    """
    if text is None or isinstance(text, int):
        return text
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9,
             "tb": 1e12, "b": 1}
    t = str(text).strip().lower().replace(" ", "")
    unit = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), None)
    try:
        number = float(t[: -len(unit)] if unit else t) * (units[unit] if unit else 1)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise PlanError(f"cannot read the memory size {text!r}; write it like 80GiB, 24GB or 512MiB")
    return int(number)


def fmt_bytes(n: float) -> str:
    """A byte count for people: 512 B, 1.50 MiB, 80.00 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
