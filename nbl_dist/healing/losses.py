"""The healing losses, per predicted position (docs/method.md §12), and their backward chunked over positions.

With p the original's next-token distribution at a position, q the linearized model's and y the token that came
next:  kl = sum_v p(v) (log p(v) - log q(v))   (forward KL from the original)
       ce = -log q(y)                           (next-token cross-entropy on the text)
       kl+ce = kl + ce.
A step's loss is their sum over the global batch's positions divided by that count, so that workers that each
hold a share of the batch and add up their gradients get the gradient of the global mean. Plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nbl_dist.evaluate import HEAD_ROWS, log_probs


def position_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                    targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position kl and ce (n,) of logits (n, V) against the next tokens (n,); kl needs the teacher's logits.
    Computed in float32 at least."""
    logq = log_probs(student_logits)  # (n, V)
    out = {"ce": F.nll_loss(logq, targets, reduction="none")}
    if teacher_logits is not None:
        logp = log_probs(teacher_logits)
        out["kl"] = (logp.exp() * (logp - logq)).sum(-1)
    return out


def combine(losses: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    """The trained loss per position: "kl", "ce" or "kl+ce"."""
    return sum(losses[part] for part in loss.split("+"))


def head_loss_backward(head, h_student: torch.Tensor, h_teacher: torch.Tensor | None, ids: torch.Tensor, loss: str,
                       denominator: int) -> dict[str, float]:
    """Backpropagate sum(loss) / denominator of the final hidden states (B, T, d) into h_student's graph, the
    vocabulary projection run HEAD_ROWS positions at a time: a whole (B T, V) logits tensor, with its teacher twin
    and its gradient, would not fit at a 128k vocabulary. Position t predicts token t + 1.

    Args:
        head: hidden (n, d) -> logits (n, V) (the final norm is already in h).
        h_student: the healed model's final hidden states, part of the graph of the trained maps.
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


@torch.no_grad()
def kl_sums(head, h_student: torch.Tensor, h_teacher: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Summed kl and ce over the positions of (B, T, d) final hidden states, no graph (held-out measurement)."""
    d = h_student.shape[-1]
    hs, ht = h_student[:, :-1].reshape(-1, d), h_teacher[:, :-1].reshape(-1, d)
    targets = ids[:, 1:].reshape(-1).to(hs.device)
    sums = {"kl": 0.0, "ce": 0.0, "positions": int(targets.numel())}
    for r in range(0, hs.shape[0], HEAD_ROWS):
        rows = slice(r, r + HEAD_ROWS)
        for k, v in position_losses(head(hs[rows]), head(ht[rows]), targets[rows]).items():
            sums[k] += float(v.double().sum())
    return sums
