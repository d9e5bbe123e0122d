"""Shard plan from the config alone: contiguous layer ranges balanced by bytes, and each actor's memory.

The model is built on the meta device (no weights read, no memory) to count each layer's parameters exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from nbl_dist.core.stats import CENTRED_BYTES
from nbl_dist.errors import PlanError
from nbl_dist.model.arch import layer_param_counts
from nbl_dist.runtime.resources import fmt_bytes

STATS_MATRICES = 3  # M_xx, M_ax, M_aa, float64


# Fixed memory of an actor before it loads anything: Python, torch, transformers, Ray's worker (measured on the
# development machine: 430-520 MiB RSS for a CPU ShardWorker); on a GPU, the CUDA context and allocator slack.
CPU_RUNTIME_BYTES = 512 * 2**20
GPU_RUNTIME_BYTES = 1024 * 2**20
# Fraction of a device's memory a plan may use: fragmentation and libraries need the rest.
USABLE_FRACTION = 0.92


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: int
    start: int  # first layer
    end: int  # one past the last layer
    embed: bool
    params: int
    weight_bytes: int
    stats_bytes: int
    activation_bytes: int  # in-flight micro-batches and the forward's transient working set
    # The float64 factorisations of one layer's fit or score; also covers the replica merge, which holds at most
    # two incoming layers' statistics (3 d x d each) and never runs at the same time as a fit or score.
    fit_workspace_bytes: int
    runtime_bytes: int
    stats_on_device: bool = True

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end))

    @property
    def device_bytes(self) -> int:
        """Memory on the actor's device (the GPU, or host RAM for a CPU actor)."""
        on_device = self.weight_bytes + self.activation_bytes + self.runtime_bytes
        return on_device + (self.stats_bytes + self.fit_workspace_bytes if self.stats_on_device else 0)

    @property
    def host_bytes(self) -> int:
        """Extra host RAM of a GPU actor whose statistics live on the host (0 otherwise)."""
        return 0 if self.stats_on_device else self.stats_bytes + self.fit_workspace_bytes

    @property
    def total_bytes(self) -> int:
        return self.device_bytes + self.host_bytes


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    model_type: str
    num_layers: int
    hidden_size: int
    total_params: int
    dtype: str
    stages: tuple[StagePlan, ...]
    replicas: int

    device: str = "cpu"

    @property
    def num_actors(self) -> int:
        return len(self.stages) * self.replicas

    @property
    def peak_device_bytes(self) -> int:
        return max(s.device_bytes for s in self.stages)

    @property
    def cluster_bytes(self) -> int:
        return self.replicas * sum(s.total_bytes for s in self.stages)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for s, sd in zip(self.stages, d["stages"]):
            sd.update(device_bytes=s.device_bytes, host_bytes=s.host_bytes, total_bytes=s.total_bytes)
        d["cluster_bytes"] = self.cluster_bytes
        return d

    def describe(self) -> str:
        lines = [f"Shard plan: {self.model_type}, {self.num_layers} layers, d={self.hidden_size}, "
                 f"{self.total_params / 1e6:.1f}M params, {self.dtype} on {self.device}; {len(self.stages)} "
                 f"stage(s) x {self.replicas} replica(s) = {self.num_actors} actor(s)",
                 f"  {'stage':>5} {'layers':>9} {'weights':>10} {'stats':>10} {'activ.':>10} {'fit ws':>10} "
                 f"{'runtime':>10} {'device':>10} {'host':>10}"]
        for s in self.stages:
            lines.append(f"  {s.stage:>5} {f'{s.start}-{s.end - 1}':>9} {fmt_bytes(s.weight_bytes):>10} "
                         f"{fmt_bytes(s.stats_bytes):>10} {fmt_bytes(s.activation_bytes):>10} "
                         f"{fmt_bytes(s.fit_workspace_bytes):>10} {fmt_bytes(s.runtime_bytes):>10} "
                         f"{fmt_bytes(s.device_bytes):>10} {fmt_bytes(s.host_bytes):>10}")
        where = "on the device" if self.stages[0].stats_on_device else "in host memory"
        lines.append(f"  statistics {where}; per actor at most {fmt_bytes(self.peak_device_bytes)} on its device; "
                     f"cluster total {fmt_bytes(self.cluster_bytes)}")
        return "\n".join(lines)


def balance(costs: list[int], parts: int, first_extra: int = 0) -> list[tuple[int, int]]:
    """Split costs into `parts` contiguous non-empty ranges minimising the largest range's sum (the first range
    also carries first_extra). Exact dynamic programme, O(parts * n^2): n is a layer count."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise PlanError(f"--stages {parts} must be between 1 and the number of layers ({n})")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[p][j]: minimal max-cost splitting layers [0, j) into p ranges; cut[p][j] where the last range starts.
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for j in range(p, n - (parts - p) + 1):
            for i in range(p - 1, j):
                cost = prefix[j] - prefix[i] + (first_extra if i == 0 else 0)
                val = max(best[p - 1][i], cost)
                if val < best[p][j]:
                    best[p][j], cut[p][j] = val, i
    ranges, j = [], n
    for p in range(parts, 0, -1):
        i = cut[p][j]
        ranges.append((i, j))
        j = i
    return ranges[::-1]


def make_plan(config, stages: int, replicas: int = 1, dtype: torch.dtype = torch.float32, batch_size: int = 1,
              seq_len: int = 2048, max_inflight: int = 2, device: str = "cpu",
              stats_on_device: bool = True, stats_precision: str = "fp32") -> ShardPlan:
    """Plan `stages` contiguous shards balanced by bytes (weights + statistics), replicated `replicas` times.

    Memory per actor, from the config alone:
      weights     the shard's parameters in the forward dtype (stage 0 also the embedding);
      statistics  3 d x d float64 co-moments and 2 d float64 means per layer;
      activations (max_inflight + 1) micro-batches of (B, T, d) hidden states queued or produced, plus the
                  forward's working set (MLP intermediate, q/k/v/attention output, the centred copies
                  of x and a) and one d x d Gram product in float32 with its float64 copy;
      fit         9 d x d float64 for one layer at a time: scoring holds 3 covariances, C_yy, both Cholesky
                  factors and three triangular solves;
      runtime     the fixed cost of a worker process (CPU_RUNTIME_BYTES / GPU_RUNTIME_BYTES).
    """
    if replicas < 1:
        raise PlanError(f"--replicas {replicas} must be at least 1")
    per_layer, embed_params, total = layer_param_counts(config)
    esize = torch.empty((), dtype=dtype).element_size()
    d = config.hidden_size
    stats_per_layer = STATS_MATRICES * d * d * 8 + 2 * d * 8
    costs = [p * esize + stats_per_layer for p in per_layer]
    ranges = balance(costs, stages, first_extra=embed_params * esize)
    tokens = batch_size * seq_len
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    queued = (max_inflight + 1) * tokens * d * esize
    forward = tokens * esize * (3 * config.intermediate_size + (2 * heads + 2 * kv) * head_dim + 3 * d)
    centred = tokens * d * CENTRED_BYTES["cuda" if device == "cuda" else "cpu"][stats_precision] + d * d * (4 + 8)
    runtime = GPU_RUNTIME_BYTES if device == "cuda" else CPU_RUNTIME_BYTES
    out = []
    for s, (i, j) in enumerate(ranges):
        params = sum(per_layer[i:j]) + (embed_params if s == 0 else 0)
        out.append(StagePlan(stage=s, start=i, end=j, embed=(s == 0), params=params, weight_bytes=params * esize,
                             stats_bytes=(j - i) * stats_per_layer, activation_bytes=queued + forward + centred,
                             fit_workspace_bytes=9 * d * d * 8, runtime_bytes=runtime,
                             stats_on_device=stats_on_device))
    return ShardPlan(model_type=config.model_type, num_layers=len(per_layer), hidden_size=d, total_params=total,
                     dtype=str(dtype).removeprefix("torch."), stages=tuple(out), replicas=replicas, device=device)


def time_estimate(config, plan: ShardPlan, tokens: int, seq_len: int, batch_size: int, precision: str, *,
                  device_tflops: float | None = None, measure: bool = False, actors_here: int = 1,
                  fitted_layers: int | None = None, score_tokens: int = 0, score_passes: int | None = None):
    """The plan's estimated wall time of each compute phase (throughput.TimeEstimate), or None when no rate is
    known: the rates come from device_tflops, or are measured on this machine's CPU (measure) with one
    micro-batch through one layer, with the actors_here actors sharing those CPUs measured side by side.

    Args:
        config: the model's config; plan: its ShardPlan.
        tokens, seq_len, batch_size: the calibration tokens and the micro-batch shape.
        precision: the statistics precision (resolved, not "auto").
        fitted_layers: layers fitted (default: all); score_tokens: the measured rule's held-back tokens, forwarded
            score_passes times (default: the loss rule's, every layer alone and the original).
    """
    from nbl_dist.calibration import throughput

    dtype = getattr(torch, plan.dtype)
    if device_tflops is not None:
        rates = throughput.rates_from_tflops(device_tflops, plan.device, dtype, precision)
    elif measure:
        if plan.device != "cpu":
            raise PlanError(f"--measure times one layer on this machine's CPU, but the actors run on {plan.device}; "
                            "pass --device-tflops (one actor's dense TFLOP/s) instead")
        rates = throughput.measure_rates(config, "cpu", dtype, batch_size, seq_len, precision, actors_here)
    else:
        return None
    fitted = plan.num_layers if fitted_layers is None else fitted_layers
    return throughput.estimate_time(config, plan, tokens, seq_len, batch_size, precision, rates, fitted,
                                    score_tokens, score_passes)


@dataclasses.dataclass(frozen=True)
class FitCheck:
    fits: bool
    plan: ShardPlan  # the plan checked (stats placement decided)
    message: str


def check_memory(config, stages: int, device_memory: int | None, host_memory: int | None = None,
                 stats_device: str = "auto", **plan_kwargs) -> FitCheck:
    """Does the plan fit `device_memory` bytes per actor (and `host_memory` per actor for host statistics)?

    stats_device: "device", "cpu" (host), or "auto": on the device when that fits, else on the host when
    host_memory allows it. When nothing fits, the message names the smallest --stages that would.
    """
    device = plan_kwargs.get("device", "cpu")
    if device == "cpu":
        options = [True]  # a CPU actor's device memory is host memory: nowhere else to put them
    else:  # auto moves statistics to the host only when a host budget is stated
        options = {"device": [True], "cpu": [False],
                   "auto": [True] + ([False] if host_memory is not None else [])}[stats_device]
    plans = [make_plan(config, stages, stats_on_device=on, **plan_kwargs) for on in options]
    if device_memory is None:
        return FitCheck(True, plans[0], "no memory budget given: not checked")
    usable = int(device_memory * USABLE_FRACTION)
    for plan in plans:
        host_need = max(s.host_bytes for s in plan.stages)
        if plan.peak_device_bytes <= usable and (host_memory is None or host_need <= host_memory):
            where = "device" if plan.stages[0].stats_on_device else "host"
            return FitCheck(True, plan, f"fits: at most {fmt_bytes(plan.peak_device_bytes)} per actor of "
                                        f"{fmt_bytes(usable)} usable ({USABLE_FRACTION:.0%} of "
                                        f"{fmt_bytes(device_memory)}); statistics on the {where}")
    plan = plans[0]
    worst = max(plan.stages, key=lambda s: s.device_bytes)
    smallest = _smallest_stages(config, device_memory, stats_device, host_memory, stages, plan_kwargs)
    fix = (f"use --stages {smallest} (or more)" if smallest else
           f"no stage count up to the {plan.num_layers} layers fits: use a device with more memory")
    if device != "cpu" and plan.stages[0].stats_on_device:
        host_plan = make_plan(config, stages, stats_on_device=False, **plan_kwargs)
        if host_plan.peak_device_bytes <= usable:
            fix += (f"; or keep statistics in host memory with --stats-device cpu (needs "
                    f"{fmt_bytes(max(s.host_bytes for s in host_plan.stages))} of host RAM per actor)")
    return FitCheck(False, plan, (
        f"does not fit: stage {worst.stage} (layers {worst.start}-{worst.end - 1}) needs "
        f"{fmt_bytes(worst.device_bytes)} on its device but {fmt_bytes(usable)} is usable per actor "
        f"({USABLE_FRACTION:.0%} of {fmt_bytes(device_memory)}); {fix}"))


def _smallest_stages(config, device_memory, stats_device, host_memory, start, plan_kwargs) -> int | None:
    n = config.num_hidden_layers
    for p in range(start + 1, n + 1):
        if check_memory(config, p, device_memory, host_memory, stats_device, **plan_kwargs).fits:
            return p
    return None
