"""The serving cost model (nbl_dist/serving/cost_model.py) against the real modules: its weight counts against the
linearized model's own parameters, its FLOPs against torch's FLOP counter plus causal attention written out."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nbl_dist.model import synthetic
from nbl_dist.model.surgery import apply_linearization
from nbl_dist.serving.cost_model import (
    DecoderShape,
    kv_bytes_per_token,
    kv_capacity_ratio,
    step_cost,
)


def nbl_tiny(family, linearized):
    cfg = synthetic.tiny_config(family, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=96, num_hidden_layers=4)
    model = synthetic.random_model(cfg, torch.float32)
    d = cfg.hidden_size
    return apply_linearization(model, {i: (torch.randn(d, d) * 0.1, torch.zeros(d)) for i in linearized})


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_weight_counts_are_the_modules_parameters(family):
    model = nbl_tiny(family, [0, 3])
    shape = DecoderShape.of(model.config)
    layers = model.model.layers
    attn = sum(p.numel() for n, p in layers[1].self_attn.named_parameters() if n.endswith("proj.weight"))
    assert shape.attention_weights == attn
    assert shape.nbl_weights == layers[0].nbl_linear.weight.numel()
    assert shape.mlp_weights == sum(p.numel() for p in layers[0].mlp.parameters())
    assert shape.head_weights == model.lm_head.weight.numel()


def test_prefill_flops_match_the_counted_products_plus_causal_attention():
    """Batch 2 of 16 tokens through a model with layers 0 and 3 linearized, the head on each sequence's last
    token (where an engine samples): torch's count of the matrix products (CPU sdpa is not counted) plus the causal
    attention of the 2 layers that keep it equals the model's FLOPs."""
    model = nbl_tiny("llama", [0, 3])
    b, t = 2, 16
    ids = torch.randint(0, 320, (b, t))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state
        model.lm_head(h[:, -1])
    counted = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "mm" in str(k))
    attention = sum(2 * 2 * 4 * 16 * (p + 1) for p in range(t)) * b * 2  # 4 heads of 16, 2 layers
    shape = DecoderShape.of(model.config)
    cost = step_cost(shape, linearized=2, tokens=b * t, context=(t + 1) / 2, dtype_bytes=4, sequences=b)
    assert cost.flops == pytest.approx(counted + attention, rel=1e-12)


def test_bytes_and_kv_cache():
    """Decode at batch 3, context 100, float32: the layer and head weights once, and each sequence's keys and values
    of the layers that keep attention; the KV capacity of a fixed memory grows by L / (L - K)."""
    model = nbl_tiny("qwen3", [1])
    shape = DecoderShape.of(model.config)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight")) \
        + model.model.layers[1].nbl_linear.weight.numel() + model.lm_head.weight.numel()
    kv = 3 * 100 * 2 * 2 * 16 * 4 * 3  # sequences x context x (k, v) x kv heads x head_dim x bytes x layers
    assert step_cost(shape, 1, tokens=3, context=100, dtype_bytes=4, sequences=3).bytes == weights * 4 + kv
    assert kv_bytes_per_token(shape, 1, 2) == 2 * 2 * 16 * 2 * 3
    assert kv_capacity_ratio(shape, 1) == 4 / 3
