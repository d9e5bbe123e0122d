"""A GPU cluster driven from a node without CUDA, watched through Ray's own tools, and refused when its nodes do
not share the checkpoint folder: on a simulated cluster (ray.cluster_utils.Cluster) whose two worker nodes
advertise one GPU each while nothing here has CUDA.

What runs for real: the device, dtype and memory resolution against the cluster's resources, the memory probe
tasks holding a GPU on each GPU node, the placement group of GPU bundles, the actors scheduled with num_gpus=1
(Ray assigns each a GPU id), their names, the metrics, the storage probe. What cannot run here is CUDA inside
the actors: CudaStandInWorker (test only) records what it was given and computes its shard on the CPU.
"""

import contextlib
import dataclasses
import re
import time
import urllib.request

import pytest
import ray
import torch
from safetensors.torch import load_file

from nbl_dist import calibrate
from nbl_dist.calibration import resume
from nbl_dist.calibration.ray.actors import RayShardWorker
from nbl_dist.calibration.ray.backend import RayBackend
from nbl_dist.errors import CheckpointError, ConfigError, PlanError
from nbl_dist.runtime import shared
from tests.test_cluster import simulated_cluster

pytestmark = pytest.mark.slow

# Every torch.cuda entry point the driver path could reach (initialising CUDA or asking about devices).
CUDA_CALLS = ("is_available", "init", "_lazy_init", "device_count", "current_device", "get_device_properties",
              "get_device_name", "mem_get_info", "synchronize", "max_memory_allocated")


@pytest.fixture(scope="module")
def gpu_cluster():
    """A head (1 CPU, no GPU: where the driver runs) and two worker nodes of 1 CPU and 1 GPU each; metrics
    exported every 0.5 s."""
    with simulated_cluster(workers=2, worker_gpus=1, head_config={"metrics_report_interval_ms": 500}) as c:
        yield c


def state(gpu_cluster, kind: str, **kwargs) -> list:
    """Ray's state API (list_actors, list_placement_groups) of this cluster, named explicitly: other Ray
    instances may run on the machine."""
    from ray.util import state as ray_state

    return getattr(ray_state, f"list_{kind}")(address=gpu_cluster[0].address, detail=True, **kwargs)


@contextlib.contextmanager
def driver_without_cuda():
    """Every torch.cuda entry point in this (the driver's) process raises and is recorded. Yields the calls."""
    calls, saved = [], {name: getattr(torch.cuda, name) for name in CUDA_CALLS}

    def forbid(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the driver called torch.cuda.{name}")
        return call

    for name in CUDA_CALLS:
        setattr(torch.cuda, name, forbid(name))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


class CudaStandInWorker(RayShardWorker):
    """Test only. Ray scheduled this actor with num_gpus=1 on a node that advertises a GPU, but this machine has
    no CUDA: it keeps the device it was asked for and the GPU ids Ray assigned it, and runs its shard on the CPU."""

    def __init__(self, *args, device: str, **kwargs):
        self.asked, self.gpu_ids = device, ray.get_gpu_ids()
        super().__init__(*args, device="cpu", **kwargs)

    def info(self):
        return dataclasses.replace(super().info(), device=f"{self.asked} on GPU ids {self.gpu_ids}")


def gpu_request(resources: dict) -> float:
    """GPUs an actor in a placement group holds, from Ray's resource names for it (GPU_group_<index>_<pg id>)."""
    return sum(v for k, v in resources.items() if re.fullmatch(r"GPU_group_\d+_\w+", k))


def exported_metric(name: str, labels: dict, expected: float, timeout_s: float = 15.0) -> float | None:
    """A metric's value as Ray's metrics agents export it to Prometheus (any node): `expected` as soon as it is
    exported, else the last value seen when the time is up (an agent may still hold an earlier report)."""
    deadline, seen = time.time() + timeout_s, None
    while time.time() < deadline:
        for node in ray.nodes():
            with urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                        seen = float(line.rsplit(" ", 1)[1])
                        if seen == expected:
                            return seen
        time.sleep(0.5)
    return seen


def test_gpu_plan_from_a_driver_without_cuda(gpu_cluster, make_model_dir, tmp_path, monkeypatch):
    """--device auto on the GPU cluster: one GPU per actor (num_gpus=1 in Ray's records), the checkpoint's dtype
    (auto follows the actors' device, not the driver's CPU), actors named by stage and replica and a placement
    group named after the run while it runs, progress in Ray's metrics, the driver never touching CUDA; W and b
    equal the in-process float64 result."""
    _, workers = gpu_cluster
    src = make_model_dir("llama", torch.float64, num_hidden_layers=4)
    blocks = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(7))
    quiet = dict(blocks=blocks, batch_size=2, linearize=2, rank_by="cca", log=lambda *a: None)
    monkeypatch.setattr(RayBackend, "worker_cls", CudaStandInWorker)
    seen = {}

    def look(tokens):
        if not seen:  # during the run: the actors die when it ends
            seen["actors"] = state(gpu_cluster, "actors", filters=[("state", "=", "ALIVE")])
            seen["groups"] = state(gpu_cluster, "placement_groups", filters=[("state", "=", "CREATED")])

    with driver_without_cuda() as cuda_calls:
        rep = calibrate(src, tmp_path / "gpu-run", stages=2, device="auto", device_memory="4GiB", on_progress=look,
                        **quiet)
    assert cuda_calls == []
    assert rep["device"] == "cuda" and rep["plan"]["device"] == "cuda" and rep["dtype"] == "float64"
    gpu_nodes = {w.node_id for w in workers}
    assert {p["node"] for p in rep["placement"]} == gpu_nodes  # one actor on each GPU node
    assert all(re.fullmatch(r"cuda on GPU ids \[\d+\]", p["device"]) for p in rep["placement"]), rep["placement"]

    (group,) = seen["groups"]
    assert re.fullmatch(r"nbl-gpu-run-[0-9a-f]{8}", group.name)
    assert [b["unit_resources"].get("GPU") for b in group.bundles] == [1.0, 1.0]
    actors = {a.name: a for a in seen["actors"] if a.placement_group_id == group.placement_group_id}
    assert sorted(actors) == [f"{group.name}-stage0-replica0", f"{group.name}-stage1-replica0"]
    assert all(gpu_request(a.required_resources) == 1.0 for a in actors.values())
    assert {a.node_id for a in actors.values()} == gpu_nodes

    streamed = exported_metric("ray_nbl_progress_done", {"run": group.name, "phase": "streaming"}, blocks.numel())
    assert streamed == blocks.numel()
    assert exported_metric("ray_nbl_progress_done", {"run": group.name, "phase": "fitting"}, 2) == 2

    ref = calibrate(src, tmp_path / "ref", backend="in-process", device="cpu", dtype="float64", **quiet)
    assert rep["selected_layers"] == ref["selected_layers"]
    got, want = load_file(str(tmp_path / "gpu-run/model-nbl.safetensors")), \
        load_file(str(tmp_path / "ref/model-nbl.safetensors"))
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-9 * want[k].abs().max()


def test_gpu_device_and_memory_refused_before_loading(gpu_cluster, make_model_dir, tmp_path):
    """Without --device-memory the budget comes from a probe holding a GPU on each GPU node: here torch there
    sees no CUDA, so it is refused naming the option; more actors than GPUs are refused too. Both before the
    data (a path that does not exist) is read."""
    src = make_model_dir("llama", torch.float64, num_hidden_layers=4)
    opts = dict(data=str(tmp_path / "no-such-data"), samples=4, seq_len=32, linearize=2, log=lambda *a: None)
    with driver_without_cuda() as cuda_calls:
        with pytest.raises(PlanError, match=r"torch on GPU node\(s\) .* sees no CUDA device.*--device-memory"):
            calibrate(src, tmp_path / "probe", stages=2, device="auto", **opts)
        for device in ("auto", "cuda"):
            with pytest.raises(ConfigError, match=r"\(3 actors.*has 2 GPUs"):
                calibrate(src, tmp_path / "three", stages=3, device=device, **opts)
    assert cuda_calls == []
    assert not (tmp_path / "probe").exists() and not (tmp_path / "three").exists()


def test_checkpoint_folder_not_shared_is_refused_before_loading(gpu_cluster, make_model_dir, tmp_path,
                                                                monkeypatch):
    """--device cuda, two GPU actors on the two worker nodes; the first worker node has a disk of its own at the
    checkpoint folder's path. The nodes all share this machine's filesystem, so the storage probe that node runs
    is pointed at another folder (what a node-local disk mounted at that path shows it); the probe's reads and
    writes, and the driver's, are the real ones. The run is refused before any actor exists, naming the node."""
    _, workers = gpu_cluster
    src = make_model_dir("llama", torch.float64, num_hidden_layers=4)
    blocks = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(8))
    private, real_probe = workers[0].node_id, shared.node_probe

    def node_local_disk(folder, token, reads, node):
        return real_probe(folder + "-local" if node == private else folder, token, reads, node)

    monkeypatch.setattr(shared, "node_probe", node_local_disk)
    with pytest.raises(CheckpointError) as refused:
        calibrate(src, tmp_path / "unshared", blocks=blocks, batch_size=2, linearize=2, stages=2, device="cuda",
                  device_memory="4GiB", rank_by="cca", log=lambda *a: None)
    message, ckpt = str(refused.value), tmp_path / ".unshared.ckpt"
    assert f"node {private[:12]} does not see the files the driver writes in {ckpt}" in message
    assert f"the driver does not see the files node {private[:12]} writes in {ckpt}" in message
    assert workers[1].node_id[:12] not in message and "--checkpoint-dir" in message
    (group,) = state(gpu_cluster, "placement_groups", filters=[("name", "=", run_name(tmp_path))])
    assert [b["unit_resources"].get("GPU") for b in group.bundles] == [1.0, 1.0]  # --device cuda: a GPU each
    assert not [a for a in state(gpu_cluster, "actors") if (a.name or "").startswith(group.name)]  # none loaded
    assert not (tmp_path / "unshared").exists() and not list(ckpt.glob(".nbl-probe-*"))


def run_name(tmp_path) -> str:
    """The run's name, from the manifest its snapshot folder got before the refusal."""
    import json

    fingerprint = json.loads((tmp_path / ".unshared.ckpt" / resume.MANIFEST).read_text())["fingerprint"]
    return f"nbl-unshared-{fingerprint[:8]}"


def test_heal_refuses_storage_or_baseline_a_node_does_not_share(gpu_cluster, make_model_dir, tmp_path, monkeypatch):
    """Healing checks its folders on every node that can hold one of its workers before any worker starts: here
    the first GPU node has a disk of its own at --storage's path and lacks the baseline (its probe is pointed at
    other folders, as on the calibration test above). Refused naming the node and each folder, before Ray Train
    runs: no run folder, no output."""
    from nbl_dist import heal
    from tests.helpers import CORPUS

    _, workers = gpu_cluster
    src = make_model_dir("llama", torch.float32)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(" ".join(CORPUS * 4))
    out = tmp_path / "nbl"
    calibrate(src, out, data=str(data), samples=4, seq_len=16, linearize=2, backend="in-process", rank_by="cca",
              log=lambda *a: None)
    private, real_probe = workers[0].node_id, shared.node_probe

    def node_local_disk(folder, token, reads, node):
        if node == private:
            folder, reads = folder + "-local", {**reads, "baseline folder": reads["baseline folder"] + "-missing"}
        return real_probe(folder, token, reads, node)

    monkeypatch.setattr(shared, "node_probe", node_local_disk)
    storage = tmp_path / "storage"
    with pytest.raises(CheckpointError) as refused:
        heal(out, src, str(data), tmp_path / "healed", steps=1, seq_len=16, reserve_eval=1, kl_samples=1,
             device_memory="4GiB", storage=str(storage), log=lambda *a: None)
    message, node = str(refused.value), f"node {private[:12]}"
    assert f"{node} does not see the baseline folder {src} (no config.json there)" in message
    assert f"{node} does not see the files the driver writes in {storage}" in message
    assert f"the driver does not see the files {node} writes in {storage}" in message
    assert workers[1].node_id[:12] not in message and "--storage" in message
    assert not (tmp_path / "healed").exists() and (not storage.exists() or not any(storage.iterdir()))
