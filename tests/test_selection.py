"""Every ranking score against its formula on raw activations (numpy/scipy, float64); the known-affine layer;
the loss rule's held-back slice; and agreement of every (stages, replicas) split with the in-process backend."""

import numpy as np
import pytest
import ray
import torch

from nbl_dist import calibrate
from nbl_dist.calibration.local import InProcessBackend
from nbl_dist.calibration.report import format_table
from nbl_dist.core.selection import select_layers
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


# Every split on one family; the scores are family-independent code, so the other family takes the split with the
# most merges and hops only (each Ray calibration starts its actors anew: some 5 s here).
@pytest.mark.slow
@pytest.mark.parametrize("family,splits", [("llama", [(1, 1), (2, 1), (2, 2)]), ("qwen2", [(2, 2)])])
def test_all_scores_agree_across_splits(family, splits, make_model_dir, tmp_path):
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    src = make_model_dir(family, torch.float64, num_hidden_layers=4)
    blocks = torch.randint(0, 320, (10, 32), generator=torch.Generator().manual_seed(12))
    kw = dict(blocks=blocks, linearize=2, rank_by="loss", score_samples=3, batch_size=2, dtype="float64",
              log=lambda *a: None)
    ref = calibrate(src, tmp_path / "ref", backend="in-process", **kw)
    for stages, replicas in splits:
        rep = calibrate(src, tmp_path / f"p{stages}r{replicas}", stages=stages, replicas=replicas, **kw)
        assert rep["selected_layers"] == ref["selected_layers"]
        for a, b in zip(rep["layers"], ref["layers"]):
            for key in ("cca_bound", "nmse", "cosine", "attn_ratio"):
                assert a[key] == pytest.approx(b[key], rel=1e-9), (stages, replicas, key)
            assert a["loss_increase"] == pytest.approx(b["loss_increase"], rel=1e-7, abs=1e-12)
        for rule in ("cca", "nmse", "cosine", "loss"):
            from nbl_dist.core.linalg import LayerScores

            as_scores = lambda r: [LayerScores(**{k: v for k, v in row.items()  # noqa: E731
                                                  if k in LayerScores.__dataclass_fields__}) for row in r["layers"]]
            assert select_layers(as_scores(rep), rule, 2, None) == select_layers(as_scores(ref), rule, 2, None)
    ray.shutdown()


# ---- the set rules: auto and greedy (docs/method.md §6a) ----------------------------------------------------

def logits_by_hand(src, fits, blocks):
    """(N, T-1, V) float64 next-token logits of the unmodified source model with `fits` (layer -> LinearFit)
    applied: the reference a set rule's measurements must equal."""
    from transformers import AutoModelForCausalLM

    from nbl_dist.model.surgery import apply_linearization

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float64).eval()
    apply_linearization(model, {i: (f.weight, f.bias) for i, f in fits.items()})
    with torch.no_grad():
        return model(input_ids=blocks).logits[:, :-1]


def loss_by_hand(src, fits, blocks):
    """Mean next-token cross-entropy of the model with `fits` applied, from its logits."""
    logits = logits_by_hand(src, fits, blocks)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()


def kl_by_hand(src, fits, blocks):
    """Mean over predicted positions of KL(original || with fits) between the two next-token distributions,
    written out as sum_v p_v (log p_v - log q_v) in float64."""
    log_p = torch.log_softmax(logits_by_hand(src, {}, blocks), -1)
    log_q = torch.log_softmax(logits_by_hand(src, fits, blocks), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def fits_on(src, blocks):
    """Every layer's fit from the statistics of `blocks` alone (in-process)."""
    backend = InProcessBackend(src, torch.float64)
    backend.stream(blocks, batch_size=2)
    backend.fit(list(range(len(backend.adapter.layers(backend.model)))))
    return dict(backend.fits)


def as_scores(report):
    from nbl_dist.core.linalg import LayerScores

    return [LayerScores(**{k: v for k, v in row.items() if k in LayerScores.__dataclass_fields__})
            for row in report["layers"]]


AUTO_BLOCKS = torch.randint(3, 320, (12, 32), generator=torch.Generator().manual_seed(21))


def test_auto_chooses_the_candidate_closest_to_the_original_measured_by_hand(make_model_dir, tmp_path):
    """Candidates: the K-sets of cca, nmse, cosine (once each); each one's KL divergence from the original and
    loss increase equal those of the unmodified model with that set linearized (fits from the statistics blocks
    only), computed from its logits on the held-back blocks; the lowest KL is chosen and written. Statistics
    that saw the held-back blocks differ."""
    from nbl_dist import load_linearized

    src = make_model_dir("llama", torch.float64, num_hidden_layers=5)
    stats_blocks, held = AUTO_BLOCKS[:8], AUTO_BLOCKS[8:]
    rep = calibrate(src, tmp_path / "o", blocks=AUTO_BLOCKS, linearize=2, score_samples=4, backend="in-process",
                    dtype="float64", batch_size=3, log=lambda *a: None)
    assert rep["rank_by"] == "auto" and rep["tokens"] == 8 * 32 and rep["score_tokens"] == 4 * 32
    scores = as_scores(rep)
    proposed = {tuple(select_layers(scores, rule, 2, None)) for rule in ("cca", "nmse", "cosine")}
    assert {tuple(c["layers"]) for c in rep["candidates"]} == proposed and len(proposed) >= 2
    fits = fits_on(src, stats_blocks)
    original = loss_by_hand(src, {}, held)
    loss_up = {tuple(c["layers"]): loss_by_hand(src, {i: fits[i] for i in c["layers"]}, held) - original
               for c in rep["candidates"]}
    kl = {tuple(c["layers"]): kl_by_hand(src, {i: fits[i] for i in c["layers"]}, held) for c in rep["candidates"]}
    for c in rep["candidates"]:
        assert c["loss_increase"] == pytest.approx(loss_up[tuple(c["layers"])], rel=1e-9, abs=1e-12)
        assert c["kl"] == pytest.approx(kl[tuple(c["layers"])], rel=1e-9, abs=1e-12)
        assert c["kl"] > 1e-6
    best = min(kl, key=kl.get)
    assert [tuple(c["layers"]) for c in rep["candidates"] if c["chosen"]] == [best]
    assert tuple(rep["selected_layers"]) == best
    printed = format_table(rep).splitlines()  # `nbl-dist report`: one line per candidate, both measures
    for c in rep["candidates"]:
        line = next(x for x in printed if x.strip().startswith(str(c["layers"])))
        assert f"{c['kl']:.5f}" in line and f"{c['loss_increase']:.5f}" in line
        assert line.endswith("<- chosen") == c["chosen"]
    assert rep["cca_ranking"] == sorted(range(5), key=lambda i: scores[i].cca_bound)
    written = load_linearized(tmp_path / "o").to(torch.float64)
    with torch.no_grad():
        logits = written(input_ids=held).logits[:, :-1]
    got = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1)).item()
    assert got - original == pytest.approx(loss_up[best], rel=1e-9, abs=1e-12)
    leaked = fits_on(src, AUTO_BLOCKS)  # statistics that saw the held-back blocks too
    assert kl_by_hand(src, {i: leaked[i] for i in best}, held) != pytest.approx(kl[best], rel=1e-6)


def test_auto_goes_by_divergence_not_loss():
    """A set that lowers the held-back loss below the original's (it moved the model towards the calibration
    text) but moved the distribution further loses to one that stays closer; a NaN divergence is never chosen;
    equal divergences go to the earlier rule."""
    from nbl_dist.core.linalg import LayerScores
    from nbl_dist.core.selection import SetMeasure, choose_auto, rule_sets

    n = 6
    order = {"cca": [0, 1, 2, 3, 4, 5], "nmse": [2, 3, 0, 1, 4, 5], "cosine": [4, 5, 0, 1, 2, 3]}
    rank = {rule: {layer: r for r, layer in enumerate(o)} for rule, o in order.items()}
    scores = [LayerScores(layer=i, cca_bound=float(rank["cca"][i]), nmse=float(rank["nmse"][i]),
                          cosine=-float(rank["cosine"][i]), attn_ratio=0.0, ridge_x=0.0, ridge_y=0.0, tokens=1)
              for i in range(n)]
    assert list(rule_sets(scores, 2)) == [(0, 1), (2, 3), (4, 5)]

    def measure(table):
        return lambda sets: [SetMeasure(3.0, 0.0) if s == () else SetMeasure(*table[s]) for s in sets]

    def chosen(table):
        return [c.layers for c in choose_auto(scores, 2, measure(table)) if c.chosen]

    # (loss, KL): nmse's set has the lowest loss, below the original's; cosine's the lowest KL
    assert chosen({(0, 1): (3.5, 0.30), (2, 3): (2.9, 0.20), (4, 5): (3.1, 0.05)}) == [(4, 5)]
    assert chosen({(0, 1): (3.5, 0.01), (2, 3): (2.9, 0.20), (4, 5): (3.1, 0.05)}) == [(0, 1)]
    assert chosen({(0, 1): (3.5, float("nan")), (2, 3): (2.9, 0.20), (4, 5): (3.1, 0.25)}) == [(2, 3)]
    assert chosen({(0, 1): (3.5, 0.10), (2, 3): (2.9, 0.10), (4, 5): (3.1, 0.10)}) == [(0, 1)]
    found = choose_auto(scores, 2, measure({(0, 1): (3.5, 0.30), (2, 3): (2.9, 0.20), (4, 5): (3.1, 0.05)}))
    assert [(c.found_by, c.loss_increase, c.kl) for c in found] == [
        ("cca", 0.5, 0.30), ("nmse", pytest.approx(-0.1), 0.20), ("cosine", pytest.approx(0.1), 0.05)]


def test_greedy_equals_brute_force_greedy_by_hand(make_model_dir, tmp_path):
    """At each step every shortlisted layer not yet chosen is tried with the current set, each try measured by
    hand on the unmodified model; the layer whose try is lowest is added. The shortlist is the statistic
    rules' rankings taken in turn."""
    src = make_model_dir("llama", torch.float64, num_hidden_layers=5)
    rep = calibrate(src, tmp_path / "o", blocks=AUTO_BLOCKS, linearize=3, rank_by="greedy", shortlist=4,
                    score_samples=4, backend="in-process", dtype="float64", batch_size=3, log=lambda *a: None)
    scores = as_scores(rep)
    rankings = [sorted(range(5), key=lambda i: key(scores[i])) for key in (
        lambda s: s.cca_bound, lambda s: s.nmse, lambda s: -s.cosine)]
    pool = list(dict.fromkeys(i for row in zip(*rankings) for i in row))[:4]
    fits, held = fits_on(src, AUTO_BLOCKS[:8]), AUTO_BLOCKS[8:]
    original = loss_by_hand(src, {}, held)
    current, tried = [], {}
    for step in range(1, 4):
        trial = {tuple(sorted(current + [i])): None for i in pool if i not in current}
        for s in trial:
            trial[s] = loss_by_hand(src, {i: fits[i] for i in s}, held) - original
            tried[(step, s)] = trial[s]
        current = list(min(trial, key=trial.get))
    got = {(int(c["found_by"].split()[-1]), tuple(c["layers"])): c["loss_increase"] for c in rep["candidates"]}
    # the first step's call runs the original too, so its sets carry their KL; later steps' calls do not
    assert all((c["kl"] is None) == (c["found_by"] != "greedy step 1") for c in rep["candidates"])
    assert set(got) == set(tried)
    for key, want in tried.items():
        assert got[key] == pytest.approx(want, rel=1e-9, abs=1e-12), key
    assert rep["selected_layers"] == sorted(current)
    assert [c["layers"] for c in rep["candidates"] if c["chosen"]] == [sorted(current)]


def test_max_bound_sets_how_many_layers_a_set_rule_chooses(make_model_dir, tmp_path):
    """With --max-bound B instead of K, auto chooses as many layers as have a CCA bound at most B (which ones,
    it measures); a B below every bound chooses none and measures nothing."""
    src = make_model_dir("llama", torch.float64, num_hidden_layers=5)
    kw = dict(blocks=AUTO_BLOCKS, score_samples=4, backend="in-process", dtype="float64", batch_size=3,
              overwrite=True, log=lambda *a: None)
    first = calibrate(src, tmp_path / "a", linearize=1, **kw)
    bounds = sorted(r["cca_bound"] for r in first["layers"])
    rep = calibrate(src, tmp_path / "b", max_bound=(bounds[2] + bounds[3]) / 2, **kw)
    assert len(rep["selected_layers"]) == 3 and all(len(c["layers"]) == 3 for c in rep["candidates"])
    none = calibrate(src, tmp_path / "c", max_bound=bounds[0] / 2, **kw)
    assert none["selected_layers"] == [] and none["candidates"] == []


@pytest.mark.slow
def test_set_measures_agree_across_splits(make_model_dir, local_ray):
    """The held-back loss and KL divergence of layer sets on the actors, for (stages, replicas) = (1, 1), (2, 1),
    (2, 2), equal the in-process backend's whole forwards: auto's candidates and single layers (each restarting
    at its first stage from the original's cached inputs, KL against the original's cached output), and, in a
    second call without the original, sets sharing a base that spans both stages (greedy's later steps: a cached
    pass with the base linearized, then each set from the stage of its first layer outside it; no KL)."""
    from transformers import AutoConfig

    from nbl_dist.calibration.plan import make_plan
    from nbl_dist.calibration.ray.backend import RayBackend
    from nbl_dist.core.selection import rule_sets

    src = make_model_dir("qwen2", torch.float64, num_hidden_layers=4)
    stats_blocks, held = AUTO_BLOCKS[:8], AUTO_BLOCKS[8:]
    ref = InProcessBackend(src, torch.float64)
    ref.stream(stats_blocks, batch_size=2)
    auto_sets = list(rule_sets(ref.scores(), 2))
    assert len(auto_sets) >= 2
    calls = [[(), *auto_sets, (0,), (0, 1), (0, 2), (0, 3), (1, 3), (0, 1, 3), (1, 2, 3)],
             [(0, 2, 3), (0, 1, 2), (0, 2)]]
    ref.fit([0, 1, 2, 3])
    want = [ref.measure_sets(sets, held, batch_size=3) for sets in calls]
    assert all(m.kl is not None for m in want[0]) and all(m.kl is None for m in want[1])
    assert want[0][0].kl == 0.0 and all(m.kl > 1e-6 for m in want[0][1:])
    for stages, replicas in [(1, 1), (2, 1), (2, 2)]:
        plan = make_plan(AutoConfig.from_pretrained(src), stages, replicas, dtype=torch.float64, batch_size=2,
                         seq_len=32)
        backend = RayBackend(str(src), plan, torch.float64)
        try:
            backend.stream(stats_blocks, batch_size=2)
            backend.reduce()
            backend.fit([0, 1, 2, 3])
            got = [backend.measure_sets(sets, held, batch_size=3) for sets in calls]
        finally:
            backend.close()
        for sets, g_call, w_call in zip(calls, got, want):
            for s, g, w in zip(sets, g_call, w_call):
                assert g.loss == pytest.approx(w.loss, rel=1e-9), (stages, replicas, s)
                assert (g.kl is None) == (w.kl is None), (stages, replicas, s)
                if w.kl is not None:
                    assert g.kl == pytest.approx(w.kl, rel=1e-9, abs=1e-15), (stages, replicas, s)


@pytest.mark.parametrize("rule, k, pool", [("auto", 3, 8), ("greedy", 3, 6), ("greedy", 4, 4), ("loss", 2, 8)])
def test_measured_work_counts_what_the_rule_runs(rule, k, pool):
    """The time estimate's count of fits and held-back forwards equals what the rule's own chooser fits and asks
    to measure (counted through its measure callable). The three statistic rules rank disjoint layers first here,
    so auto's three K-sets are distinct and its count (an upper bound in general) is exact."""
    from nbl_dist.core.linalg import LayerScores
    from nbl_dist.core.selection import (
        SetMeasure,
        choose_set,
        fits_needed,
        measured_work,
    )

    n = 12
    rank = {"cca": np.arange(n), "nmse": np.roll(np.arange(n), -k), "cosine": np.roll(np.arange(n), -2 * k)}
    scores = [LayerScores(layer=i, cca_bound=float(rank["cca"][i]), nmse=float(rank["nmse"][i]),
                          cosine=-float(rank["cosine"][i]), attn_ratio=0.0, ridge_x=0.0, ridge_y=0.0, tokens=1)
              for i in range(n)]
    fitted, passes = measured_work(rule, k, pool, n)
    if rule == "loss":  # every layer fitted; the original and each layer alone
        assert (fitted, passes) == (n, n + 1)
        return
    counted = []
    choose_set(scores, rule, k, pool,
               lambda sets: counted.extend(sets) or [SetMeasure(float(len(x)), float(len(x))) for x in sets])
    assert passes == len(counted)
    assert fitted == len(fits_needed(scores, rule, k, pool))
