"""NBL's linear algebra in float64: covariances, the CCA bound, the LMMSE fit, and the ridge ladder.

All functions take a LayerStats and work on its device (CPU or GPU). Plain torch; never imports Ray.
"""

from __future__ import annotations

import dataclasses

import torch

from nbl_dist.core.stats import LayerStats
from nbl_dist.errors import FactorizationError

# Ridge strengths tried, smallest first, when a Cholesky factorisation fails; each is relative to mean(diag(C))
# (docs/method.md §7).
RIDGE_LADDER = (0.0, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Smallest accepted squared Cholesky pivot relative to the largest variance: below it, a solve would lose more
# than 12 of float64's 16 digits, so the matrix is treated as singular and the ridge ladder steps in.
MIN_PIVOT = 1e-12


@dataclasses.dataclass(frozen=True)
class Covariances:
    """Unbiased covariances (divide by n - 1), float64. c_ax rows index a, columns x."""

    c_xx: torch.Tensor  # (d, d)
    c_ax: torch.Tensor  # (d, d)
    c_aa: torch.Tensor  # (d, d)

    @property
    def c_yx(self) -> torch.Tensor:  # y = x + a
        return self.c_xx + self.c_ax

    @property
    def c_yy(self) -> torch.Tensor:
        return self.c_xx + self.c_ax + self.c_ax.T + self.c_aa


def covariances(stats: LayerStats) -> Covariances:
    if stats.n < 2:
        raise ValueError(f"covariances need at least 2 token positions, the statistics hold {stats.n}")
    s = 1.0 / (stats.n - 1)
    return Covariances(stats.m_xx * s, stats.m_ax * s, stats.m_aa * s)


def cholesky_with_ridge(c: torch.Tensor, ridge: float | None = None) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of c (+ lambda * mean(diag(c)) * I), with the smallest lambda that works.

    Args:
        c: (d, d) symmetric positive semi-definite, float64.
        ridge: a user-set lambda; the ladder then starts at it instead of 0.
    Returns:
        (L, lambda_used).
    """
    c = c.to(torch.float64)
    if not torch.isfinite(c).all():
        raise FactorizationError("covariance has non-finite entries (NaN/Inf in the activations?)")
    scale = c.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    start = ridge or 0.0
    ladder = [start] + [lam for lam in RIDGE_LADDER if lam > start]
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    for lam in ladder:
        L, info = torch.linalg.cholesky_ex(c + (lam * scale) * eye if lam else c)
        # A singular matrix often "factors" with round-off pivots; treat pivots below MIN_PIVOT as failure.
        if int(info) == 0 and bool(L.diagonal().square().min() > MIN_PIVOT * c.diagonal().max()):
            return L, float(lam)
    raise FactorizationError(
        f"Cholesky failed even with ridge {ladder[-1]:g} * mean(diag(C)); the statistics are degenerate "
        "(too few tokens for the hidden size, or constant activations)")


@dataclasses.dataclass(frozen=True)
class LinearFit:
    """The LMMSE map a ~ W x + b (nn.Linear convention: W is (out, in))."""

    weight: torch.Tensor  # (d, d) float64
    bias: torch.Tensor  # (d,) float64
    ridge: float


@dataclasses.dataclass(frozen=True)
class LayerScores:
    """Every ranking score of one layer (scalars only: what reaches the driver)."""

    layer: int
    cca_bound: float  # sum_i (1 - rho_i^2): lower is better
    nmse: float  # LMMSE residual energy / tr(C_yy): lower is better
    cosine: float  # mean cos(x, x + a) over tokens (LLM-Drop): higher means the attention changes less
    attn_ratio: float  # mean |a| / |x| over tokens
    ridge_x: float  # ridge used to factor C_xx
    ridge_y: float  # ridge used to factor C_yy
    tokens: int
    loss_increase: float | None = None  # measured rule: next-token loss (nats/token) added by this layer alone

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cca_from_factors(cov: Covariances, lx: torch.Tensor, ly: torch.Tensor) -> float:
    t = torch.linalg.solve_triangular(ly, cov.c_yx, upper=False)  # L_y^-1 C_yx                  (d, d)
    k = torch.linalg.solve_triangular(lx, t.T, upper=False)  # L_x^-1 (L_y^-1 C_yx)^T = (L_y^-1 C_yx L_x^-T)^T
    return float(lx.shape[0] - k.square().sum())


def cca_bound(stats: LayerStats, ridge: float | None = None) -> tuple[float, float, float]:
    """The CCA bound d - ||L_y^-1 C_yx L_x^-T||_F^2 (docs/method.md §5).

    Returns:
        (bound, ridge_x, ridge_y).
    """
    cov = covariances(stats)
    lx, rx = cholesky_with_ridge(cov.c_xx, ridge)
    ly, ry = cholesky_with_ridge(cov.c_yy, ridge)
    return _cca_from_factors(cov, lx, ly), rx, ry


def lmmse_fit(stats: LayerStats, ridge: float | None = None) -> LinearFit:
    """W = C_ax C_xx^-1, b = mu_a - W mu_x, via Cholesky solves in float64 (docs/method.md §4)."""
    cov = covariances(stats)
    lx, rx = cholesky_with_ridge(cov.c_xx, ridge)
    w_t = torch.cholesky_solve(cov.c_ax.T.contiguous(), lx)  # C_xx^-1 C_xa = W^T   (d, d)
    w = w_t.T.contiguous()
    b = stats.mu_a - w @ stats.mu_x
    return LinearFit(w, b, rx)


def layer_scores(layer: int, stats: LayerStats, ridge: float | None = None) -> LayerScores:
    """All ranking scores of one layer from its statistics (one factorisation of C_xx and one of C_yy)."""
    cov = covariances(stats)
    lx, rx = cholesky_with_ridge(cov.c_xx, ridge)
    ly, ry = cholesky_with_ridge(cov.c_yy, ridge)
    z = torch.linalg.solve_triangular(lx, cov.c_ax.T, upper=False)  # L_x^-1 C_xa        (d, d)
    explained = z.square().sum()  # tr(C_ax C_xx^-1 C_xa)
    nmse = float((cov.c_aa.trace() - explained) / cov.c_yy.trace())
    n = stats.n
    return LayerScores(layer=layer, cca_bound=_cca_from_factors(cov, lx, ly), nmse=nmse,
                       cosine=stats.cos_sum / n, attn_ratio=stats.ratio_sum / n,
                       ridge_x=rx, ridge_y=ry, tokens=n)
