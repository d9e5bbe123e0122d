"""Shard plan from the config alone: contiguous layer ranges balanced by bytes, and each actor's memory.

The model is built on the meta device (no weights read, no memory) to count each layer's parameters exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from nbl_dist.arch import adapter_for, meta_model
from nbl_dist.errors import PlanError

STATS_MATRICES = 3  # M_xx, M_ax, M_aa, float64


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: int
    start: int  # first layer
    end: int  # one past the last layer
    embed: bool
    params: int
    weight_bytes: int
    stats_bytes: int
    activation_bytes: int
    fit_workspace_bytes: int

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end))

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.stats_bytes + self.activation_bytes + self.fit_workspace_bytes


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    model_type: str
    num_layers: int
    hidden_size: int
    total_params: int
    dtype: str
    stages: tuple[StagePlan, ...]
    replicas: int

    @property
    def num_actors(self) -> int:
        return len(self.stages) * self.replicas

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for s, sd in zip(self.stages, d["stages"]):
            sd["total_bytes"] = s.total_bytes
        return d

    def describe(self) -> str:
        lines = [f"Shard plan: {self.model_type}, {self.num_layers} layers, d={self.hidden_size}, "
                 f"{self.total_params / 1e6:.1f}M params, {self.dtype}; {len(self.stages)} stage(s) x "
                 f"{self.replicas} replica(s) = {self.num_actors} actor(s)",
                 f"  {'stage':>5} {'layers':>9} {'weights':>10} {'stats':>10} {'activ.':>10} {'fit ws':>10} "
                 f"{'total':>10}"]
        for s in self.stages:
            lines.append(f"  {s.stage:>5} {f'{s.start}-{s.end - 1}':>9} {fmt_bytes(s.weight_bytes):>10} "
                         f"{fmt_bytes(s.stats_bytes):>10} {fmt_bytes(s.activation_bytes):>10} "
                         f"{fmt_bytes(s.fit_workspace_bytes):>10} {fmt_bytes(s.total_bytes):>10}")
        return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def layer_param_counts(config) -> tuple[list[int], int, int]:
    """(params of each decoder layer, params of the embedding, total params) from the meta-device model."""
    model = meta_model(config)
    adapter = adapter_for(config)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in adapter.layers(model)]
    embed = adapter.decoder(model).embed_tokens.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    return per_layer, embed, total


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
              seq_len: int = 2048, max_inflight: int = 2) -> ShardPlan:
    """Plan `stages` contiguous shards balanced by bytes (weights + statistics), replicated `replicas` times."""
    if replicas < 1:
        raise PlanError(f"--replicas {replicas} must be at least 1")
    per_layer, embed_params, total = layer_param_counts(config)
    esize = torch.empty((), dtype=dtype).element_size()
    d = config.hidden_size
    stats_per_layer = STATS_MATRICES * d * d * 8 + 2 * d * 8
    costs = [p * esize + stats_per_layer for p in per_layer]
    ranges = balance(costs, stages, first_extra=embed_params * esize)
    tokens = batch_size * seq_len
    # In flight per actor: max_inflight inputs waiting + one output, each (B, T, d); plus the forward's transient
    # working set (MLP intermediate, q/k/v, and the float32 centred copies of x and a for the Gram products).
    act = (max_inflight + 1) * tokens * d * esize
    work = tokens * (config.intermediate_size * 3 * esize + 4 * d * 4 + 4 * d * esize)
    out = []
    for s, (i, j) in enumerate(ranges):
        params = sum(per_layer[i:j]) + (embed_params if s == 0 else 0)
        out.append(StagePlan(stage=s, start=i, end=j, embed=(s == 0), params=params, weight_bytes=params * esize,
                             stats_bytes=(j - i) * stats_per_layer, activation_bytes=act + work,
                             fit_workspace_bytes=4 * d * d * 8))
    return ShardPlan(model_type=config.model_type, num_layers=len(per_layer), hidden_size=d, total_params=total,
                     dtype=str(dtype).removeprefix("torch."), stages=tuple(out), replicas=replicas)
