"""Adapters, capture, fit recovery, and the linearized-model format, on tiny models of every supported family."""

import json
import os

import pytest
import torch

from nbl_dist.artifact.loading import load_linearized
from nbl_dist.artifact.write import write_linearized
from nbl_dist.calibration.local import InProcessBackend
from nbl_dist.core.capture import capture_stats
from nbl_dist.core.stats import LayerStats
from nbl_dist.errors import UnsupportedArchitectureError
from nbl_dist.model import synthetic
from nbl_dist.model.arch import adapter_for
from nbl_dist.model.modeling_nbl import NBLDecoderLayer
from nbl_dist.model.surgery import apply_linearization
from tests.helpers import affine_swapped_model, manual_attention
from tests.test_stats import assert_matches

FAMILIES = synthetic.FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_x_and_a_equal_manual_forward(family):
    cfg = synthetic.tiny_config(family, num_hidden_layers=3)
    model = synthetic.random_model(cfg, torch.float64, seed=1)
    adapter = adapter_for(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    stats = {i: LayerStats.empty(cfg.hidden_size) for i in range(3)}
    layers = dict(enumerate(adapter.layers(model)))
    with torch.no_grad():
        with capture_stats(layers, stats, adapter.attention):
            model.model(input_ids=ids, use_cache=False)
        hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states  # (L+1) x (B, T, d)
        pos = torch.arange(24).unsqueeze(0)
        cos, sin = model.model.rotary_emb(hidden[0], pos)
        for i, layer in layers.items():
            x = hidden[i]
            a = manual_attention(layer, x, cos, sin, cfg)
            xs, as_ = x.reshape(-1, cfg.hidden_size).numpy(), a.reshape(-1, cfg.hidden_size).numpy()
            assert_matches(stats[i], xs, as_, 1e-10)
    # Hooks are gone after the block: another forward leaves the statistics untouched.
    n_before = stats[0].n
    with torch.no_grad():
        model.model(input_ids=ids)
    assert stats[0].n == n_before


@pytest.mark.parametrize("family", FAMILIES)
def test_fit_recovers_known_affine_map_and_ranks_it_first(family):
    model, w0, b0 = affine_swapped_model(family, layer=2)
    backend = InProcessBackend(None, torch.float64, model=model)
    blocks = torch.randint(0, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(4))
    backend.stream(blocks, batch_size=4)
    scores = backend.scores()
    assert abs(scores[2].cca_bound) < 1e-8 and abs(scores[2].nmse) < 1e-10
    assert min(scores, key=lambda s: s.cca_bound).layer == 2
    assert all(s.cca_bound > 1e-3 for s in scores if s.layer != 2)
    backend.fit([2])
    w, b = backend.get_fit(2)
    torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(b, b0, rtol=0, atol=1e-6)


def calibrated_fits(model_dir, layers, dtype=torch.float32):
    backend = InProcessBackend(model_dir, dtype)
    cfg = backend.model.config
    blocks = torch.randint(0, cfg.vocab_size, (12, 32), generator=torch.Generator().manual_seed(5))
    backend.stream(blocks, batch_size=4)
    backend.fit(layers)
    return {i: backend.get_fit(i) for i in layers}


def dir_weight_bytes(path):
    return sum(os.path.getsize(path / f) for f in os.listdir(path) if f.endswith(".safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_generate_roundtrip(family, make_model_dir, tmp_path):
    src = make_model_dir(family)
    layers = [0, 2]  # layer 0 on purpose: caches read the sequence length from layer 0
    fits = calibrated_fits(src, layers)
    out = tmp_path / "out"
    info = write_linearized(src, out, layers, lambda i: fits[i])

    # Format: no attention or input-norm tensors for the linearized layers, nbl_linear in their place.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for i in layers:
        assert not [k for k in index if k.startswith((f"model.layers.{i}.self_attn.",
                                                      f"model.layers.{i}.input_layernorm."))]
        assert f"model.layers.{i}.nbl_linear.weight" in index and f"model.layers.{i}.nbl_linear.bias" in index
    assert any(k.startswith("model.layers.1.self_attn.") for k in index)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["nbl"]["linearized_layers"] == layers
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    # Smaller by exactly what was removed minus what was added (headers aside).
    d = cfg["hidden_size"]
    assert info["added_bytes"] == len(layers) * (d * d + d) * 4
    shrink = dir_weight_bytes(src) - dir_weight_bytes(out)
    assert abs(shrink - (info["removed_bytes"] - info["added_bytes"])) < 4096
    assert info["removed_bytes"] > info["added_bytes"]

    # Loaded model == the in-memory linearized model.
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    apply_linearization(ref, fits)
    loaded = load_linearized(out)
    assert isinstance(loaded.model.layers[0], NBLDecoderLayer)
    ids = torch.randint(0, cfg["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
        # And the replaced layer computes h + W h + b, then the unchanged MLP block.
        layer = loaded.model.layers[2]
        h = torch.randn(1, 5, d)
        w, b = (t.float() for t in fits[2])
        mid = h + h @ w.T + b
        torch.testing.assert_close(layer(h), mid + layer.mlp(layer.post_attention_layernorm(mid)),
                                   rtol=1e-5, atol=1e-5)

        prompt = ids[:1, :6]
        with_cache = loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
        without = loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert with_cache.shape[1] == 18
    assert torch.equal(with_cache, without)


def test_unsupported_architecture_named():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2)
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        adapter_for(cfg)
