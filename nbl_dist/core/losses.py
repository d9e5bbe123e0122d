"""The next-token losses, per predicted position, and their sums over the positions of (B, T, d) hidden states:
the one implementation that calibration's measured rules, evaluation, healing and drafting all use (docs/method.md
§6a, §12, §14).

With p the original's next-token distribution at a position, q the linearized model's and y the token that came
next:  kl = sum_v p(v) (log p(v) - log q(v))   (forward KL divergence from the original)
       ce = -log q(y)                           (next-token cross-entropy on the text)
Position t predicts token t + 1. The vocabulary projection runs HEAD_ROWS positions at a time: a whole (B T, V)
logits tensor at a 128k vocabulary and 8 x 2048 tokens is 8 GiB in float32, twice over with the original's.
Everything is computed in float32 at least and summed in float64. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

HEAD_ROWS = 2048  # token positions per vocabulary projection

Head = Callable[[torch.Tensor], torch.Tensor]  # hidden (n, d), final norm applied -> logits (n, V)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary, in float32 at least (bf16 up, float64 kept)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def kl_divergence(logits: torch.Tensor, reference_logits: torch.Tensor, logq: torch.Tensor | None = None) \
        -> torch.Tensor:
    """KL(reference || this) per position, (...,) of logits (..., V) and the reference's logits (..., V): the forward
    KL divergence from the reference's next-token distribution (healing: the original's; drafting: the target's).
    `logq`: log_probs(logits) when the caller has it already."""
    logq = log_probs(logits) if logq is None else logq
    logp = log_probs(reference_logits)
    return (logp.exp() * (logp - logq)).sum(-1)


def position_losses(logits: torch.Tensor, reference_logits: torch.Tensor | None,
                    targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position ce (n,) of logits (n, V) against the next tokens (n,), and kl (n,) from the original's
    logits `reference_logits` (n, V) when given."""
    logq = log_probs(logits)  # (n, V)
    out = {"ce": F.nll_loss(logq, targets, reduction="none")}
    if reference_logits is not None:
        out["kl"] = kl_divergence(logits, reference_logits, logq)
    return out


def combine(losses: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    """The trained loss per position: "kl", "ce" or "kl+ce"."""
    return sum(losses[part] for part in loss.split("+"))


def predicted(h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states (n, d) that predict a token, the tokens they predict (n,)) of h (B, T, d) and ids (B, T)."""
    d = h.shape[-1]
    return h[:, :-1].reshape(-1, d), ids[:, 1:].reshape(-1).to(h.device, torch.long)


@torch.no_grad()
def next_token_sums(head: Head, h: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    """Summed next-token cross-entropy of hidden states h (B, T, d) against token ids (B, T), and, given the
    original model's hidden states `reference` (B, T, d) at the same point, the summed KL divergence
    KL(original || this) of the two next-token distributions (None without a reference).

    Returns:
        {"loss_sum": float, "kl_sum": float or None, "tokens": the number of predicted positions}.
    """
    h, targets = predicted(h, ids)  # (n, d), (n,)
    ref = None if reference is None else reference[:, :-1].reshape(-1, h.shape[-1])
    loss = kl = 0.0
    for r in range(0, h.shape[0], HEAD_ROWS):
        rows = slice(r, r + HEAD_ROWS)
        parts = position_losses(head(h[rows]), None if ref is None else head(ref[rows]), targets[rows])
        loss += float(parts["ce"].double().sum())
        if ref is not None:
            kl += float(parts["kl"].double().sum())
    return {"loss_sum": loss, "kl_sum": None if ref is None else kl, "tokens": int(targets.numel())}


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) of logits (B, T, V) against token ids (B, T)."""
    sums = next_token_sums(lambda x: x, logits, ids)  # logits are their own head's output
    return sums["loss_sum"], sums["tokens"]


def head_loss_backward(head: Head, h_student: torch.Tensor, h_teacher: torch.Tensor | None, ids: torch.Tensor,
                       loss: str, denominator: int) -> dict[str, float]:
    """Backpropagate sum(loss) / denominator of the final hidden states (B, T, d) into h_student's graph, HEAD_ROWS
    positions at a time (one chunk's logits, its teacher twin and its gradient alive at once). A step's loss is
    the sum over the global batch's positions divided by that count, so that workers that each hold a share of the
    batch and add up their gradients get the gradient of the global mean.

    Args:
        head: hidden (n, d) -> logits (n, V) (the final norm is already in h).
        h_student: the trained model's final hidden states, part of the graph of the trained parameters.
        h_teacher: the original's (no graph); None for the ce loss alone.
        ids: (B, T) token ids.
        loss: "kl", "ce" or "kl+ce".
        denominator: predicted positions of the whole global batch.
    Returns:
        Summed (not divided) kl, ce and loss over this worker's positions, as floats (kl only with a teacher).
    """
    d = h_student.shape[-1]
    hs = h_student[:, :-1].reshape(-1, d)  # (n, d)
    ht = None if h_teacher is None else h_teacher[:, :-1].reshape(-1, d)
    targets = ids[:, 1:].reshape(-1).to(hs.device)
    leaf = hs.detach().requires_grad_()
    sums = {"loss": 0.0, "ce": 0.0, **({"kl": 0.0} if ht is not None else {})}
    for r in range(0, leaf.shape[0], HEAD_ROWS):
        rows = slice(r, r + HEAD_ROWS)
        with torch.no_grad():
            teacher = None if ht is None else head(ht[rows])
        parts = position_losses(head(leaf[rows]), teacher, targets[rows])
        total = combine(parts, loss).sum()
        (total / denominator).backward()  # into leaf.grad, one chunk's logits alive at a time
        sums["loss"] += float(total.detach())
        for k, v in parts.items():
            sums[k] += float(v.detach().double().sum())
    hs.backward(leaf.grad)
    return sums
