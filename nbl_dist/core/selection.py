"""Which layers to linearize: the ranking rules (docs/method.md §5-6), the set rules that measure whole sets of
layers linearized together (§6a), and the choice of K layers or a threshold.

The one home of the rule list: the config, the command line, the report and the benchmarks take it from here.
The set rules need a `measure` callable (a backend's measure_sets over the held-back blocks); nothing here runs a
model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nbl_dist.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from nbl_dist.core.linalg import LayerScores

# Each rule's sort key: the layers with the lowest key are linearized first.
RULES: dict[str, Callable[["LayerScores"], float]] = {
    "cca": lambda s: s.cca_bound,
    "nmse": lambda s: s.nmse,
    "cosine": lambda s: -s.cosine,  # LLM-Drop: the attention whose output changes the stream least goes first
    "loss": lambda s: s.loss_increase,  # measured: the layer whose linearization costs least loss goes first
}
STATISTIC_RULES = ("cca", "nmse", "cosine")  # rules read off the statistics alone
SET_RULES = ("auto", "greedy")  # rules that measure whole sets linearized together (§6a)
RANK_RULES = ("auto", *RULES, "greedy")
MEASURED_RULES = ("loss", *SET_RULES)  # rules that need held-back blocks

LayerSet = tuple[int, ...]  # sorted layer indices, linearized together


@dataclasses.dataclass(frozen=True)
class SetMeasure:
    """One set linearized together, measured on the held-back blocks: its mean next-token loss, and its mean
    KL divergence from the original model's next-token distribution (both nats per predicted token). kl is
    measured only in a call that also runs the original (), the reference; otherwise None."""

    loss: float
    kl: float | None


def measure_of(sums: Sequence[dict], original: bool = False) -> SetMeasure:
    """A set's SetMeasure from its per-block sums (evaluate.next_token_sums: loss_sum, kl_sum, tokens). The
    original's KL from itself is 0; another set's KL is None unless every block had the original's output."""
    tokens = sum(s["tokens"] for s in sums)
    kls = [s["kl_sum"] for s in sums]
    kl = 0.0 if original else None if None in kls else sum(kls) / tokens
    return SetMeasure(loss=sum(s["loss_sum"] for s in sums) / tokens, kl=kl)


# sets -> each set's SetMeasure on the held-back blocks; () is the original
Measure = Callable[[list[LayerSet]], list[SetMeasure]]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A set of layers a set rule measured: its loss increase over the original and its KL divergence from the
    original (nats/token, None where not measured) on the held-back blocks, which rules proposed it (auto) or at
    which step it was tried (greedy), and whether it was chosen."""

    layers: LayerSet
    loss_increase: float
    kl: float | None
    found_by: str
    chosen: bool = False

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


def select_layers(scores: list[LayerScores], rank_by: str, linearize: int | None,
                  max_bound: float | None) -> list[int]:
    """The layers to linearize: the K best by the rule, or every layer whose CCA bound is at most max_bound."""
    ranked = sorted(scores, key=RULES[rank_by])
    if linearize is not None:
        if linearize > len(scores):
            raise ConfigError(f"--linearize {linearize} is more than the model's {len(scores)} layers")
        chosen = ranked[:linearize]
    else:
        chosen = [s for s in ranked if s.cca_bound <= max_bound]
    return sorted(s.layer for s in chosen)


def set_size(scores: list[LayerScores], linearize: int | None, max_bound: float | None) -> int:
    """K for a set rule: --linearize, or with --max-bound the number of layers whose CCA bound is within it (the
    bound says how many layers, the measurement which)."""
    return linearize if linearize is not None else sum(s.cca_bound <= max_bound for s in scores)


def rule_sets(scores: list[LayerScores], k: int) -> dict[LayerSet, list[str]]:
    """auto's candidates: the K-set of each statistic rule, identical sets once -> the rules that chose it."""
    sets: dict[LayerSet, list[str]] = {}
    for rule in STATISTIC_RULES:
        sets.setdefault(tuple(select_layers(scores, rule, k, None)), []).append(rule)
    return sets


def shortlist(scores: list[LayerScores], k: int, size: int) -> list[int]:
    """greedy's pool: max(size, K) layers, the statistic rules' rankings taken in turn (each rule's best, then
    each rule's second, ...), each layer once."""
    ranked = [sorted(scores, key=RULES[rule]) for rule in STATISTIC_RULES]
    pool: list[int] = []
    for row in zip(*ranked):
        for s in row:
            if s.layer not in pool and len(pool) < max(size, k):
                pool.append(s.layer)
    return sorted(pool)


def fits_needed(scores: list[LayerScores], rank_by: str, k: int, pool_size: int) -> list[int]:
    """The layers a set rule may linearize, whose maps must be fitted before it measures."""
    if rank_by == "auto":
        return sorted({i for layers in rule_sets(scores, k) for i in layers})
    return shortlist(scores, k, pool_size)


def measured_work(rank_by: str, k: int | None, pool_size: int, n_layers: int) -> tuple[int, int]:
    """(layers fitted, held-back forwards) a measured rule costs at most, for the plan's time estimate; k None
    (--max-bound) counts every layer. loss: every layer fitted, the original and each layer alone; auto: the
    statistic rules' K-sets and the original; greedy: its shortlist, and at each step every layer it could add."""
    k = n_layers if k is None else k
    if rank_by == "auto":
        return min(len(STATISTIC_RULES) * k, n_layers), len(STATISTIC_RULES) + 1
    if rank_by == "greedy":
        pool = min(max(pool_size, k), n_layers)
        return pool, 1 + (1 if pool == k else sum(pool - step for step in range(k)))
    return n_layers, n_layers + 1


def choose_auto(scores: list[LayerScores], k: int, measure: Measure) -> list[Candidate]:
    """Every distinct K-set of cca, nmse and cosine, measured linearized together (one call: the original and
    each set); the set whose next-token distribution stays closest to the original's (lowest KL) is chosen, a
    tie going to the earlier rule, cca first. Not the lowest loss: a set can lower the loss on text like the
    calibration text by moving the model towards it, and that move costs on other text (docs/method.md §6a)."""
    sets = rule_sets(scores, k)
    base, *measured = measure([(), *sets])
    found = [Candidate(layers, m.loss - base.loss, m.kl, ", ".join(rules))
             for (layers, rules), m in zip(sets.items(), measured)]
    best = min(range(len(found)), key=lambda n: (math.isnan(found[n].kl), found[n].kl))  # NaN: never chosen
    return [dataclasses.replace(c, chosen=n == best) for n, c in enumerate(found)]


def choose_greedy(scores: list[LayerScores], k: int, pool_size: int, measure: Measure) -> list[Candidate]:
    """Build the set one layer at a time: at each step add the shortlisted layer whose addition gives the set the
    lowest loss, measured with the whole set linearized together (one measure call per step). The loss, not the
    KL divergence auto uses: greedy is for text served like the calibration text, where a set that moves the
    model towards that text is a gain. Returns every set tried, step by step; the final set is the chosen one. A
    shortlist of exactly K layers leaves nothing to choose: the whole of it is measured once."""
    pool, current, tried = shortlist(scores, k, pool_size), (), []
    if len(pool) == k:
        base, m = measure([(), tuple(pool)])
        return [Candidate(tuple(pool), m.loss - base.loss, m.kl, "greedy: the whole shortlist", chosen=True)]
    base = None
    for step in range(1, k + 1):
        sets = [tuple(sorted((*current, i))) for i in pool if i not in current]
        measured = measure([(), *sets] if base is None else sets)
        if base is None:
            base, *measured = measured
        tried += [Candidate(s, m.loss - base.loss, m.kl, f"greedy step {step}") for s, m in zip(sets, measured)]
        current = sets[min(range(len(sets)), key=lambda n: measured[n].loss)]
    return [dataclasses.replace(c, chosen=c.layers == current) for c in tried]


def choose_set(scores: list[LayerScores], rank_by: str, k: int, pool_size: int,
               measure: Measure) -> tuple[list[int], list[Candidate]]:
    """(layers chosen, every candidate measured) for a set rule; K = 0 chooses nothing and measures nothing."""
    if k == 0:
        return [], []
    found = choose_auto(scores, k, measure) if rank_by == "auto" else choose_greedy(scores, k, pool_size, measure)
    return list(next(c.layers for c in found if c.chosen)), found


def held_back_count(rank_by: str, score_samples: int) -> int:
    """Blocks kept out of the statistics for a measured rule (none for the statistic rules)."""
    return score_samples if rank_by in MEASURED_RULES else 0


def split_held_back(blocks: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics blocks, held-back blocks): the last `held` blocks never reach the statistics."""
    if held and held >= blocks.shape[0]:
        raise ConfigError(f"--score-samples {held} leaves no blocks for the statistics ({blocks.shape[0]} given)")
    n = blocks.shape[0] - held
    return blocks[:n], blocks[n:]


def increases(measured: Sequence[SetMeasure]) -> list[float]:
    """Loss increases over the first entry (the original), for the rest."""
    return [m.loss - measured[0].loss for m in measured[1:]]
