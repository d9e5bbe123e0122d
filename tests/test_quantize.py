"""`nbl-dist quantize`: every bad input is one error line before any weight is read; the calibration blocks never
overlap a recorded run's; and, as a user types it (`.venv/bin/nbl-dist quantize`, which runs llm-compressor in
.venv-quant), a tiny linearized model of every family (layer 0 among the linearized ones) quantized W4A16 keeps its
nbl section, tokenizer and report, loads in transformers three ways, and computes what an independent float64
dequantization of its own packed tensors computes; with --maps keep its maps are the input's bit for bit."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from nbl_dist.cli import main
from nbl_dist.data.sources import DataSource
from tests import quantized_tiny
from tests.helpers import CORPUS

# Logits of the quantized folder loaded by transformers (float32, decompressed by compressed-tensors) against the
# float64 model rebuilt from the checkpoint's packed int4 words and scales, unpacked here: the two differ by float32
# round-off through 4 layers (measured 1.9e-5 on logits of magnitude ~6); a wrong unpacking order, a missing offset
# of 8 or a group applied to the wrong columns moves them by whole units.
LOGIT_ATOL = 1e-4


@pytest.fixture(scope="session")
def quantized():
    """The tiny sources and every case quantized afresh (shared with the serving suite through the cache)."""
    return quantized_tiny.build()


def config_only(tmp_path, make_model_dir, name, edit=None, **overrides) -> Path:
    """A model folder whose config.json is real (edited by `edit`) but whose weights and tokenizer are garbage: a
    refusal that reads either fails with another message than the one expected."""
    src = Path(make_model_dir("llama", torch.float32, **overrides))
    folder = tmp_path / name
    folder.mkdir()
    config = json.loads((src / "config.json").read_text())
    if edit:
        edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes(b"\x00 not a " + f.encode())
    return folder


def quantize_cli(capsys, model, data, out, *extra) -> tuple[int, str]:
    capsys.readouterr()  # what building the folders printed
    code = main(["quantize", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", *extra])
    return code, capsys.readouterr().err


def test_bad_inputs_are_one_line_before_any_weight(make_model_dir, tmp_path, capsys):
    data = tmp_path / "text"
    data.mkdir()
    (data / "a.txt").write_text(" ".join(CORPUS))
    tiny32 = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128)
    cases = [
        (tmp_path / "missing", (), "does not exist or is not a folder"),
        (data, (), "has no config.json"),
        (config_only(tmp_path, make_model_dir, "quantized", lambda c: c.update(
            quantization_config={"quant_method": "compressed-tensors"}), **tiny32), (), "is already quantized"),
        (config_only(tmp_path, make_model_dir, "gpt2", lambda c: c.update(model_type="gpt2"), **tiny32), (),
         "model_type 'gpt2' is not supported"),
        # d = 32, MLP 64, 4 heads of 8: the default tiny model, whose k/v projections are 32 -> 16.
        (config_only(tmp_path, make_model_dir, "narrow"), (), "multiples of 32, and k_proj/v_proj is 32 -> 16"),
        (config_only(tmp_path, make_model_dir, "group", **tiny32), ("--group-size", "256"),
         "--group-size 256 does not divide the input width 64"),
        (config_only(tmp_path, make_model_dir, "odd", **tiny32), ("--group-size", "6"), "does not divide"),
        (config_only(tmp_path, make_model_dir, "three", **tiny32), ("--group-size", "3"), "must be even"),
        (config_only(tmp_path, make_model_dir, "w8", **tiny32), ("--scheme", "W8A8", "--group-size", "32"),
         "--group-size is a W4A16 option"),
    ]
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(Path(make_model_dir("llama", torch.float32, **tiny32)) / "config.json", no_weights)
    cases.append((no_weights, (), "safetensors"))
    for model, extra, message in cases:
        code, err = quantize_cli(capsys, model, data, tmp_path / "out", *extra)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("nbl-dist: error: "), (model, err)
        assert message in lines[0], (message, lines[0])
        assert not (tmp_path / "out").exists()


def test_blocks_never_overlap_recorded_ones(tokenizer, tmp_path):
    """A calibration's and a healing's recorded blocks (at other block lengths) are skipped, the first unused ones
    are left for eval, the next ones calibrate; the quantization's record makes a later run skip its blocks."""
    from nbl_dist.data.blocks import BlockStream
    from nbl_dist.data.ledger import data_records, heldout_blocks, usage_record
    from nbl_dist.quantization.blocks import quantize_blocks

    (tmp_path / "a.txt").write_text(" ".join(CORPUS * 3))
    source = DataSource(str(tmp_path / "a.txt"))
    total = sum(1 for _ in BlockStream(source.documents(), tokenizer, 8))
    calibration = usage_record(source, tokenizer, 16, None, {"statistics_blocks": [0, 1], "held_back_blocks": [2]})
    healing = usage_record(source, tokenizer, 8, 0, {"training_blocks": [9, 12], "kl_blocks": [10]})
    chosen = quantize_blocks(source, tokenizer, 8, [calibration, healing], reserve=2, samples=4)
    used = {t for i in range(3) for t in range(16 * i, 16 * i + 16)} | {t for i in (9, 10, 12)
                                                                          for t in range(8 * i, 8 * i + 8)}
    mine = chosen.reserved_indices + chosen.indices
    assert mine == sorted(mine) and len(set(mine)) == 6 and max(mine) < total
    assert all(not used & set(range(8 * i, 8 * i + 8)) for i in mine)
    assert chosen.reserved_indices == [6, 7] and chosen.indices == [8, 11, 13, 14]
    assert torch.equal(chosen.blocks[0], next(b for j, b in enumerate(BlockStream(source.documents(), tokenizer, 8))
                                              if j == 8))
    record = chosen.record(source, tokenizer, 8, 0)
    nbl = {"data": calibration, "healing": {"data": healing}, "quantization": {"data": record}}
    assert data_records(nbl) == [calibration, healing, record]
    later = heldout_blocks(source, tokenizer, 8, 3, data_records(nbl))
    assert later.indices == [6, 7, 15]  # eval scores the reserved blocks, then skips the quantization's


def dequantized_reference(folder: Path):
    """The float64 model of a quantized folder, independent of compressed-tensors: its config without the
    quantization, every float tensor as stored, every quantized weight rebuilt from its int32 words (eight 4-bit
    values each, value j in bits 4j..4j+3, stored as q + 8) times its group's scale."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = load_file(str(folder / "model.safetensors"))
    state = {}
    for key, value in stored.items():
        if key.endswith("weight_packed"):
            base = key[:-len("weight_packed")]
            words = value.astype(np.int64) & 0xFFFFFFFF
            q = np.stack([(words >> (4 * j)) & 0xF for j in range(8)], -1).reshape(value.shape[0], -1) - 8
            scale = stored[base + "weight_scale"].astype(np.float64)  # (out, groups)
            group = q.shape[1] // scale.shape[1]
            state[base + "weight"] = (q.reshape(q.shape[0], -1, group) * scale[:, :, None]).reshape(q.shape[0], -1)
        elif not key.endswith(("weight_scale", "weight_shape")):
            state[key] = value.astype(np.float64)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float64).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("case", list(quantized_tiny.CASES))
def test_quantized_folder_loads_and_matches_its_dequantized_weights(quantized, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbl_dist import load_linearized

    family, linearized, maps = quantized_tiny.CASES[case]
    src = quantized / f"{family}-{'nbl' if linearized else 'orig'}"
    out = quantized / f"{case}-w4a16"
    config, source = (json.loads((f / "config.json").read_text()) for f in (out, src))
    report = json.loads((out / "nbl_quantize_report.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
    for key in ("model_type", "architectures", "auto_map"):
        assert config.get(key) == source.get(key)
    assert report["scheme"] == "W4A16" and report["method"] == "gptq" and report["versions"]["llmcompressor"]
    assert AutoTokenizer.from_pretrained(out)("To be").input_ids == AutoTokenizer.from_pretrained(src)("To be").input_ids
    if linearized:
        nbl = {k: v for k, v in config["nbl"].items() if k != "quantization"}
        assert nbl == source["nbl"] and config["nbl"]["linearized_layers"] == quantized_tiny.LINEARIZED
        record = config["nbl"]["quantization"]
        assert record["maps"] == maps and len(record["data"]["quantization_blocks"]) == 8
    else:
        assert "nbl" not in config
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dequantized_reference(out)(ids).logits
        for load in (lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32),
                     lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32, trust_remote_code=True),
                     lambda f: load_linearized(f, dtype=torch.float32)):
            got = load(out).eval()(ids).logits.double()
            assert (got - want).abs().max() <= LOGIT_ATOL, float((got - want).abs().max())
    stored = load_file(str(out / "model.safetensors"))
    maps_keys = [k for k in stored if "nbl_linear" in k]
    if maps == "keep":
        inputs = {k: v for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items()}
        assert sorted(maps_keys) == sorted(k for k in inputs if "nbl_linear" in k)
        assert all(np.array_equal(stored[k], inputs[k]) and stored[k].dtype == inputs[k].dtype for k in maps_keys)
        assert sorted(qc["ignore"]) == sorted(["lm_head", *(f"model.layers.{i}.nbl_linear"
                                                          for i in quantized_tiny.LINEARIZED)])
    elif linearized:
        assert {k.rsplit(".", 1)[1] for k in maps_keys} == {"weight_packed", "weight_scale", "weight_shape", "bias"}


def test_job_refuses_bad_input_in_one_line(tmp_path):
    """jobs/quantize.py goes through the CLI's error boundary: one line, exit status 2, nothing written."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(quantized_tiny.REPO / "jobs" / "quantize.py"), "--model",
                           str(tmp_path / "missing"), "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "does not exist or is not a folder" in lines[0], proc.stderr
    assert not (tmp_path / "o").exists()
