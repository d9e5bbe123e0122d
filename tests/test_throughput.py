"""The FLOP model against torch's FLOP counter on the real modules, and the plan's time estimate built from it."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nbl_dist.calibration import throughput
from nbl_dist.calibration.config import CalibrationConfig
from nbl_dist.calibration.plan import make_plan, time_estimate
from nbl_dist.core.stats import LayerStats
from nbl_dist.errors import ConfigError, PlanError
from nbl_dist.model import synthetic


def counted_mm_flops(fn) -> int:
    """FLOPs of the matrix products fn runs, as torch's FLOP counter sees them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return sum(v for k, v in counter.get_flop_counts()["Global"].items() if "mm" in str(k))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layer_forward_flops_match_the_counted_products_plus_causal_attention(family):
    cfg = synthetic.tiny_config(family, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=96)
    layer, rotary = throughput.random_layer(cfg, torch.device("cpu"), torch.float32)
    b, t, d = 2, 16, 64
    h = torch.randn(b, t, d)
    pos = torch.arange(t).unsqueeze(0)
    cos_sin = rotary(h, pos)
    linear = counted_mm_flops(lambda: layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin,
                                            use_cache=False))  # CPU sdpa is not counted: the projections only
    head_dim = d // 4
    # position p attends to p + 1 keys: QK^T and AV, 2 FLOPs per multiply-add, 4 heads
    attention = sum(2 * 2 * 4 * head_dim * (p + 1) for p in range(t)) * b
    assert throughput.layer_forward_flops(cfg, t) * b * t == pytest.approx(linear + attention, rel=1e-12)


@pytest.mark.parametrize("precision", ["fp32", "bf16x3", "bf16"])
@pytest.mark.parametrize("blocks", [0, 4])  # 4: symmetric products by block-rows, as on a device listing it
def test_stats_flops_match_the_counted_products(precision, blocks, monkeypatch):
    from nbl_dist.core import stats

    monkeypatch.setattr(stats, "TRIANGLE_BLOCKS", {"cpu": blocks} if blocks else {})
    d = 288
    s = LayerStats.empty(d)
    x, a = torch.randn(100, d), torch.randn(100, d)
    assert throughput.stats_flops(d, precision, "cpu") * 100 == counted_mm_flops(lambda: s.update(x, a, precision))


def test_given_rate_estimate_is_the_counted_work_over_the_rate():
    """One stage, one replica: the stream estimate is tokens x layers x (counted forward + statistics FLOPs) / rate;
    a second stage halves the per-stage work and adds one micro-batch of pipeline fill."""
    cfg = synthetic.tiny_config("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=96, num_hidden_layers=4)
    seq, batch, tokens, tflops = 16, 2, 640, 1e-3
    per_layer = throughput.layer_forward_flops(cfg, seq) + throughput.stats_flops(64, "fp32", "cpu")
    one = time_estimate(cfg, make_plan(cfg, 1, seq_len=seq, batch_size=batch), tokens, seq, batch, "fp32",
                        device_tflops=tflops)
    assert one.phases["stream"] == pytest.approx(tokens * 4 * per_layer / (tflops * 1e12), rel=1e-12)
    two = time_estimate(cfg, make_plan(cfg, 2, seq_len=seq, batch_size=batch), tokens, seq, batch, "fp32",
                        device_tflops=tflops)
    assert two.phases["stream"] == pytest.approx((tokens + batch * seq) * 2 * per_layer / (tflops * 1e12))
    assert time_estimate(cfg, make_plan(cfg, 1), tokens, seq, batch, "fp32") is None  # no rate: no estimate


def test_scoring_estimate_counts_the_layers_and_both_head_projections():
    """A measured pass's head work is what evaluate.next_token_sums does with a KL reference (torch's counter: two
    vocabulary projections per predicted position), and the scoring estimate is passes x held-back tokens x
    (layers' forward + two heads) / rate."""
    from nbl_dist.core.losses import next_token_sums

    cfg = synthetic.tiny_config("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=96, num_hidden_layers=4)
    b, t, d = 2, 16, 64
    head = torch.nn.Linear(d, cfg.vocab_size, bias=False)
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    counted = counted_mm_flops(lambda: next_token_sums(head, torch.randn(b, t, d), ids, torch.randn(b, t, d)))
    assert counted == 2 * throughput.head_flops(cfg) * b * (t - 1)
    seq, batch, tokens, held, passes, tflops = 16, 2, 640, 64, 5, 1e-3
    est = time_estimate(cfg, make_plan(cfg, 1, seq_len=seq, batch_size=batch), tokens, seq, batch, "fp32",
                        device_tflops=tflops, score_tokens=held, score_passes=passes)
    per_token = 4 * throughput.layer_forward_flops(cfg, seq) + 2 * 2 * d * cfg.vocab_size
    assert est.phases["loss_scoring"] == pytest.approx(passes * held * per_token / (tflops * 1e12), rel=1e-12)


def test_measure_is_refused_for_gpu_actors_and_with_a_given_rate():
    cfg = synthetic.tiny_config("llama")
    with pytest.raises(PlanError, match="--device-tflops"):
        time_estimate(cfg, make_plan(cfg, 1, device="cuda"), 64, 16, 1, "fp32", measure=True)
    with pytest.raises(ConfigError, match="keep one"):
        CalibrationConfig.from_dict({"model": "m", "out": "o", "linearize": 1, "device_tflops": "1e2",
                                     "measure": True})
