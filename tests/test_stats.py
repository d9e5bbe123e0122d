"""LayerStats against numpy float64 covariances of the whole data."""

import functools

import numpy as np
import pytest
import torch

from nbl_dist.core.stats import LayerStats
from tests.helpers import assert_matches, correlated_data, reference_moments


@pytest.mark.parametrize("mean_scale", [0.0, 1e4])
def test_streaming_uneven_batches_and_any_merge_order(mean_scale):
    d = 12
    x, a = correlated_data(1000, d, seed=1, mean_scale=mean_scale)
    cuts = [0, 1, 7, 130, 131, 600, 1000]  # uneven, including a batch of one token
    parts = []
    for lo, hi in zip(cuts, cuts[1:]):
        s = LayerStats.empty(d)
        s.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(a[lo:hi]))
        parts.append(s)
    streamed = LayerStats.empty(d)
    for lo, hi in zip(cuts, cuts[1:]):
        streamed.update(torch.from_numpy(x[lo:hi]), torch.from_numpy(a[lo:hi]))
    assert_matches(streamed, x, a, 1e-10)
    for order in [list(range(6)), [5, 0, 3, 1, 4, 2], [2, 4, 1, 5, 3, 0]]:
        merged = LayerStats.empty(d)
        for k in order:
            merged.merge_(parts[k])
        assert_matches(merged, x, a, 1e-10)
    # Tree-shaped merge: ((p0+p1)+(p2+p3)) + (p4+p5)
    tree = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3])).merge(parts[4].merge(parts[5]))
    assert_matches(tree, x, a, 1e-10)


def test_float32_batches_with_huge_means_stay_accurate():
    """float32 input, channel means 1e4 x spread: per-batch centring keeps the covariance right.

    Uncentred float32 Gram products lose every digit here; centred ones keep float32's ~1e-6 relative.
    The tolerance is float32's (the values themselves are rounded to float32 before the test compares).
    """
    d = 8
    x, a = correlated_data(4000, d, seed=2, mean_scale=1e4)
    x32, a32 = x.astype(np.float32), a.astype(np.float32)
    s = LayerStats.empty(d)
    for lo in range(0, 4000, 512):
        s.update(torch.from_numpy(x32[lo:lo + 512]), torch.from_numpy(a32[lo:lo + 512]))
    _, _, _, mxx, _, _ = reference_moments(x32.astype(np.float64), a32.astype(np.float64))
    assert np.abs(s.m_xx.numpy() - mxx).max() <= 1e-4 * np.abs(mxx).max()
    naive = (x32.T @ x32) - 4000 * np.outer(x32.mean(0), x32.mean(0))
    assert np.abs(naive - mxx).max() > 1e-2 * np.abs(mxx).max()  # what the centring protects against


def test_save_load_roundtrip_and_cosine_ratio(tmp_path):
    d = 6
    x, a = correlated_data(300, d, seed=3)
    s = LayerStats.empty(d)
    s.update(torch.from_numpy(x[:100]), torch.from_numpy(a[:100]))
    s.update(torch.from_numpy(x[100:]), torch.from_numpy(a[100:]))
    s.save(tmp_path / "s.safetensors")
    t = LayerStats.load(tmp_path / "s.safetensors")
    for f in ("mu_x", "mu_a", "m_xx", "m_ax", "m_aa"):
        assert torch.equal(getattr(s, f), getattr(t, f))
    assert (t.n, t.cos_sum, t.ratio_sum) == (s.n, s.cos_sum, s.ratio_sum)
    y = x + a
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    ratio = np.linalg.norm(a, axis=1) / np.linalg.norm(x, axis=1)
    assert s.cos_sum / s.n == pytest.approx(cos.mean(), rel=1e-12)
    assert s.ratio_sum / s.n == pytest.approx(ratio.mean(), rel=1e-12)


def test_merge_with_empty_is_identity():
    d = 4
    x, a = correlated_data(50, d)
    s = LayerStats.empty(d)
    s.update(torch.from_numpy(x), torch.from_numpy(a))
    for merged in (LayerStats.empty(d).merge(s), s.merge(LayerStats.empty(d))):
        assert_matches(merged, x, a, 1e-14)


# Relative error bound (max |error| / max |M|) of each precision's M_xx, M_ax, M_aa against float64 moments of the
# same float32 values. Measured: fp32 2.7-4.9e-7, bf16x3 6.1-9.7e-7, bf16 2.9-5.0e-4 (d = 8 and 288); float32's
# own round-off over 4000 tokens sets the first, bf16's 8-bit rounding of every centred value the last.
PRECISION_BOUNDS = {"fp32": 2e-6, "bf16x3": 4e-6, "bf16": 2e-3}


@functools.cache
def offset_data(d: int):
    """float32 x, a (4000, d) with channel means 1e4 x the spread, and their float64 reference moments."""
    x, a = correlated_data(4000, d, seed=2, mean_scale=1e4)
    x32, a32 = x.astype(np.float32), a.astype(np.float32)
    return x32, a32, reference_moments(x32.astype(np.float64), a32.astype(np.float64))


def precision_errors(d: int, precision: str) -> float:
    """Largest relative error of the three co-moments, float32 data with channel means 1e4 x the spread."""
    x32, a32, (_, mx, _, *ref) = offset_data(d)
    s = LayerStats.empty(d)
    for lo in range(0, 4000, 512):
        s.update(torch.from_numpy(x32[lo:lo + 512]), torch.from_numpy(a32[lo:lo + 512]), precision)
    assert np.abs(s.mu_x.numpy() - mx).max() <= 1e-12 * np.abs(mx).max()  # means stay float64 whatever the Grams
    return max(np.abs(got.numpy() - want).max() / np.abs(want).max()
               for got, want in zip((s.m_xx, s.m_ax, s.m_aa), ref))


@pytest.mark.parametrize("d, blocks", [(8, 0), (288, 4)])
def test_each_precision_against_float64_with_huge_means(d, blocks, monkeypatch):
    """Every precision within its stated bound; bf16x3 within 10x of fp32's error, bf16 far outside it (so the
    precision really changes the arithmetic). blocks = 4: M_xx and M_aa formed by 4 block-rows of their upper
    triangle, as on a device that lists it."""
    from nbl_dist.core import stats

    monkeypatch.setattr(stats, "TRIANGLE_BLOCKS", {"cpu": blocks} if blocks else {})
    assert len(stats.triangle_edges(d, "cpu")) == (blocks or 1) + 1
    errors = {p: precision_errors(d, p) for p in PRECISION_BOUNDS}
    for p, bound in PRECISION_BOUNDS.items():
        assert errors[p] <= bound, (p, errors)
    assert errors["bf16x3"] <= 10 * errors["fp32"], errors
    assert errors["bf16"] > 30 * errors["fp32"], errors


def test_unknown_precision_is_refused():
    s = LayerStats.empty(4)
    with pytest.raises(ValueError, match="bf16x3"):
        s.update(torch.zeros(3, 4), torch.zeros(3, 4), "tf32")
