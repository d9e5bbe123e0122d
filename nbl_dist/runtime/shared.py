"""Do a run's nodes share its folders? Checked before any weights are read, by every workflow that spans nodes.

A run reads folders (the model, a baseline) on every node that holds one of its workers, and writes a folder that
another node must read later (calibration's statistics snapshots, which a recreated actor reloads anywhere; healing's
Ray Train checkpoints, which the driver reads at the end). A node-local disk mounted at the same path would make a
restart lose its state hours in, so each node checks that it sees the folders it reads and that it sees the written
folder as the driver does: the driver writes a probe file there that every node must read, and every node writes
one the driver must read. Nothing here imports Ray: the probes run on the nodes through RayCluster.run_on_nodes.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from nbl_dist.errors import CheckpointError

if TYPE_CHECKING:
    from nbl_dist.runtime.cluster import RayCluster


def probe_folder(folder: str | Path, token: str) -> Path:
    return Path(folder) / f".nbl-probe-{token}"


def write_probe(folder: str | Path) -> str:
    """The driver's half of the check: a file in `folder` every node must see. Returns its token."""
    token = uuid.uuid4().hex[:12]
    probe = probe_folder(folder, token)
    probe.mkdir(parents=True)
    (probe / "driver").write_text(token)
    return token


def node_probe(folder: str | None, token: str, reads: dict[str, str], node: str) -> dict:
    """Run on one node of the run: does it see each folder it reads (a config.json in it) and the driver's probe
    file, and can it write its own probe file (which the driver then looks for)?

    Args:
        folder: the written folder (None: nothing written to check).
        token: the driver's probe token.
        reads: what each read folder is ("model folder") -> its path.
        node: this node's id, naming its probe file.
    Returns:
        {"reads": {what: bool}, "sees_driver": bool, "write_error": None or the error's text}.
    """
    seen = {"reads": {what: (Path(path) / "config.json").is_file() for what, path in reads.items()},
            "sees_driver": True, "write_error": None}
    if folder:
        probe = probe_folder(folder, token)
        seen["sees_driver"] = (probe / "driver").is_file() and (probe / "driver").read_text() == token
        try:
            probe.mkdir(parents=True, exist_ok=True)
            (probe / f"node-{node}").write_text(token)
        except OSError as e:
            seen["write_error"] = str(e)
    return seen


def probe_problems(folder: str | None, token: str, reads: dict[str, str], seen: dict[str, dict | None]) -> list[str]:
    """What the node probes (node id -> node_probe's answer, None: no answer) and the driver's own look at the
    nodes' files say is not shared; empty when everything is."""
    problems = []
    for node, answer in seen.items():
        name = f"node {node[:12]}"
        if answer is None:
            problems.append(f"{name} did not answer the storage probe")
            continue
        for what, path in reads.items():
            if not answer["reads"][what]:
                problems.append(f"{name} does not see the {what} {path} (no config.json there)")
        if not folder:
            continue
        if answer["write_error"]:
            problems.append(f"{name} cannot write to {folder} ({answer['write_error']})")
        elif not (probe_folder(folder, token) / f"node-{node}").is_file():
            problems.append(f"the driver does not see the files {name} writes in {folder}")
        if not answer["sees_driver"]:
            problems.append(f"{name} does not see the files the driver writes in {folder}")
    return problems


def remove_probe(folder: str | Path, token: str) -> None:
    import shutil

    shutil.rmtree(probe_folder(folder, token), ignore_errors=True)


def check_shared(cluster: RayCluster, nodes: set[str], folder: str | None, reads: dict[str, str], fix: str,
                 timeout_s: float = 60.0) -> None:
    """When a run spans several nodes (the driver's and `nodes`), every one of `nodes` must see the folders it
    reads and see `folder` as the driver does. Nothing to check when the driver's node is the only one.

    Args:
        cluster: the joined cluster.
        nodes: the nodes that hold (or may hold) the run's workers.
        folder: the folder the run writes and other nodes read back (None: none).
        reads: what each read folder is ("model folder") -> its path.
        fix: the end of the refusal: which options put the folders somewhere shared.
    Raises:
        CheckpointError: naming each node that does not share the folders, and the fix.
    """
    others = sorted(set(nodes) - {cluster.driver_node()})
    if not others:
        return
    token = write_probe(folder) if folder else ""
    try:
        seen = cluster.run_on_nodes(node_probe, {n: (folder, token, reads, n) for n in others}, timeout_s)
        problems = probe_problems(folder, token, reads, seen)
    finally:
        if folder:
            remove_probe(folder, token)
    if problems:
        raise CheckpointError(f"the run's nodes do not share its folders: {'; '.join(problems)}. {fix}")
