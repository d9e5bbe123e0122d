"""The one publish of an output folder (nbl_dist/artifact/publish.py): a process killed between any two of its steps
leaves the previous folder or the new one whole, and the next run's recover() puts that one at --out."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nbl_dist.artifact.publish import aside_dir, check_out, publish, recover, staging_dir, staging_for
from nbl_dist.errors import ConfigError

OLD = {"config.json": "{\"old\": true}", "model.safetensors": "o" * 300_000}
NEW = {"config.json": "{\"new\": true}", "model.safetensors": "n" * 300_000, "nbl_report.json": "{}"}

# Publishes the staging folder of argv[1] and is killed (SIGKILL: no clean-up runs) right after step argv[2].
CHILD = """
import os, signal, sys
from nbl_dist.artifact.publish import publish, staging_dir
final, stop = sys.argv[1], int(sys.argv[2])
def after(step):
    if step == stop:
        os.kill(os.getpid(), signal.SIGKILL)
publish(staging_dir(final), final, after_step=after)
"""


def write(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def read(folder: Path) -> dict:
    return {p.name: p.read_text() for p in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_a_kill_between_steps_leaves_the_old_or_the_new_folder_whole(tmp_path, stop):
    final = tmp_path / "out"
    write(final, OLD)
    write(staging_dir(final), NEW)
    child = subprocess.run([sys.executable, "-c", CHILD, str(final), str(stop)], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # Right after the kill, one whole folder is somewhere: the previous one renamed aside (killed after step 1),
    # or the new one at --out (after step 2, 3).
    where = {"aside": read(aside_dir(final)), "out": read(final), "staging": read(staging_dir(final))}
    if stop == 1:
        assert where == {"aside": OLD, "out": {}, "staging": NEW}
    else:
        assert where["out"] == NEW and where["staging"] == {}
        assert where["aside"] in ({}, OLD)  # step 3 removes it; killed after step 2 it is whole still
    recover(final)
    assert read(final) == (OLD if stop == 1 else NEW)
    assert not aside_dir(final).exists() and not staging_dir(final).exists()


def test_a_kill_while_writing_leaves_the_previous_folder(tmp_path):
    """Killed while the staging folder was being written (before step 1): --out is untouched and the partial
    staging folder is removed by the next run's check."""
    final = tmp_path / "out"
    write(final, OLD)
    write(staging_dir(final), {"model.safetensors": "n" * 10})  # cut off
    check_out(final, overwrite=True)
    assert read(final) == OLD and not staging_dir(final).exists()


def test_publish_replaces_and_check_out_refuses_without_overwrite(tmp_path):
    final = tmp_path / "out"
    write(final, OLD)
    with pytest.raises(ConfigError, match=r"exists and is not empty; pass --overwrite or another --out"):
        check_out(final, overwrite=False)
    staging = staging_for(final)
    write(staging, NEW)
    assert publish(staging, final) == final and read(final) == NEW
    assert sorted(os.listdir(tmp_path)) == ["out"]
