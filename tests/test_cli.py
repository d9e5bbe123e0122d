"""Command line: bad input is caught up front with a message naming the problem and the fix; shipped configs
parse; `nbl-dist report` prints the table."""

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbl_dist.calibration.config import CalibrationConfig
from nbl_dist.cli import build_parser, config_from_args, main
from nbl_dist.core.selection import RANK_RULES
from nbl_dist.options import load_yaml

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
            "16", "--backend", "in-process", "--rank-by", "cca", *extra]


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
    from nbl_dist.drafting.config import DraftConfig
    from nbl_dist.healing.config import HealConfig
    from nbl_dist.quantization.config import QuantizeConfig

    for command, cls in (("heal", HealConfig), ("quantize", QuantizeConfig), ("draft", DraftConfig)):
        configs = sorted((REPO / "jobs" / "configs" / command).glob("*.yaml"))
        assert configs, command
        for path in configs:
            args = parser.parse_args([command, "--config", str(path)])
            cfg = config_from_args(args, load_yaml(path), cls)
            assert all(getattr(cfg, name) for name in cls.REQUIRED), path


def calibrate_subparser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["calibrate"]


def test_every_config_field_is_exactly_one_flag_and_back():
    fields = {f.name: f for f in dataclasses.fields(CalibrationConfig)}
    actions = [a for a in calibrate_subparser()._actions if a.dest not in ("help", "config")]
    assert sorted(a.dest for a in actions) == sorted(fields)  # each field once, no flag without a field
    for a in actions:
        f = fields[a.dest]
        expected = f"--no-{a.dest.replace('_', '-')}" if f.default is True else "--" + a.dest.replace("_", "-")
        assert a.option_strings == [expected] and a.default is None, a
        assert a.help.startswith(f.metadata["help"]) and tuple(a.choices or ()) == (f.metadata["choices"] or ())
        if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
            assert a.help.endswith(f"(default {f.default})"), a.help


def test_yaml_exponents_are_floats_end_to_end(model_dir, data_dir, tmp_path, capsys):
    # PyYAML reads 1e-6 and 5e1 (no dot) as strings: this used to fail with a TypeError after the whole pass.
    out = tmp_path / "o"
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {model_dir}\ndata: {data_dir}\nout: {out}\nsamples: 2\nseq-len: 16\n"
                    "backend: in-process\nridge: 1e-6\nmax-bound: 5e1\n")
    assert main(["calibrate", "--config", str(path)]) == 0, capsys.readouterr().err
    config = json.loads((out / "nbl_report.json").read_text())["config"]
    assert config["ridge"] == 1e-6 and config["max_bound"] == 50.0
    assert type(config["ridge"]) is float and type(config["max_bound"]) is float


BAD_KEYS = [("linearise: 4\n", "linearise", "did you mean 'linearize'?"),
            ("linearize: 1\nstages: two\n", "stages", "must be a whole number")]


def bad_yaml(tmp_path, model_dir, data_dir, text):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: {model_dir}\ndata: {data_dir}\nout: {tmp_path / 'o'}\nbackend: in-process\n{text}")
    return path


def assert_one_error_line(err, key, hint):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbl-dist: error: ") and "Traceback" not in err, err
    assert repr(key) in lines[0] and hint in lines[0], err


@pytest.fixture
def unreadable_model_dir(model_dir, tmp_path):
    """The tiny model's config.json beside a tokenizer and weights that are not what their names say: a command
    that reads either before checking its options fails with another error than the option's."""
    import shutil

    folder = tmp_path / "unreadable-model"
    folder.mkdir()
    shutil.copy(Path(model_dir) / "config.json", folder / "config.json")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes(b"\x00 not a " + name.encode())
    return str(folder)


@pytest.mark.parametrize("text, key, hint", BAD_KEYS)
def test_bad_yaml_key_refused_by_the_cli(unreadable_model_dir, data_dir, tmp_path, capsys, text, key, hint):
    """Refused by the option check, before the tokenizer or any weight is read (they are unreadable here)."""
    code, err = run_cli(["calibrate", "--config", str(bad_yaml(tmp_path, unreadable_model_dir, data_dir, text))],
                        capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    assert_one_error_line(err, key, hint)


@pytest.mark.parametrize("text, key, hint", BAD_KEYS)
def test_bad_yaml_key_refused_by_the_job(unreadable_model_dir, data_dir, tmp_path, text, key, hint):
    """As the CLI: the job's one error line names the key, and the unreadable tokenizer and weights were never
    read (no wall time asserted: on a busy machine the interpreter's start alone varies by seconds)."""
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "calibrate.py"), "--config",
                           str(bad_yaml(tmp_path, unreadable_model_dir, data_dir, text))], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, key, hint)
    assert not (tmp_path / "o").exists()


def test_mistyped_flag_names_the_option(model_dir, data_dir, tmp_path, capsys):
    code, err = run_cli(base(model_dir, data_dir, tmp_path / "o", "--linearize", "1", "--stages", "two"), capsys)
    assert code == 2
    assert_one_error_line(err, "stages", "must be a whole number")


def test_unexpected_errors_keep_their_traceback(model_dir, data_dir, tmp_path, monkeypatch):
    def bug(*a, **k):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr("nbl_dist.calibration.pipeline.calibrate", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # not turned into a one-line error: bugs stay visible
        main(base(model_dir, data_dir, tmp_path / "o", "--linearize", "1"))


def test_readme_options_table_matches_the_flags():
    """The README's calibrate options table names every flag built from the config fields, and only those; a
    flag shown with its choices (--rank-by cca|nmse|...) shows only valid ones, and all the ranking rules."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("| option | meaning |")
    table = readme[start:readme.index("\n\n", start)]
    flags = {o: a for a in calibrate_subparser()._actions for o in a.option_strings}
    flags = {o: a for o, a in flags.items() if a.dest not in ("help", "config")}
    assert set(re.findall(r"--[a-z][a-z-]*", table)) == set(flags)
    shown = dict(re.findall(r"(--[a-z-]+) ((?:[A-Za-z0-9_-]+\\\|)+[A-Za-z0-9_-]+)", table))
    assert "--rank-by" in shown
    for name, choices in shown.items():
        listed = choices.split("\\|")
        assert set(listed) <= set(flags[name].choices), (name, listed)
    assert shown["--rank-by"].split("\\|") == list(RANK_RULES)
