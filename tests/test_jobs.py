"""The scaling-study job runs end to end and writes its CSV and plots; its shipped config parses."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from nbl_dist.options import load_yaml

REPO = Path(__file__).resolve().parents[1]


def test_study_config_parses():
    sys.path.insert(0, str(REPO / "jobs"))
    from scaling_study import DEFAULTS

    cfg = load_yaml(REPO / "jobs" / "configs" / "studies" / "scaling.yaml")
    assert set(cfg) <= set(DEFAULTS) and cfg["hidden"] and cfg["stages"]


@pytest.mark.slow
def test_scaling_study_smoke(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "scaling_study.py"), "--hidden", "64", "128",
                           "--layers", "2", "--stages", "1", "2", "--replicas", "1", "--samples", "2",
                           "--seq-len", "16", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "scaling.csv")))
    assert [(r["hidden"], r["stages"]) for r in rows] == [("64", "1"), ("64", "2"), ("128", "1"), ("128", "2")]
    assert all(float(r["tokens_per_s"]) > 0 and int(r["tokens"]) == 32 for r in rows)
    assert int(rows[2]["params"]) > int(rows[0]["params"])
    for png in ("time_vs_params.png", "tokens_per_s_vs_stages.png", "memory_per_actor.png"):
        assert (out / png).stat().st_size > 1000
