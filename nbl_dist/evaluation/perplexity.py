"""Perplexity of a loaded model on token blocks."""

from __future__ import annotations

import math

import torch

from nbl_dist.core.losses import next_token_loss


@torch.no_grad()
def loss_sum(model, blocks: torch.Tensor, batch_size: int = 4) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) over (N, T) token blocks."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)  # (B, T)
        loss, n = next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
        total += loss
        count += n
    return total, count


def perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over (N, T) token blocks (every position but the first predicted)."""
    total, count = loss_sum(model, blocks, batch_size)
    return math.exp(total / count)


