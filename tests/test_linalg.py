"""cca_bound, lmmse_fit and the ridge ladder against scipy/numpy float64 references."""

import numpy as np
import pytest
import torch

from nbl_dist.core.linalg import cca_bound, covariances, layer_scores, lmmse_fit
from nbl_dist.core.stats import LayerStats
from tests.helpers import correlated_data, research_bound


def stats_of(x, a):
    s = LayerStats.empty(x.shape[1])
    s.update(torch.from_numpy(x), torch.from_numpy(a))
    return s


def test_cca_bound_equals_eigh_svd_formula():
    x, a = correlated_data(5000, 16, seed=4)
    got, rx, ry = cca_bound(stats_of(x, a))
    assert (rx, ry) == (0.0, 0.0)
    assert got == pytest.approx(research_bound(x, a), rel=1e-8)


def test_cca_bound_zero_for_affine_and_d_for_independent():
    rng = np.random.default_rng(5)
    d = 10
    x = rng.standard_normal((4000, d)) + 3.0
    a = x @ rng.standard_normal((d, d)).T * 0.5 + rng.standard_normal(d)
    assert abs(cca_bound(stats_of(x, a))[0]) < 1e-8
    n = 200_000
    x = rng.standard_normal((n, d))
    for scale in (2.0, 1e3):
        a = rng.standard_normal((n, d)) * scale
        # Closed form for independent isotropic x, a: rho_i^2 = var x / var y, so the bound is d s^2 / (1 + s^2),
        # which tends to d as the attention output dominates (the "x and a independent" limit). Sampling noise
        # adds about d^2 / n.
        want = d * scale**2 / (1 + scale**2)
        assert cca_bound(stats_of(x, a))[0] == pytest.approx(want, abs=d * d / n * 10)


def test_lmmse_fit_equals_least_squares():
    x, a = correlated_data(3000, 12, seed=6)
    fit = lmmse_fit(stats_of(x, a))
    design = np.hstack([x, np.ones((x.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, a, rcond=None)  # (d+1, d): a ~ x @ W^T + b
    np.testing.assert_allclose(fit.weight.numpy(), coef[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.bias.numpy(), coef[-1], rtol=1e-8, atol=1e-10)
    assert fit.ridge == 0.0


def test_ridge_ladder_on_rank_deficient_cxx():
    rng = np.random.default_rng(7)
    d = 8
    base = rng.standard_normal((500, d - 2))
    x = np.hstack([base, base[:, :2] * 2.0])  # two channels are copies: C_xx has rank d - 2
    a = rng.standard_normal((500, d))
    s = stats_of(x, a)
    fit = lmmse_fit(s)
    assert fit.ridge > 0.0  # the ladder had to step up, and says by how much
    lam = fit.ridge * float(np.trace(np.cov(x.T)) / d)
    cxx = np.cov(x.T) + lam * np.eye(d)
    cax = np.cov(a.T, x.T)[:d, d:]
    # W itself is ill-determined along C_xx's null space (condition ~ 1 / ridge), so compare what W does on the
    # data, which the null space does not touch, against the ridge-regularised normal equations.
    w_ref = np.linalg.solve(cxx, cax.T).T
    np.testing.assert_allclose(x @ fit.weight.numpy().T, x @ w_ref.T, rtol=1e-7, atol=1e-9)
    scores = layer_scores(3, s)
    assert scores.ridge_x == fit.ridge and np.isfinite(scores.cca_bound)
    # A user ridge is used as given (and recorded) when it suffices.
    assert lmmse_fit(stats_of(*correlated_data(500, d)), ridge=1e-3).ridge == 1e-3


def test_nmse_equals_residual_energy():
    x, a = correlated_data(3000, 12, seed=8)
    s = stats_of(x, a)
    fit = lmmse_fit(s)
    resid = a - (x @ fit.weight.numpy().T + fit.bias.numpy())
    y = x + a
    want = (resid.var(0, ddof=1).sum()) / np.trace(np.cov(y.T))
    assert layer_scores(0, s).nmse == pytest.approx(want, rel=1e-8)


def test_covariances_unbiased():
    x, a = correlated_data(100, 5)
    cov = covariances(stats_of(x, a))
    np.testing.assert_allclose(cov.c_xx.numpy(), np.cov(x.T), rtol=1e-12)
    np.testing.assert_allclose(cov.c_yy.numpy(), np.cov((x + a).T), rtol=1e-12)
