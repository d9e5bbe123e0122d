"""Command line: bad input is caught up front with a message naming the problem and the fix; shipped configs
parse; `nbl-dist report` prints the table."""

import json
from pathlib import Path

import pytest
import torch

from nbl_dist.cli import build_parser, config_from_args, main
from nbl_dist.config import load_yaml

REPO = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture
def model_dir(make_model_dir):
    return str(make_model_dir("llama", torch.float32))


@pytest.fixture
def data_dir(tmp_path):
    from tests.helpers import CORPUS

    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text(" ".join(CORPUS))
    return str(d)


def base(model, data, out, *extra):
    return ["calibrate", "--model", model, "--data", data, "--out", str(out), "--samples", "2", "--seq-len",
            "16", "--backend", "in-process", *extra]


def test_bad_inputs(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    cases = [
        (base(str(tmp_path / "missing"), data_dir, out, "--linearize", "1"), "does not exist"),
        (base(data_dir, data_dir, out, "--linearize", "1"), "has no model.safetensors"),
        (base(model_dir, data_dir, out, "--linearize", "9"), "--linearize 9 is more than the model's 4 layers"),
        (base(model_dir, data_dir, out, "--linearize", "-1"), "--linearize must be 0 or more"),
        (base(model_dir, data_dir, out), "--linearize K or --max-bound B"),
        (base(model_dir, data_dir, out, "--linearize", "1", "--seq-len", "4096"), "exceeds the model's context"),
        (base(model_dir, str(tmp_path / "nodata"), out, "--linearize", "1"), "--data"),
        (base(model_dir, data_dir, out, "--linearize", "1", "--samples", "500"), "lower --samples"),
        (base(model_dir, data_dir, out, "--linearize", "1", "--max-bound", "2"), None),  # argparse: exclusive
    ]
    for argv, message in cases:
        if message is None:
            with pytest.raises(SystemExit):
                main(argv)
            continue
        code, err = run_cli(argv, capsys)
        assert code == 2 and message in err, (argv, err)
        assert not out.exists()  # nothing half-written
    with pytest.raises(SystemExit):
        main(base(model_dir, data_dir, out, "--linearize", "1", "--dtype", "float8"))
    assert "invalid choice: 'float8'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, err = run_cli(base(model_dir, data_dir, tmp_path / "full", "--linearize", "1"), capsys)
    assert code == 2 and "exists and is not empty; pass --overwrite" in err


def test_unsupported_architecture(tmp_path, capsys, data_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2, vocab_size=320)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    code, err = run_cli(base(str(tmp_path / "gpt2"), data_dir, tmp_path / "o", "--linearize", "1"), capsys)
    assert code == 2 and "'gpt2' is not supported" in err and "llama, mistral, qwen2, qwen3" in err


def test_calibrate_and_report_cli(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(base(model_dir, data_dir, out, "--linearize", "2", "--rank-by", "nmse")) == 0
    rep = json.loads((out / "nbl_report.json").read_text())
    assert rep["config"]["rank_by"] == "nmse" and rep["tokens"] == 32
    ranked = sorted(rep["layers"], key=lambda r: r["nmse"])[:2]
    assert sorted(r["layer"] for r in ranked) == rep["selected_layers"]
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out
    assert "cca_bound" in table and len(table.strip().splitlines()) == 2 + 4


def test_shipped_configs_parse():
    parser = build_parser()
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        args = parser.parse_args(["calibrate", "--config", str(path)])
        cfg = config_from_args(args, load_yaml(path))
        assert cfg.model and cfg.out and (cfg.linearize or cfg.max_bound), path
