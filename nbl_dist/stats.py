"""Per-layer sufficient statistics for NBL, as mergeable values.

A layer's statistics are the token count n, the means of x (the residual stream entering the layer) and a (the
attention sub-layer's output), and three centred co-moment matrices M_xx, M_ax, M_aa, all float64. Everything
NBL computes (covariances, the CCA bound, the LMMSE fit) follows from them, so a layer never needs its
(tokens x d) activations kept. Two partial sets merge exactly with Chan's pairwise update, so batches, actors
and machines can each accumulate their share and be reduced in any order (docs/method.md §3).

Beside them sit two plain running sums used by ranking rules other than the CCA bound: the sum over tokens of
cos(x, x + a) (LLM-Drop's rule) and of |a| / |x| (how large the replaced output is relative to the stream).

This module never imports Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch

_MATRICES = ("m_xx", "m_ax", "m_aa")
_VECTORS = ("mu_x", "mu_a")
_SCALARS = ("n", "cos_sum", "ratio_sum")


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a batch's centred Gram product: the batch's own dtype, at least float32.

    bf16 and fp16 values are exact in float32, so their products lose nothing there; float64 inputs stay float64
    so a float64 model is reproduced to round-off.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def full_fp32_matmul():
    """float32 Gram products at full float32 precision, whatever the process set.

    TF32 (or bf16-emulated fp32) is exact only for inputs with at most 10 mantissa bits, such as raw bf16 values;
    the centred values x - mu are not, so TF32 would round them. The setting is restored on exit.
    """
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


@dataclasses.dataclass
class LayerStats:
    """Sufficient statistics of one decoder layer (float64 throughout).

    Shapes: mu_x, mu_a (d,); m_xx, m_ax, m_aa (d, d). m_ax = sum (a - mu_a)(x - mu_x)^T, rows index a.
    """

    n: int
    mu_x: torch.Tensor
    mu_a: torch.Tensor
    m_xx: torch.Tensor
    m_ax: torch.Tensor
    m_aa: torch.Tensor
    cos_sum: float = 0.0
    ratio_sum: float = 0.0

    @classmethod
    def empty(cls, d: int, device: torch.device | str = "cpu") -> "LayerStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return cls(0, z(d), z(d), z(d, d), z(d, d), z(d, d))

    @property
    def dim(self) -> int:
        return int(self.mu_x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.mu_x.device

    # ---------------------------------------------------------------- accumulation
    @torch.no_grad()
    def update(self, x: torch.Tensor, a: torch.Tensor) -> None:
        """Fold one batch of token positions into the statistics, in place.

        The batch is centred on its own mean and its Gram products are computed in gram_dtype where the
        activations are (the GPU, say); each d x d product is then added in float64 where the statistics live,
        with Chan's correction for the shift of the mean. One product is alive at a time, so the transient
        memory is one d x d in gram_dtype plus its float64 copy.

        Args:
            x: (..., d) residual-stream input of the layer (before its input norm).
            a: (..., d) attention sub-layer output, same leading shape.
        """
        d = self.dim
        x = x.reshape(-1, d)  # (m, d)
        a = a.reshape(-1, d)  # (m, d)
        m = x.shape[0]
        if m == 0:
            return
        cd = gram_dtype(x.dtype)
        mu_xb = x.mean(0, dtype=torch.float64)  # (d,)
        mu_ab = a.mean(0, dtype=torch.float64)  # (d,)
        xc = x.to(cd) - mu_xb.to(cd)  # (m, d) centred on the batch mean: no cancellation below
        ac = a.to(cd) - mu_ab.to(cd)  # (m, d)
        n1, n = self.n, self.n + m
        dx = mu_xb.to(self.device) - self.mu_x  # (d,)
        da = mu_ab.to(self.device) - self.mu_a  # (d,)
        w = n1 * m / n
        with full_fp32_matmul():
            for name, left, right, dl, dr in (("m_xx", xc, xc, dx, dx), ("m_ax", ac, xc, da, dx),
                                              ("m_aa", ac, ac, da, da)):
                acc = getattr(self, name)
                acc += (left.T @ right).to(self.device, torch.float64)  # (d, d)
                if n1:
                    acc.addr_(dl, dr, alpha=w)
        self.mu_x += dx * (m / n)
        self.mu_a += da * (m / n)
        self.n = n
        cos_sum, ratio_sum = _cos_ratio_sums(x.to(cd), a.to(cd))
        self.cos_sum += cos_sum
        self.ratio_sum += ratio_sum

    def merge_(self, other: "LayerStats") -> None:
        """Chan's pairwise update: self <- self (+) other, in place (float64)."""
        if other.n == 0:
            return
        if self.n == 0:
            for f in _VECTORS + _MATRICES:
                setattr(self, f, getattr(other, f).to(self.device, torch.float64).clone())
            self.n, self.cos_sum, self.ratio_sum = other.n, other.cos_sum, other.ratio_sum
            return
        n1, n2 = self.n, other.n
        n = n1 + n2
        dx = other.mu_x.to(self.device) - self.mu_x  # (d,)
        da = other.mu_a.to(self.device) - self.mu_a  # (d,)
        w = n1 * n2 / n
        for name, dl, dr in (("m_xx", dx, dx), ("m_ax", da, dx), ("m_aa", da, da)):
            acc = getattr(self, name)
            acc += getattr(other, name).to(self.device)
            acc.addr_(dl, dr, alpha=w)
        self.mu_x += dx * (n2 / n)
        self.mu_a += da * (n2 / n)
        self.n = n
        self.cos_sum += other.cos_sum
        self.ratio_sum += other.ratio_sum

    def merge(self, other: "LayerStats") -> "LayerStats":
        """A new LayerStats equal to self (+) other; neither input changes."""
        out = self.clone()
        out.merge_(other)
        return out

    def clone(self) -> "LayerStats":
        return dataclasses.replace(self, **{f: getattr(self, f).clone() for f in _VECTORS + _MATRICES})

    def to(self, device: torch.device | str) -> "LayerStats":
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in _VECTORS + _MATRICES})

    # ---------------------------------------------------------------- serialisation
    def to_numpy(self) -> dict[str, np.ndarray]:
        """Flat dict of float64 numpy arrays (zero-copy through Ray's object store)."""
        out = {f: getattr(self, f).detach().cpu().numpy() for f in _VECTORS + _MATRICES}
        out["scalars"] = np.array([self.n, self.cos_sum, self.ratio_sum], dtype=np.float64)
        return out

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu",
                   copy: bool = True) -> "LayerStats":
        """copy=False: float64 host arrays are used in place (Ray's read-only zero-copy arrays included); only
        for a LayerStats that is read, never updated (the `other` of merge_)."""
        n, cos_sum, ratio_sum = (float(v) for v in arrays["scalars"])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = {f: torch.as_tensor(np.asarray(arrays[f]), dtype=torch.float64).to(device)
                       for f in _VECTORS + _MATRICES}
        if copy:
            tensors = {f: t.clone() for f, t in tensors.items()}
        return cls(n=int(n), cos_sum=cos_sum, ratio_sum=ratio_sum, **tensors)

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (the caller chooses atomicity: write to a temp name, then rename)."""
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in self.to_numpy().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "LayerStats":
        from safetensors.numpy import load_file

        return cls.from_numpy(load_file(str(path)), device=device)


def _cos_ratio_sums(x: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """Sums over tokens of cos(x, x + a) and |a| / |x| (x, a: (m, d)).

    A token whose x is exactly zero (a padding embedding) has no cosine; it counts as 0, and its ratio is
    |a| / tiny. Calibration text has no padding, so neither occurs in practice.
    """
    tiny = torch.finfo(x.dtype).tiny
    y = x + a
    xn = x.norm(dim=-1)  # (m,)
    cos = (x * y).sum(-1) / (xn * y.norm(dim=-1)).clamp_min(tiny)
    ratio = a.norm(dim=-1) / xn.clamp_min(tiny)
    return float(cos.double().sum()), float(ratio.double().sum())
