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
    the centred values x - mu are not, so TF32 would round them. bf16 products keep their float32 sums in
    float32 too (no reduced-precision split-K reduction on CUDA). The settings are restored on exit.
    """
    prev = torch.get_float32_matmul_precision()
    cuda_matmul = torch.backends.cuda.matmul
    prev_bf16 = cuda_matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    cuda_matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)
        cuda_matmul.allow_bf16_reduced_precision_reduction = prev_bf16


# ---------------------------------------------------------------- Gram products at a chosen precision
# How a batch's centred Gram products are formed (docs/method.md §3); all accumulate into float64 statistics.
#   fp32    the centred values in gram_dtype (float32, or float64 for a float64 model), one GEMM;
#   bf16x3  each centred value split as hi + lo, both bf16 (hi = bf16(t), lo = bf16(t - hi): 16 significant bits),
#           and L^T R formed from three bf16 GEMMs with float32 sums, hi^T hi + hi^T lo + lo^T hi. The dropped
#           lo^T lo is below float32's round-off except on the diagonal of M_xx and M_aa, where its terms are
#           squares that add up instead of cancelling; that diagonal is added exactly (O(m d) work);
#   bf16    the centred values rounded to bf16, one bf16 GEMM with float32 sums.
PRECISIONS = ("fp32", "bf16x3", "bf16")
# `auto`: per device, the fastest precision whose measured accuracy meets AUTO_TOLERANCE (the numbers are in
# benchmarks/RESULTS.md, "Statistics precision"). On CPU the bf16 precisions run as float32 GEMMs (see
# split_operand), so nothing is faster than fp32 there.
AUTO_PRECISION = {"cpu": "fp32", "cuda": "bf16x3"}
AUTO_TOLERANCE = ("co-moments within 1e-5 relative error of float64 statistics on SmolLM2 (so the fit stays at "
                  "float32's level: W within 2e-3) and held-out perplexity within 0.1% at K = 4 and 8")
# The GEMMs of one product: (part of the left operand, part of the right one).
GEMM_TERMS = {"fp32": ((0, 0),), "bf16": ((0, 0),), "bf16x3": ((0, 0), (0, 1), (1, 0))}


def resolve_precision(choice: str, device_type: str, dtype: torch.dtype) -> str:
    """The statistics precision to use: `choice`, or for "auto" the device's entry of AUTO_PRECISION (fp32 for a
    float64 forward, which asks for float64 statistics)."""
    if choice != "auto":
        return choice
    return "fp32" if dtype == torch.float64 else AUTO_PRECISION.get(device_type, "fp32")


def split_operand(t: torch.Tensor, precision: str) -> tuple[torch.Tensor, ...]:
    """A centred batch t (m, d) as the parts its Gram products are formed from, each (m, d).

    fp32: (t,); bf16: (bf16(t),); bf16x3: (hi, lo). t is consumed (overwritten) by bf16x3.
    Off CUDA, torch's bf16 GEMM returns bf16 (its float32 sums are rounded away), so the bf16 parts are handed
    over as float32 holding the bf16 values: a float32 GEMM of bf16-exact values is the same product with float32
    sums (each product of two bf16 values is exact in float32), at float32 speed.
    """
    if precision == "fp32":
        return (t,)
    hi = t.to(torch.bfloat16)
    parts = (hi,) if precision == "bf16" else (hi, t.sub_(hi).to(torch.bfloat16))  # t - hi is exact in float32
    on_cuda = t.is_cuda
    del t  # the caller's temporary: freed before the float32 copies below exist
    return parts if on_cuda else tuple(p.float() for p in parts)


# Bytes per token and channel that the centred x and a take at their peak while a batch's Grams are formed (for
# the memory plan): float32 copies; bf16 parts (float32 ones off CUDA) with one operand's split in flight.
CENTRED_BYTES = {"cuda": {"fp32": 8, "bf16": 8, "bf16x3": 12}, "cpu": {"fp32": 8, "bf16": 10, "bf16x3": 20}}


def _mm_f32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ right with float32 (or float64) sums and output, for float32/float64 or CUDA bf16 operands."""
    if left.dtype == torch.bfloat16:
        return torch.mm(left, right, out_dtype=torch.float32)
    return left @ right


def gram(left: tuple[torch.Tensor, ...], right: tuple[torch.Tensor, ...], precision: str,
         rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
    """L[:, rows]^T R[:, cols] at `precision`, from the parts of split_operand (each (m, d)).

    Returns:
        (len(rows), len(cols)) in float32 (float64 for float64 parts).
    """
    out = None
    for i, j in GEMM_TERMS[precision]:
        p = _mm_f32(left[i][:, rows].T, right[j][:, cols])
        out = p if out is None else out.add_(p)
    return out


# Symmetric products by block-rows of the upper triangle (the lower one mirrored): (b+1)/(2b) of the FLOPs with b
# block-rows. Used on the devices listed here, where it is faster (benchmarks/stats_precision.py measures both).
# CPU: not listed. The block-row GEMMs alone take 0.66-0.8 of a full GEMM's time from d = 576 on, but within the
# whole update the strided float64 adds and the mirror cost more than that saves (SmolLM2, d = 576, 1024 tokens:
# 1.7x slower; synthetic d = 576-2048: equal). CUDA: not measured yet, so full GEMMs until it is.
TRIANGLE_BLOCKS: dict[str, int] = {}
TRIANGLE_MIN_DIM = 256  # below this the small GEMMs' overhead eats the saving


def triangle_edges(d: int, device_type: str) -> list[int]:
    """Column boundaries of the block-rows a symmetric d x d product is formed in ([0, d]: one full GEMM)."""
    blocks = TRIANGLE_BLOCKS.get(device_type, 1) if d >= TRIANGLE_MIN_DIM else 1
    return [round(k * d / blocks) for k in range(blocks + 1)]


def add_symmetric_gram(acc: torch.Tensor, parts: tuple[torch.Tensor, ...], precision: str) -> None:
    """acc (d, d) float64 += T^T T for the batch whose parts are given, forming only the upper block-triangle.

    One block-row (b, d - lo) is alive at a time, so the transient memory is at most one d x d product.
    """
    edges = triangle_edges(acc.shape[0], parts[0].device.type)
    for lo, hi in zip(edges, edges[1:]):
        row = gram(parts, parts, precision, slice(lo, hi), slice(lo, None)).to(acc.device, torch.float64)
        acc[lo:hi, lo:] += row  # (hi - lo, d - lo): the diagonal block and the blocks right of it
        acc[hi:, lo:hi] += row[:, hi - lo:].T  # their mirror below the diagonal
    if precision == "bf16x3":  # the low parts' squares, which three GEMMs leave out
        low = parts[1].float()
        acc.diagonal().add_((low * low).sum(0, dtype=torch.float64).to(acc.device))


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
    def update(self, x: torch.Tensor, a: torch.Tensor, precision: str = "fp32") -> None:
        """Fold one batch of token positions into the statistics, in place.

        The batch is centred on its own mean and its Gram products are computed at `precision` where the
        activations are (the GPU, say); each d x d product is then added in float64 where the statistics live,
        with Chan's correction for the shift of the mean. One product is alive at a time, so the transient
        memory is one d x d in float32 (gram_dtype) plus its float64 copy.

        Args:
            x: (..., d) residual-stream input of the layer (before its input norm).
            a: (..., d) attention sub-layer output, same leading shape.
            precision: how the Gram products are formed, one of PRECISIONS (see split_operand).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"unknown statistics precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        d = self.dim
        x = x.reshape(-1, d)  # (m, d)
        a = a.reshape(-1, d)  # (m, d)
        m = x.shape[0]
        if m == 0:
            return
        cd = gram_dtype(x.dtype)
        mu_xb = x.mean(0, dtype=torch.float64)  # (d,)
        mu_ab = a.mean(0, dtype=torch.float64)  # (d,)
        # (m, d) each, centred on the batch mean (no cancellation below), as the parts of `precision`
        xs = split_operand(x.to(cd) - mu_xb.to(cd), precision)
        as_ = split_operand(a.to(cd) - mu_ab.to(cd), precision)
        n1, n = self.n, self.n + m
        dx = mu_xb.to(self.device) - self.mu_x  # (d,)
        da = mu_ab.to(self.device) - self.mu_a  # (d,)
        w = n1 * m / n
        with full_fp32_matmul():
            add_symmetric_gram(self.m_xx, xs, precision)
            self.m_ax += gram(as_, xs, precision).to(self.device, torch.float64)  # (d, d)
            add_symmetric_gram(self.m_aa, as_, precision)
        del xs, as_
        if n1:
            for acc, dl, dr in ((self.m_xx, dx, dx), (self.m_ax, da, dx), (self.m_aa, da, da)):
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
