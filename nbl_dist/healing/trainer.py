"""Healer: the optimizer, schedule and step of healing on one worker, data parallel through torch.distributed when
a process group is up (Ray Train's workers), the whole thing in this process when not (tests, debugging).

A step: this worker's share of the global batch through HealModel, the loss's gradient into the trained maps
(core.losses.head_loss_backward, divided by the global batch's positions), the gradients summed over the workers in
one all-reduce (training.distributed), then AdamW. No Ray.
"""

from __future__ import annotations

import math

import torch

from nbl_dist.core.losses import head_loss_backward, next_token_sums
from nbl_dist.healing.model import HealModel
from nbl_dist.training.distributed import all_reduce_sum, sum_gradients, world
from nbl_dist.training.schedule import lr_factor
from nbl_dist.training.state import TrainerState


class Healer(TrainerState):
    """Training state of one worker.

    Args:
        model: the HealModel (on this worker's device).
        loss: "kl", "ce" or "kl+ce".
        lr, weight_decay: AdamW's.
        schedule, warmup_steps, total_steps: the learning-rate schedule (lr_factor).
    """

    def __init__(self, model: HealModel, *, loss: str, lr: float, weight_decay: float, schedule: str,
                 warmup_steps: int, total_steps: int):
        self.model, self.loss = model, loss
        self.params = model.trainable_parameters()
        self.device = self.params[0].device
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_factor(schedule, warmup_steps, total_steps))
        self.step = 0
        self.history: dict[str, list] = {"train": [], "heldout": []}

    def train_step(self, ids: torch.Tensor, global_positions: int) -> dict:
        """One optimizer step on this worker's blocks ids (b, T) of a global batch of `global_positions` predicted
        positions. Returns the global batch's mean loss, kl and ce (kl: with a teacher) and the learning rate."""
        self.optimizer.zero_grad(set_to_none=False)
        student, teacher = self.model.forward(ids.to(self.device), teacher=self.loss != "ce")
        sums = head_loss_backward(self.model.head, student, teacher, ids, self.loss, global_positions)
        sum_gradients(self.params)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        keys = sorted(sums)
        totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], self.device)))
        record = {"step": self.step, "lr": lr, **{k: v / global_positions for k, v in totals.items()}}
        self.history["train"].append(record)
        return record

    @torch.no_grad()
    def heldout(self, blocks: torch.Tensor, batch_size: int) -> dict:
        """Mean KL divergence from the original and cross-entropy on held-out blocks (N, T), each worker taking
        every W-th block, summed over the workers. Recorded in the history at the current step."""
        rank, size = world()
        sums = {"kl": 0.0, "ce": 0.0, "positions": 0}
        mine = blocks[rank::size]
        # Sharded, every worker gathers each layer with the others: all make as many forward calls as the worker
        # with the most blocks, one with fewer repeating a block and dropping its sums.
        calls = math.ceil((blocks[0::size] if self.model.sharded else mine).shape[0] / batch_size)
        for call in range(calls):
            ids = mine[call * batch_size:(call + 1) * batch_size]
            counted = ids.shape[0] > 0
            ids = (ids if counted else blocks[:1]).to(self.device)
            student, teacher = self.model.forward(ids)
            measured = next_token_sums(self.model.head, student, ids, teacher)
            for k, key in (("kl", "kl_sum"), ("ce", "loss_sum"), ("positions", "tokens")):
                sums[k] += measured[key] if counted else 0
        kl, ce, n = all_reduce_sum([sums["kl"], sums["ce"], float(sums["positions"])], self.device)
        record = {"step": self.step, "kl": kl / n, "ce": ce / n}
        self.history["heldout"].append(record)
        return record
