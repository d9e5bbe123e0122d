"""Device and memory resolution for the actors, the shared-folder probe and the progress lines, without Ray (the
cluster tests in test_cluster_devices.py run them on a simulated GPU cluster)."""

import io
import math

import pytest
import torch

from nbl_dist.errors import ConfigError, PlanError
from nbl_dist.runtime import shared
from nbl_dist.runtime.cluster import gpu_memory_report
from nbl_dist.runtime.progress import Progress, RunProgress
from nbl_dist.runtime.resources import gpu_budget, resolve_actor_device


@pytest.mark.parametrize("device,gpus,actors,want", [
    ("auto", 0, 4, "cpu"), ("auto", 8, 8, "cuda"), ("auto", 16, 2, "cuda"), ("cpu", 8, 2, "cpu"),
    ("cuda", 4, 4, "cuda"), ("cuda", 1, 1, "cuda")])
def test_actor_device_follows_the_cluster_gpus(device, gpus, actors, want):
    assert resolve_actor_device(device, gpus, actors) == want


def test_cuda_on_a_cluster_without_enough_gpus_is_refused():
    with pytest.raises(ConfigError, match="--device cuda but the Ray cluster has no GPUs.*--device cpu"):
        resolve_actor_device("cuda", 0, 2)
    for device in ("cuda", "auto"):  # GPUs, but fewer than actors: no silent fallback to CPU actors
        with pytest.raises(ConfigError, match=r"one GPU per actor \(4 actors.*has 3 GPUs; lower --stages"):
            resolve_actor_device(device, 3, 4)


def test_gpu_budget_is_the_smallest_gpu_or_refused():
    h100 = {"cuda": True, "total": 80 * 2**30, "free": 79 * 2**30, "name": "H100"}
    a10 = {"cuda": True, "total": 24 * 2**30, "free": 23 * 2**30, "name": "A10G"}
    budget = gpu_budget({"n1": h100, "n2": a10}, 60)
    assert budget.bytes == 24 * 2**30 and "A10G" in budget.source and "2 GPU node(s)" in budget.source
    with pytest.raises(PlanError, match=r"did not answer a memory probe within 60 s.*--device-memory 80GiB"):
        gpu_budget({"n1": h100, "n2": None}, 60)
    with pytest.raises(PlanError, match="sees no CUDA device.*--device-memory"):
        gpu_budget({"n1": h100, "n2": {"cuda": False}}, 60)


def test_gpu_memory_report_reads_the_probes_gpu(monkeypatch):
    """The probe's body, as a GPU node runs it (torch.cuda stood in for: this machine has no GPU)."""
    assert gpu_memory_report() == {"cuda": False}  # what a CPU-only torch reports
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (70 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100")
    assert gpu_memory_report() == {"cuda": True, "total": 80 * 2**30, "free": 70 * 2**30, "name": "NVIDIA H100"}


def test_storage_probe_finds_a_folder_each_node_sees_differently(tmp_path):
    """Two nodes share the driver's folders; a third has a disk of its own at the same paths (here: other
    folders), so neither side sees the other's probe file, nor it the model; a fourth never answered."""
    model, ckpt, local = tmp_path / "model", tmp_path / "ckpt", tmp_path / "node-c-disk"
    model.mkdir()
    (model / "config.json").write_text("{}")
    ckpt.mkdir()
    token = shared.write_probe(ckpt)
    seen = {"a" * 16: shared.node_probe(str(ckpt), token, {"model folder": str(model)}, "a" * 16),
            "b" * 16: shared.node_probe(str(ckpt), token, {"model folder": str(model)}, "b" * 16),
            "c" * 16: shared.node_probe(str(local), token, {"model folder": str(tmp_path / "nothing")}, "c" * 16),
            "d" * 16: None}
    problems = shared.probe_problems(str(ckpt), token, {"model folder": str(model)}, seen)
    c = "node " + "c" * 12
    assert problems == [f"{c} does not see the model folder {model} (no config.json there)",
                        f"the driver does not see the files {c} writes in {ckpt}",
                        f"{c} does not see the files the driver writes in {ckpt}",
                        "node " + "d" * 12 + " did not answer the storage probe"]
    shared.remove_probe(ckpt, token)
    assert list(ckpt.iterdir()) == []


class Recorder:
    def __init__(self):
        self.updates, self.restarts = [], []

    def update(self, phase, done, total, rate, eta_s):
        self.updates.append((phase, done, total, rate, eta_s))

    def restart(self, phase):
        self.restarts.append(phase)


def test_progress_lines_and_sink_per_phase():
    out, sink = io.StringIO(), Recorder()
    run = RunProgress(stream=out, sink=sink)
    fitting = run.phase("fitting", 3, "layers")
    for _ in range(3):
        fitting(1)
    writing = run.phase("writing", 3 * 2**20, "bytes")
    writing(3 * 2**20)
    run.restart("streaming", 1, 3)
    merging = run.phase("merging replicas", 2, "layers")
    merging(2)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fitting: 1/3 layers ( 33.3%)") and lines[1].startswith("fitting: 3/3 layers (100.0%)")
    assert lines[2].startswith("writing: 3.00 MiB/3.00 MiB (100.0%)") and "B/s, elapsed" in lines[2]
    assert lines[3] == "streaming: an actor died; recreating it from its snapshot (restart 1 of at most 3)"
    assert lines[4].startswith("merging replicas: 2/2 layers (100.0%)") and lines[4].endswith(
        ", 1 actor restart(s) so far") and "restart" not in lines[1]
    assert [(p, d, t) for p, d, t, _, _ in sink.updates] == [("fitting", 1, 3), ("fitting", 3, 3),
                                                             ("writing", 3 * 2**20, 3 * 2**20),
                                                             ("merging replicas", 2, 2)]
    assert sink.updates[1][4] == 0 and sink.updates[1][3] > 0 and sink.restarts == ["streaming"]
    bar = Progress(1000, stream=io.StringIO())
    bar(250)
    assert math.isclose(bar.done / bar.total, 0.25)


class ThreeNodes:
    """Stands in for the `ray` module's view of a cluster: a head started with --num-cpus 0, an 8-GPU node of 96
    CPUs and a 2-GPU node of 16 CPUs (memory in bytes as Ray's `memory` resource gives it)."""

    resources = [{"CPU": 0.0, "memory": 10.0}, {"CPU": 96.0, "GPU": 8.0, "memory": 1000.0},
                 {"CPU": 16.0, "GPU": 2.0, "memory": 200.0}]

    def nodes(self):
        return [{"Alive": True, "NodeID": f"n{i}", "Resources": r} for i, r in enumerate(self.resources)]

    def cluster_resources(self):
        return {"CPU": 112.0, "GPU": 10.0, "memory": 1210.0}


def test_actor_cpus_and_memory_from_node_resources():
    from nbl_dist.runtime.cluster import RayCluster

    cluster = RayCluster.__new__(RayCluster)  # no connection: only the arithmetic over the nodes' resources
    cluster.ray = ThreeNodes()
    assert cluster.gpus() == 10
    assert cluster.cpus_per_actor(4, gpu=True) == 8  # 16 CPUs over 2 GPUs on the smaller GPU node
    assert cluster.cpus_per_actor(4) == 16  # 112 / 4 = 28, but no more than the smallest node with CPUs
    assert cluster.cpus_per_actor(200) == 0.56  # 112 / 200
    # 16 CPUs each: the big node holds all 4 actors (1000 / 4), the small one 1 (200 / 1); the head none.
    assert cluster.memory_per_actor(4, None) == 200
    assert cluster.memory_per_actor(8, 12.0) == 125  # 8 on the big node (1000 / 8), 1 on the small (200)
    assert cluster.memory_per_actor(2, 100.0) is None  # no node has 100 CPUs
