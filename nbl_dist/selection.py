"""Which layers to linearize: the ranking rules (docs/method.md §5-6) and the choice of K layers or a threshold.

The one home of the rule list: the config, the command line, the report and the benchmarks take it from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nbl_dist.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from nbl_dist.linalg import LayerScores

# Each rule's sort key: the layers with the lowest key are linearized first.
RULES: dict[str, Callable[["LayerScores"], float]] = {
    "cca": lambda s: s.cca_bound,
    "nmse": lambda s: s.nmse,
    "cosine": lambda s: -s.cosine,  # LLM-Drop: the attention whose output changes the stream least goes first
    "loss": lambda s: s.loss_increase,  # measured: the layer whose linearization costs least loss goes first
}
RANK_RULES = tuple(RULES)
MEASURED_RULES = ("loss",)  # rules that need held-back blocks and every layer's fit


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


def held_back_count(rank_by: str, score_samples: int) -> int:
    """Blocks kept out of the statistics for a measured rule (none for the statistic rules)."""
    return score_samples if rank_by in MEASURED_RULES else 0


def split_held_back(blocks: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics blocks, held-back blocks): the last `held` blocks never reach the statistics."""
    if held and held >= blocks.shape[0]:
        raise ConfigError(f"--score-samples {held} leaves no blocks for the statistics ({blocks.shape[0]} given)")
    n = blocks.shape[0] - held
    return blocks[:n], blocks[n:]
