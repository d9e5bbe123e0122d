"""The FLOP model of a calibration and the plan's estimate of its wall time.

FLOPs per token of one decoder layer's forward (2 per multiply-add of its weights, plus attention's QK^T and AV
over the causal prefix) and of its statistics at a precision (core/stats.py: M_ax one product, M_xx and M_aa by
block-rows of their upper triangle where the device does that, each product as many GEMMs as the precision has
terms); a device's rates, given (--device-tflops) or measured on the spot with one micro-batch through one layer;
and from them the estimated seconds of each compute phase. calibration/plan.py, the pipeline and the benchmarks
import it.
Plain torch, no Ray.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import threading
import time

import torch

from nbl_dist.core.linalg import layer_scores
from nbl_dist.core.stats import GEMM_TERMS, LayerStats, triangle_edges

# Dense peak TFLOP/s of the NVIDIA H100 SXM (datasheet; no sparsity): the rates of a given --device-tflops are
# scaled by these ratios on a GPU, and benchmarks/RESULTS.md projects a 70B calibration from them.
H100_TFLOPS = {"fp32": 67.0, "bf16": 989.0, "fp64": 67.0}
# Float64 factorisations (rank, fit) on a CPU run at about half its float32 rate (half the lanes per vector).
CPU_FP64_RATIO = 0.5
# Cholesky factorisations and triangular solves of the rank and fit phases, in units of d^3 float64 FLOPs per
# layer: scores factor C_xx and C_yy (d^3/3 each) and solve three d x d triangular systems (d^3 each); a fit
# factors C_xx and solves twice against it (docs/method.md §4-§5, core/linalg.py).
RANK_D3 = 2 / 3 + 3
FIT_D3 = 1 / 3 + 2


def layer_forward_flops(config, seq_len: int) -> float:
    """FLOPs per token of one decoder layer's forward: its weights' multiply-adds and causal attention.

    Args:
        config: the model's transformers config.
        seq_len: tokens per block (a token attends to (seq_len + 1) / 2 positions on average).
    """
    d, heads = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    weights = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * config.intermediate_size
    attention = 2 * 2 * heads * head_dim * (seq_len + 1) / 2  # QK^T and AV
    return 2 * weights + attention


def head_flops(config) -> float:
    """FLOPs per token of the output head (hidden -> vocabulary logits), which a measured rule's last stage runs."""
    return 2 * config.hidden_size * config.vocab_size


def symmetric_fraction(d: int, device_type: str) -> float:
    """Share of a full d x d product that a symmetric one forms on this device (1: a full GEMM)."""
    edges = triangle_edges(d, device_type)
    return sum((hi - lo) * (d - lo) for lo, hi in zip(edges, edges[1:])) / (d * d)


def stats_flops(d: int, precision: str, device_type: str) -> float:
    """FLOPs per token of one layer's Gram products at `precision` (the GEMMs it runs; O(d) work left out)."""
    terms = len(GEMM_TERMS[precision])
    return 2 * d * d * terms * (1 + 2 * symmetric_fraction(d, device_type))


@dataclasses.dataclass(frozen=True)
class DeviceRates:
    """FLOP/s of one actor: the forward in its dtype, the Gram products at the statistics precision, and the
    float64 factorisations; `source` says where they come from."""

    forward: float
    stats: float
    fp64: float
    source: str


def rates_from_tflops(tflops: float, device_type: str, forward_dtype: torch.dtype, precision: str) -> DeviceRates:
    """Rates from a device's dense TFLOP/s in the forward dtype (--device-tflops).

    On CPU every product runs at that rate (the bf16 precisions are float32 GEMMs there, stats.split_operand);
    on a GPU the statistics and float64 rates follow the H100's published ratios.
    """
    rate = tflops * 1e12
    if device_type != "cuda":
        return DeviceRates(rate, rate, rate * CPU_FP64_RATIO, f"given: {tflops:g} TFLOP/s")
    forward_kind = "fp32" if forward_dtype in (torch.float32, torch.float64) else "bf16"
    scale = rate / H100_TFLOPS[forward_kind]
    stats_kind = "fp32" if precision == "fp32" else "bf16"
    return DeviceRates(rate, scale * H100_TFLOPS[stats_kind], scale * H100_TFLOPS["fp64"],
                       f"given: {tflops:g} TFLOP/s, other precisions at the H100's ratios")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to n (None: left as they are) inside the block."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def best_seconds(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def random_layer(config, device: torch.device, dtype: torch.dtype):
    """(decoder layer 0 with random weights, its rotary embedding): what one layer costs, without a checkpoint."""
    from nbl_dist.model.arch import adapter_for, meta_model

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"  # as the shards run (model/shard_model.py)
    adapter = adapter_for(config)
    meta = meta_model(config)
    layer = adapter.layers(meta)[0].to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return layer, adapter.rebuild_rotary(adapter.decoder(meta), config, device)


def side_by_side(work, copies: int) -> list:
    """work() run by `copies` threads started together (torch releases the GIL in its kernels, so they compute
    at once, as that many actors sharing this machine's CPUs do); their results, in no particular order."""
    if copies <= 1:
        return [work()]
    start, results = threading.Barrier(copies), []

    def run():
        start.wait()
        results.append(work())

    threads = [threading.Thread(target=run) for _ in range(copies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@torch.no_grad()
def measure_rates(config, device: str, dtype: torch.dtype, batch_size: int, seq_len: int, precision: str,
                  actors: int = 1) -> DeviceRates:
    """One actor's rates measured on this machine: one micro-batch (batch_size x seq_len) through one random
    decoder layer, its statistics update at `precision`, and the scores of that layer (the rank phase's
    factorisations and solves, whose float64 rate at this d is well below a GEMM's), each the best of 3 runs.

    Args:
        actors: actors sharing this machine's CPUs (a local CPU run). They are measured side by side, each with
            its share of torch threads, since they share the cores and their vector units (on the development
            machine two 1-thread actors on 2 vCPUs each ran at ~0.56 of a lone thread's rate).
    """
    dev = torch.device(device)
    layer, rotary = random_layer(config, dev, dtype)
    d, tokens = config.hidden_size, batch_size * seq_len
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(batch_size, seq_len, d, device=dev, dtype=dtype, generator=g)  # (B, T, d)
    a = torch.randn_like(h, dtype=dtype)  # (B, T, d)
    pos = torch.arange(seq_len, device=dev).unsqueeze(0)  # (1, T)
    cos_sin = rotary(h, pos)

    def one_actor() -> tuple[float, float, float]:
        stats = LayerStats.empty(d, dev)
        return (best_seconds(lambda: layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin,
                                           use_cache=False)),
                best_seconds(lambda: stats.update(h, a, precision)), best_seconds(lambda: layer_scores(0, stats)))

    cpu = dev.type == "cpu"
    copies = max(1, actors) if cpu else 1
    threads = max(1, (os.cpu_count() or 1) // copies)  # as ray_cluster shares the CPUs out
    with torch_threads(threads if cpu else None):
        t_fwd, t_stats, t_fp64 = (max(t) for t in zip(*side_by_side(one_actor, copies)))  # the slowest actor
    how = f" ({copies} actor(s) side by side, {threads} thread(s) each)" if cpu else ""
    return DeviceRates(layer_forward_flops(config, seq_len) * tokens / t_fwd,
                       stats_flops(d, precision, dev.type) * tokens / t_stats, RANK_D3 * d ** 3 / t_fp64,
                       f"measured on {dev.type}{how}: one {batch_size} x {seq_len} micro-batch through one layer")


@dataclasses.dataclass(frozen=True)
class TimeEstimate:
    """Estimated seconds of the compute phases of a calibration, with the FLOPs and rates behind them."""

    phases: dict[str, float]  # stream, rank, fit (and loss_scoring for the measured rule)
    forward_flops_per_token: float  # the whole model's decoder layers
    stats_flops_per_token: float
    stats_precision: str
    rates: DeviceRates

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        r = self.rates
        per = " + ".join(f"{k} {v:.3g} s" for k, v in self.phases.items())
        return (f"  time estimate: {per} = {sum(self.phases.values()):.3g} s of compute (start-up, reading and "
                f"writing weights are I/O: not estimated)\n"
                f"    per token {(self.forward_flops_per_token + self.stats_flops_per_token) / 1e9:.3f} GFLOP "
                f"(forward {self.forward_flops_per_token / 1e9:.3f}, statistics "
                f"{self.stats_flops_per_token / 1e9:.3f} at {self.stats_precision}); per actor forward "
                f"{r.forward / 1e9:,.1f}, statistics {r.stats / 1e9:,.1f}, float64 {r.fp64 / 1e9:,.1f} GFLOP/s "
                f"({r.source})")


def estimate_time(config, plan, tokens: int, seq_len: int, batch_size: int, precision: str, rates: DeviceRates,
                  fitted_layers: int, score_tokens: int = 0, score_passes: int | None = None) -> TimeEstimate:
    """Seconds of the stream, rank and fit phases (and the measured rule's scoring passes when score_tokens).

    stream: each replica streams tokens / replicas through its stages, which work in parallel, so the slowest
    stage sets the pace, plus (stages - 1) micro-batches to fill the pipeline. rank: every layer's scores, the
    stages in parallel; fit: `fitted_layers` fits on one stage's actor after another (the worst case).

    Args:
        config: the model's config; plan: its ShardPlan (stages, replicas, device).
        tokens: calibration tokens; seq_len, batch_size: the micro-batch shape.
        precision: the statistics precision; rates: one actor's DeviceRates.
        fitted_layers: layers fitted (K, or every layer for the measured rule).
        score_tokens: held-back tokens the measured rule forwards score_passes times (default: once per layer and
            once unmodified, the loss rule's count; selection.measured_work gives each rule's).
    """
    d = config.hidden_size
    fwd = layer_forward_flops(config, seq_len)
    st = stats_flops(d, precision, plan.device)
    per_token = [len(s.layers) * (fwd / rates.forward + st / rates.stats) for s in plan.stages]  # seconds, per stage
    micro = batch_size * seq_len
    stream = tokens / plan.replicas * max(per_token) + (len(plan.stages) - 1) * micro * sum(per_token) / len(per_token)
    widest = max(len(s.layers) for s in plan.stages)
    phases = {"stream": stream, "rank": widest * RANK_D3 * d ** 3 / rates.fp64,
              "fit": fitted_layers * FIT_D3 * d ** 3 / rates.fp64}
    if score_tokens:
        passes = plan.num_layers + 1 if score_passes is None else score_passes
        # each pass projects its own output and, for the KL divergence, the original's (evaluate.next_token_sums)
        per_token = plan.num_layers * fwd + 2 * head_flops(config)
        phases["loss_scoring"] = passes * score_tokens * per_token / rates.forward
    n = plan.num_layers
    return TimeEstimate(phases, n * fwd, n * st, precision, rates)
