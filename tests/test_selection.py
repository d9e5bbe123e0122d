"""Every ranking score against its formula on raw activations (numpy/scipy, float64); the known-affine layer;
the loss rule's held-back slice; and agreement of every (stages, replicas) split with the in-process backend."""

import numpy as np
import pytest
import ray
import torch

from nbl_dist import calibrate
from nbl_dist.local import InProcessBackend
from nbl_dist.selection import select_layers
from tests.helpers import affine_swapped_model, manual_attention, research_bound


def raw_activations(model, blocks):
    """x and a of every layer, from output_hidden_states and the attention written out by hand."""
    cfg = model.config
    with torch.no_grad():
        hidden = model.model(input_ids=blocks, output_hidden_states=True).hidden_states
        pos = torch.arange(blocks.shape[1]).unsqueeze(0)
        cos, sin = model.model.rotary_emb(hidden[0], pos)
        out = []
        for i, layer in enumerate(model.model.layers):
            a = manual_attention(layer, hidden[i], cos, sin, cfg)
            out.append((hidden[i].reshape(-1, cfg.hidden_size).numpy(), a.reshape(-1, cfg.hidden_size).numpy()))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scores_equal_formulas_on_raw_activations(family, make_model_dir):
    src = make_model_dir(family, torch.float64, num_hidden_layers=3)
    # Ids from 3 up: id 0 is the padding token, whose embedding is the zero vector and has no cosine.
    blocks = torch.randint(3, 320, (12, 32), generator=torch.Generator().manual_seed(9))
    backend = InProcessBackend(src, torch.float64)
    backend.stream(blocks, batch_size=5)
    scores = backend.scores()
    for s, (x, a) in zip(scores, raw_activations(backend.model, blocks)):
        y = x + a
        assert s.cca_bound == pytest.approx(research_bound(x, a), rel=1e-8)
        design = np.hstack([x, np.ones((len(x), 1))])
        coef, *_ = np.linalg.lstsq(design, a, rcond=None)
        resid = a - design @ coef
        assert s.nmse == pytest.approx(resid.var(0, ddof=1).sum() / np.cov(y.T).trace(), rel=1e-7)
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert s.cosine == pytest.approx(cos.mean(), rel=1e-12)
        assert s.attn_ratio == pytest.approx((np.linalg.norm(a, axis=1) / np.linalg.norm(x, axis=1)).mean(),
                                             rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_known_affine_layer_is_first_by_cca_nmse_and_costs_no_loss(family):
    model, _, _ = affine_swapped_model(family, layer=1)
    backend = InProcessBackend(None, torch.float64, model=model)
    gen = torch.Generator().manual_seed(10)
    backend.stream(torch.randint(0, 320, (16, 32), generator=gen), batch_size=4)
    scores = backend.scores()
    assert abs(scores[1].cca_bound) < 1e-8 and abs(scores[1].nmse) < 1e-10
    assert select_layers(scores, "cca", 1, None) == [1] == select_layers(scores, "nmse", 1, None)
    backend.fit([s.layer for s in scores])
    losses = backend.loss_scores(torch.randint(0, 320, (4, 32), generator=gen), batch_size=2)
    assert abs(losses[1]) < 1e-9
    assert all(abs(v) > 1e-6 for i, v in losses.items() if i != 1)


def test_loss_rule_uses_only_held_back_blocks(make_model_dir, tmp_path):
    """The statistics come from blocks[:N-h] and the loss from blocks[N-h:] alone; recomputing both by hand
    from exactly those slices reproduces every layer's loss increase. Fits from overlapping slices would not."""
    src = make_model_dir("llama", torch.float64, num_hidden_layers=3)
    blocks = torch.randint(0, 320, (9, 32), generator=torch.Generator().manual_seed(11))
    rep = calibrate(src, tmp_path / "o", blocks=blocks, linearize=1, rank_by="loss", score_samples=3,
                    backend="in-process", dtype="float64", batch_size=3, log=lambda *a: None)
    assert rep["tokens"] == 6 * 32 and rep["score_tokens"] == 3 * 32
    by_hand = InProcessBackend(src, torch.float64)
    by_hand.stream(blocks[:6], batch_size=2)
    by_hand.fit([0, 1, 2])
    want = by_hand.loss_scores(blocks[6:], batch_size=1)
    for row in rep["layers"]:
        assert row["loss_increase"] == pytest.approx(want[row["layer"]], rel=1e-9, abs=1e-12)
    overlap = InProcessBackend(src, torch.float64)
    overlap.stream(blocks, batch_size=3)  # statistics that saw the held-back blocks too
    overlap.fit([0, 1, 2])
    leaked = overlap.loss_scores(blocks[6:], batch_size=3)
    assert any(abs(leaked[i] - want[i]) > 1e-6 * max(abs(want[i]), 1e-9) for i in want)
    assert rep["selected_layers"] == [min(want, key=want.get)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_all_scores_agree_across_splits(family, make_model_dir, tmp_path):
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    src = make_model_dir(family, torch.float64, num_hidden_layers=4)
    blocks = torch.randint(0, 320, (10, 32), generator=torch.Generator().manual_seed(12))
    kw = dict(blocks=blocks, linearize=2, rank_by="loss", score_samples=3, batch_size=2, dtype="float64",
              log=lambda *a: None)
    ref = calibrate(src, tmp_path / "ref", backend="in-process", **kw)
    for stages, replicas in [(1, 1), (2, 1), (2, 2)]:
        rep = calibrate(src, tmp_path / f"p{stages}r{replicas}", stages=stages, replicas=replicas, **kw)
        assert rep["selected_layers"] == ref["selected_layers"]
        for a, b in zip(rep["layers"], ref["layers"]):
            for key in ("cca_bound", "nmse", "cosine", "attn_ratio"):
                assert a[key] == pytest.approx(b[key], rel=1e-9), (stages, replicas, key)
            assert a["loss_increase"] == pytest.approx(b["loss_increase"], rel=1e-7, abs=1e-12)
        for rule in ("cca", "nmse", "cosine", "loss"):
            from nbl_dist.linalg import LayerScores

            as_scores = lambda r: [LayerScores(**{k: v for k, v in row.items()  # noqa: E731
                                                  if k in LayerScores.__dataclass_fields__}) for row in r["layers"]]
            assert select_layers(as_scores(rep), rule, 2, None) == select_layers(as_scores(ref), rule, 2, None)
    ray.shutdown()
