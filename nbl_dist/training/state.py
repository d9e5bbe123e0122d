"""What a training workflow's trainer saves in every checkpoint and loads back on resume (healing's Healer,
drafting's DraftTrainer): its trained tensors, AdamW's moments, the schedule, the step count and the history of
measurements. No Ray (training/ray_train.py carries the state to and from the checkpoints)."""

from __future__ import annotations

import torch


class TrainerState:
    """The state_dict / load_state_dict of a trainer that holds `params` (the trained tensors, in a fixed order),
    `optimizer`, `scheduler`, `step` and `history`."""

    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int
    history: dict[str, list]

    def state_dict(self) -> dict:
        """Everything a resumed run needs: the trained tensors, AdamW's moments, the schedule, the step, the
        history."""
        return {"params": [p.detach().cpu().clone() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
