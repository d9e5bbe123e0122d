"""The memory planner: hand-computed arithmetic, the shipped real configs, and refusal before loading."""

from pathlib import Path

import pytest
import torch

from nbl_dist.calibration.pipeline import model_config
from nbl_dist.calibration.plan import (
    CPU_RUNTIME_BYTES,
    GPU_RUNTIME_BYTES,
    check_memory,
    make_plan,
)
from nbl_dist.cli import main
from nbl_dist.errors import PlanError
from nbl_dist.model import synthetic
from nbl_dist.runtime.resources import parse_bytes

REPO = Path(__file__).resolve().parents[1]
# Published parameter counts of the real models whose configs ship in jobs/configs/.
PUBLISHED = {"llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496, "mistral-7b": 7_248_023_552,
             "qwen2.5-72b": 72_706_203_648}


def closed_form_params(c) -> int:
    """Parameters of a Llama-family decoder from its config, written out by hand."""
    d, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = d * q + 2 * d * kv + q * d
    if c.model_type == "qwen2":
        attn += q + 2 * kv  # q/k/v biases
    layer = attn + 3 * d * i + 2 * d  # + MLP + two RMSNorm weights
    head = 0 if c.tie_word_embeddings else v * d
    return c.num_hidden_layers * layer + v * d + d + head


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_param_counts(name):
    cfg = model_config(REPO / "jobs" / "configs" / f"{name}.config.json")
    plan = make_plan(cfg, stages=4, dtype=torch.bfloat16, device="cuda")
    assert plan.total_params == closed_form_params(cfg) == PUBLISHED[name]
    # Stages hold every layer once; their weights plus the unused final norm and head make the whole model.
    assert sum(s.end - s.start for s in plan.stages) == cfg.num_hidden_layers
    head = cfg.hidden_size + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    assert sum(s.params for s in plan.stages) + head == plan.total_params


def test_llama_70b_fits_on_8_not_on_2():
    cfg = model_config(REPO / "jobs" / "configs" / "llama-3.1-70b.config.json")
    kw = dict(dtype=torch.bfloat16, device="cuda", batch_size=1, seq_len=2048)
    assert check_memory(cfg, 8, parse_bytes("80GiB"), **kw).fits
    two = check_memory(cfg, 2, parse_bytes("80GiB"), **kw)
    assert not two.fits
    assert "use --stages 4" in two.message and "--stats-device cpu" in two.message
    # With statistics in host memory (and the host RAM to hold them), 2 stages fit the GPUs.
    host = check_memory(cfg, 2, parse_bytes("80GiB"), parse_bytes("128GiB"), "auto", **kw)
    assert host.fits and not host.plan.stages[0].stats_on_device


def test_plan_arithmetic_by_hand():
    cfg = synthetic.tiny_config("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
    plan = make_plan(cfg, stages=2, dtype=torch.float32, batch_size=2, seq_len=16, max_inflight=2, device="cpu")
    # Per layer: q 64x64, k 64x32, v 64x32, o 64x64, MLP 3 x 64x128, two norms of 64.
    layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 128
    assert layer == 36992
    s0, s1 = plan.stages
    assert (s0.start, s0.end, s1.start, s1.end) == (0, 2, 2, 4)  # 2 + 2 layers; stage 0 also embeds
    assert s0.params == 2 * layer + 320 * 64 and s1.params == 2 * layer
    assert s0.weight_bytes == 4 * (2 * 36992 + 20480) == 377856
    assert s1.stats_bytes == 2 * (3 * 64 * 64 * 8 + 2 * 64 * 8) == 198656
    tokens = 2 * 16
    queued = 3 * tokens * 64 * 4  # (max_inflight + 1) hidden-state batches
    forward = tokens * 4 * (3 * 128 + (2 * 4 + 2 * 2) * 16 + 3 * 64)
    centred = tokens * 64 * 4 * 2 + 64 * 64 * 12
    assert s0.activation_bytes == queued + forward + centred == 24576 + 98304 + 65536
    assert s0.fit_workspace_bytes == 9 * 64 * 64 * 8
    assert s0.runtime_bytes == CPU_RUNTIME_BYTES
    assert s0.device_bytes == 377856 + 2 * 99328 + 188416 + 294912 + CPU_RUNTIME_BYTES
    gpu = make_plan(cfg, stages=2, device="cuda", stats_on_device=False)
    assert gpu.stages[1].host_bytes == gpu.stages[1].stats_bytes + gpu.stages[1].fit_workspace_bytes
    assert gpu.stages[1].device_bytes == (gpu.stages[1].weight_bytes + gpu.stages[1].activation_bytes
                                          + GPU_RUNTIME_BYTES)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1e9") == 10**9
    for bad in ("fooGB", "GiB", "lots", "infGB", ""):  # "fooGB" used to escape as a bare ValueError
        with pytest.raises(PlanError, match="cannot read the memory size"):
            parse_bytes(bad)


def test_plan_cli_and_calibrate_refuses_before_loading(make_model_dir, tmp_path, capsys):
    assert main(["plan", "--model", str(REPO / "jobs/configs/llama-3.1-70b.config.json"), "--stages", "2",
                 "--device-memory", "80GiB"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "70,553,706,496 parameters" in out
    src = make_model_dir("llama", torch.float32)
    data = tmp_path / "t.txt"
    data.write_text("some text " * 200)
    code = main(["calibrate", "--model", str(src), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--samples", "2", "--seq-len", "16", "--linearize", "1", "--device-memory", "100MB"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit" in err and "usable per actor" in err
    assert not (tmp_path / "o").exists()
