"""DraftTrainer: the optimizer, schedule and step of draft training on one worker, data parallel through
torch.distributed when a process group is up (Ray Train's workers), the whole thing in this process when not.

A step: this worker's share of the global batch of sequences through the target (taps and next-token logits, no
graph) and the draft's TTT unroll (model.ttt_logits); the loss is, summed over the TTT steps, the forward KL
divergence from the target's next-token distribution over the draft vocabulary (core.losses.kl_divergence) summed
over the trained positions and divided by the global batch's trained positions at that step, so that workers that
each hold a share of the batch and add up their gradients get the gradient of the global loss; the gradients are
summed over the workers in one all-reduce (training.distributed), then AdamW. No Ray.

Accuracy at TTT position j: the share of trained positions where the draft's tokens at steps 0..j are all the
target's own next tokens (the greedy continuation), i.e. where vLLM would accept j + 1 drafted tokens if a round
started there. The held-out acceptance length is vLLM's own count replayed (`replay_rounds`): the first round starts
after the prompt, each accepts the draft's leading right tokens plus the target's own and the next starts after
them, so rounds start where vLLM's do (more often where the draft is wrong than an average over every position
would), and tokens per round is what vLLM will measure at --speculative-tokens = --ttt-steps (§14).
"""

from __future__ import annotations

import torch

from nbl_dist.core.losses import kl_divergence
from nbl_dist.drafting.model import TargetTaps, draft_target_ids, trainable_parameters, ttt_logits
from nbl_dist.training.distributed import all_reduce_sum, sum_gradients, world
from nbl_dist.training.schedule import lr_factor
from nbl_dist.training.state import TrainerState


def step_masks(mask: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The trained positions of each TTT step, aligned with ttt_logits' index i: (B, T - 1) bool, step j's entry i
    true when the target's distribution at position i + 1 + j is trained on (mask (B, T), data.Sequences)."""
    b, t = mask.shape
    out = []
    for j in range(steps):
        m = torch.zeros(b, t - 1, dtype=torch.bool, device=mask.device)
        m[:, :t - 1 - j] = mask[:, 1 + j:]
        out.append(m)
    return out


def step_counts(mask: torch.Tensor, steps: int) -> list[int]:
    """Trained positions per TTT step of a batch's mask (B, T): each step's loss is divided by its count."""
    return [int(m.sum()) for m in step_masks(mask, steps)]


def step_sums(logits: list[torch.Tensor], target_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
              target_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[int], list[int], torch.Tensor]:
    """Per TTT step j: the summed KL divergence over the trained positions (a tensor with the draft's graph), how
    many positions the draft's chain of tokens 0..j got right, and how many there were; and per start i, how many of
    the draft's tokens from there are the target's, (B, T - 2) int (the input of replay_rounds).

    Args:
        logits: ttt_logits' output, logits[j] (B, T - 1, Vd).
        target_logits: (B, T, Vd) the target's logits over the draft vocabulary at every position.
        ids: (B, T) the tokens (the target's own continuation after the prompt).
        mask: (B, T) bool trained positions (data.Sequences.loss_mask).
        target_ids: (Vd,) the target id of each draft token.
    """
    t = ids.shape[1]
    kl, correct, total = [], [], []
    chain = None
    leading = torch.zeros(ids.shape[0], t - 2, dtype=torch.long, device=ids.device)
    for j, (lj, mj) in enumerate(zip(logits, step_masks(mask, len(logits)))):
        n = t - 2 - j  # starts i whose predicted token i + 2 + j is in the row (the mask never trains the others)
        valid = mj[:, :n]
        ref = target_logits[:, 1 + j:1 + j + n]  # (B, n, Vd): the target's distribution at i + 1 + j
        kl.append(kl_divergence(lj[:, :n][valid], ref[valid]).sum())
        proposed = target_ids[lj[:, :n].argmax(-1)]  # (B, n): the draft's token, as a target id
        right = proposed == ids[:, 2 + j:]  # the token the target produced at i + 2 + j
        chain = right if chain is None else chain[:, :n] & right
        leading[:, :n] += chain
        correct.append(int((chain & valid).sum()))
        total.append(int(valid.sum()))
    return kl, correct, total, leading


def replay_rounds(leading: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[int, int, list[int]]:
    """vLLM's greedy speculation replayed on rows of the target's own continuations: (rounds, tokens they yield,
    rounds that accepted a token at each draft position).

    The first round starts after the prompt (the target's first token comes from its prefill): at start i the draft
    proposes tokens i + 2 ..; the round accepts the `leading[b, i]` right ones (at most `steps`, never past the
    row's last token) plus the target's own, and the next round starts after them. A row of prompt P and length L
    gives the L - P - 1 tokens after the first, as vLLM would count them on a request of that many.

    Args:
        leading: (B, T - 2) int, step_sums' count of the draft's right tokens from each start.
        mask: (B, T) bool trained positions (data.Sequences.loss_mask: P - 1 .. L - 2).
    """
    rounds, tokens, per_position = 0, 0, [0] * steps
    for b in range(leading.shape[0]):
        starts = mask[b].nonzero().flatten().tolist()
        if len(starts) < 2:
            continue
        i, last = starts[0], starts[-1]  # the round at i yields token i + 1; the row ends at token last + 1
        while i < last:
            accepted = min(int(leading[b, i]), steps, last - i - 1)
            for j in range(accepted):
                per_position[j] += 1
            rounds += 1
            tokens += accepted + 1
            i += accepted + 1
    return rounds, tokens, per_position


class DraftTrainer(TrainerState):
    """Training state of one worker.

    Args:
        target: TargetTaps (the frozen target on this worker's device).
        draft: the Eagle3DraftModel being trained (float32, on the same device).
        ttt_steps: TTT steps per position.
        lr, schedule, warmup_steps, total_steps: AdamW and the learning-rate schedule (lr_factor).
        compute_dtype: the training step's matmuls (bfloat16: under autocast, about twice float32's speed on a CPU
            with AVX512-BF16; the weights, AdamW and the loss stay float32; held-out steps run in float32, as vLLM
            serves a float32 target).
    """

    def __init__(self, target: TargetTaps, draft, *, ttt_steps: int, lr: float, schedule: str, warmup_steps: int,
                 total_steps: int, compute_dtype: torch.dtype = torch.float32):
        self.target, self.draft, self.ttt_steps, self.compute_dtype = target, draft, ttt_steps, compute_dtype
        self.params = trainable_parameters(draft)
        self.device = self.params[0].device
        self.target_ids = draft_target_ids(draft).to(self.device)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_factor(schedule, warmup_steps, total_steps))
        self.step = 0
        self.history: dict[str, list] = {"train": [], "heldout": []}

    def train_step(self, ids: torch.Tensor, mask: torch.Tensor, counts: list[int],
                   outputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """One optimizer step on this worker's sequences ids, mask (b, T) of a global batch whose trained positions
        per TTT step are `counts`; `outputs`, the target's (taps, logits) of ids where already known (TargetCache),
        else the target runs here. Returns the global batch's loss (summed over the steps of each step's mean KL),
        its accuracy per TTT position and the learning rate."""
        self.draft.train()
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.optimizer.zero_grad(set_to_none=False)
        taps, target_logits = outputs if outputs is not None else self.target(ids)
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            logits = ttt_logits(self.draft, taps, ids, self.ttt_steps)
        logits = [lj.float() for lj in logits]  # the KL in float32
        kl, correct, total, _ = step_sums(logits, target_logits, ids, mask, self.target_ids)
        loss = sum(k / max(1, n) for k, n in zip(kl, counts))
        loss.backward()
        sum_gradients(self.params)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        n = len(kl)
        sums = all_reduce_sum([float(loss.detach()), *map(float, correct), *map(float, total)], self.device)
        record = {"step": self.step, "lr": lr, "loss": sums[0],
                  "accuracy": [c / max(1.0, t) for c, t in zip(sums[1:1 + n], sums[1 + n:])]}
        self.history["train"].append(record)
        return record

    @torch.no_grad()
    def heldout(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int, cache=None) -> dict:
        """Held-out sequences (N, T), each worker taking every W-th, summed over the workers: the mean KL per TTT
        step, the accuracy per TTT position, and vLLM's count replayed (replay_rounds): `acceptance`, the tokens per
        target step, and `per_position`, the share of rounds accepting a token at each draft position. Recorded in
        the history at the current step. `cache`: a TargetCache of these ids, else the target runs here."""
        self.draft.eval()
        rank, size = world()
        mine = torch.arange(ids.shape[0])[rank::size]
        n = self.ttt_steps
        kl_sum, correct, total, rounds = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * (n + 2)
        for start in range(0, len(mine), batch_size):
            rows = mine[start:start + batch_size]
            b_ids, b_mask = ids[rows].to(self.device), mask[rows].to(self.device)  # (b, T)
            taps, target_logits = cache(rows) if cache is not None else self.target(b_ids)
            kl, c, t, leading = step_sums(ttt_logits(self.draft, taps, b_ids, n), target_logits, b_ids, b_mask,
                                          self.target_ids)
            r, tokens, per_position = replay_rounds(leading.cpu(), b_mask.cpu(), n)
            for j in range(n):
                kl_sum[j] += float(kl[j])
                correct[j] += c[j]
                total[j] += t[j]
            rounds = [a + b for a, b in zip(rounds, [r, tokens, *per_position])]
        sums = all_reduce_sum([*kl_sum, *correct, *total, *rounds], self.device)
        kl_sum, correct, total, rounds = sums[:n], sums[n:2 * n], sums[2 * n:3 * n], sums[3 * n:]
        count = max(1.0, rounds[0])
        record = {"step": self.step, "kl": [k / max(1.0, t) for k, t in zip(kl_sum, total)],
                  "accuracy": [c / max(1.0, t) for c, t in zip(correct, total)],
                  "acceptance": rounds[1] / count if rounds[0] else 1.0,
                  "per_position": [a / count for a in rounds[2:]]}
        self.history["heldout"].append(record)
        return record
