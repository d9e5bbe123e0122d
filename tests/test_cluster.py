"""The Ray path on real clusters: a simulated two-node cluster, and `ray job submit` against `ray start --head`."""

import contextlib
import json
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from safetensors.torch import load_file

from nbl_dist import calibrate
from tests.helpers import CORPUS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@contextlib.contextmanager
def simulated_cluster(workers: int, worker_gpus: int = 0, head_config: dict | None = None):
    """A head and `workers` worker nodes of one CPU each (ray.cluster_utils.Cluster), this driver connected to
    it; all shut down afterwards. Yields (cluster, worker nodes).

    Args:
        worker_gpus: GPUs each worker node advertises (Ray's resources only: this machine has no CUDA).
        head_config: Ray system config of the head (e.g. a short metrics report interval).
    """
    if ray.is_initialized():
        ray.shutdown()
    # A lost node is declared dead after 2 missed health checks 1 s apart (Ray's defaults: 5, 3 s apart), so the
    # lost-node tests wait seconds, not tens of seconds, before the run meets its dead actors.
    config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2, **(head_config or {})}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": config})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=worker_gpus) for _ in range(workers)]
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def remove_node_and_wait(cluster, node, timeout_s: float = 60) -> None:
    """Kill a node, then wait until Ray reports it dead (the run then meets its dead actors)."""
    cluster.remove_node(node, allow_graceful=False)
    deadline = time.time() + timeout_s
    while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()) and time.time() < deadline:
        time.sleep(0.5)


def test_two_node_cluster_places_stages_on_both_nodes(make_model_dir, tmp_path):
    with simulated_cluster(workers=1):
        src = make_model_dir("llama", torch.float64, num_hidden_layers=4)
        blocks = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(3))
        quiet = dict(blocks=blocks, batch_size=2, linearize=2, dtype="float64", rank_by="cca", log=lambda *a: None)
        rep = calibrate(src, tmp_path / "multi", stages=2, placement="SPREAD", **quiet)
        nodes = {p["node"] for p in rep["placement"]}
        assert len(nodes) == 2, rep["placement"]  # one stage on each node
        assert {p["node"] for p in rep["placement"]} <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        ref = calibrate(src, tmp_path / "ref", backend="in-process", **quiet)
        assert rep["selected_layers"] == ref["selected_layers"]
        for a, b in zip(rep["layers"], ref["layers"]):
            assert a["cca_bound"] == pytest.approx(b["cca_bound"], rel=1e-9)
        got, want = load_file(str(tmp_path / "multi/model-nbl.safetensors")), \
            load_file(str(tmp_path / "ref/model-nbl.safetensors"))
        for k in want:
            assert (got[k] - want[k]).abs().max() <= 1e-9 * want[k].abs().max()


def test_ray_job_submit(make_model_dir, tmp_path, ray_head):
    """Submit jobs/calibrate.py with `ray job submit` to a head started with `ray start --head`; check the output."""
    if ray.is_initialized():
        ray.shutdown()
    src = make_model_dir("llama", torch.float32)
    data = tmp_path / "texts"
    data.mkdir()
    for i, text in enumerate(CORPUS[:5]):
        (data / f"doc{i}.txt").write_text(text)
    out = tmp_path / "job-out"
    code, log = ray_head.submit(
        ["python", "jobs/calibrate.py", "--model", str(src), "--data", str(data), "--out", str(out), "--samples", "4",
         "--seq-len", "32", "--linearize", "1", "--stages", "2", "--batch-size", "2", "--rank-by", "cca"], REPO)
    # no --address: as the README prints it; cca: four tiny blocks, none to spare for the default rule's held-back
    # measurement
    assert code == 0, log[-4000:]
    assert "succeeded" in log, log[-4000:]
    assert "Shard plan" in log and "tok/s" in log  # plan and progress reach the job's log
    report = json.loads((out / "nbl_report.json").read_text())
    assert len(report["selected_layers"]) == 1 and len(report["placement"]) == 2
    assert (out / "model-nbl.safetensors").exists() and (out / "tokenizer.json").exists()
    # The actors ran on the job's cluster (its one node, the head), not on a private Ray the job started.
    ray.init(address=ray_head.gcs)
    try:
        head_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
    assert len(head_ids) == 1 and {p["node"] for p in report["placement"]} == head_ids, report["placement"]


def test_lost_node_actor_comes_back_on_the_spare_node(make_model_dir, tmp_path):
    """Three nodes, two stages: the node holding stage 1's actor is removed mid-stream; Ray re-places its bundle
    on the spare node, the actor is recreated there, and W, b equal the undisturbed single-process result."""
    with simulated_cluster(workers=2) as (cluster, workers):
        src = make_model_dir("llama", torch.float64, num_hidden_layers=4)
        blocks = torch.randint(0, 320, (12, 32), generator=torch.Generator().manual_seed(5))
        quiet = dict(blocks=blocks, batch_size=1, linearize=2, dtype="float64", rank_by="cca", log=lambda *a: None)
        by_id = {w.node_id: w for w in workers}
        removed = []

        def remove_stage_node(tokens, seen=[]):
            seen.append(tokens)
            if len(seen) == 2 and not removed:
                node = next(nid for nid in actor_nodes() if nid in by_id)  # a worker node holding a stage
                removed.append(node)
                remove_node_and_wait(cluster, by_id[node])

        def actor_nodes():
            from ray.util.state import list_actors

            return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")])
                    if "ShardWorker" in a.class_name}

        rep = calibrate(src, tmp_path / "run", stages=2, placement="SPREAD", on_progress=remove_stage_node,
                        checkpoint_every=1, **quiet)
        assert removed and rep["recovery"]["actor_restarts"] >= 1 and rep["recovery"]["restart_wait_s"] > 0
        nodes = {p["node"] for p in rep["placement"]}
        assert removed[0] not in nodes and len(nodes) == 2, rep["placement"]
        ref = calibrate(src, tmp_path / "ref", backend="in-process", **quiet)
        got, want = load_file(str(tmp_path / "run/model-nbl.safetensors")), \
            load_file(str(tmp_path / "ref/model-nbl.safetensors"))
        assert rep["selected_layers"] == ref["selected_layers"]
        for k in want:
            assert (got[k] - want[k]).abs().max() <= 1e-9 * want[k].abs().max()


def test_lost_node_without_room_is_refused_clearly(make_model_dir, tmp_path, monkeypatch):
    """Two nodes, two stages, no spare: when the worker node is lost, no node can take its actor back; the run
    stops with a message saying so once the restart time is up, and leaves no output behind."""
    from nbl_dist.calibration.ray.actors import ActorGrid
    from nbl_dist.errors import WorkerLostError

    monkeypatch.setattr(ActorGrid, "restart_timeout_s", 5.0)  # the node is reported dead before the wait starts
    with simulated_cluster(workers=1) as (cluster, (worker,)):
        src = make_model_dir("llama", torch.float64, num_hidden_layers=4)
        blocks = torch.randint(0, 320, (12, 32), generator=torch.Generator().manual_seed(6))

        def remove_worker(tokens, seen=[]):
            seen.append(tokens)
            if len(seen) == 2:
                remove_node_and_wait(cluster, worker)

        t0 = time.perf_counter()
        with pytest.raises(WorkerLostError, match=r"could not start again within 5 s.*no live node has room"):
            calibrate(src, tmp_path / "run", blocks=blocks, batch_size=1, linearize=2, dtype="float64", rank_by="cca",
                      stages=2, placement="SPREAD", on_progress=remove_worker, log=lambda *a: None)
        assert time.perf_counter() - t0 < 120
        assert not (tmp_path / "run").exists()
