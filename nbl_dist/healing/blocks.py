"""Which blocks of --data healing uses (docs/method.md §12): never a block the calibration recorded (statistics or
held back) nor one an earlier healing trained on; then the first `reserve` unused blocks are left alone, for
`nbl-dist eval` (its default --samples scores exactly those, on the unhealed and the healed folder alike), the
next `kl` measure the held-out KL divergence from the original, and the ones after train. The healed folder
records all three lists, so that a later eval or healing skips the blocks this one used."""

from __future__ import annotations

import dataclasses

import torch

from nbl_dist.data.ledger import heldout_blocks, usage_record
from nbl_dist.data.sources import DataSource


@dataclasses.dataclass(frozen=True)
class HealBlocks:
    """train (N, T) and kl (M, T) token blocks, with their indices in --data's block stream."""

    train: torch.Tensor
    kl: torch.Tensor
    train_indices: list[int]
    kl_indices: list[int]
    reserved_indices: list[int]
    relation: str  # how --data relates to the calibration's (data.ledger.SAME_DATA, ...)
    excluded: int  # blocks skipped because a recorded run used them

    def record(self, source: DataSource, tokenizer, seq_len: int, seed: int) -> dict:
        """The healing's data record (config.json's nbl.healing.data; data.ledger.USED_BLOCK_KEYS lists what it
        used)."""
        return usage_record(source, tokenizer, seq_len, seed, {"training_blocks": self.train_indices,
                                                                 "kl_blocks": self.kl_indices,
                                                                 "reserved_for_eval": self.reserved_indices})


def heal_blocks(source: DataSource, tokenizer, seq_len: int, records: list[dict], reserve: int, kl: int,
                train: int) -> HealBlocks:
    """The first reserve + kl + train blocks of --data that no recorded run used, split in that order.

    Raises:
        DataError: --data has too few such blocks; the message says how many it has and which options to lower.
    """
    need = reserve + kl + train
    held = heldout_blocks(source, tokenizer, seq_len, need, records,
                          advice=f"it needs --reserve-eval {reserve} + --kl-samples {kl} + {train} training blocks "
                                 "(the budget: --tokens or --steps times --batch-size): lower the budget, "
                                 "--reserve-eval or --kl-samples, or add text")
    idx = held.indices
    return HealBlocks(train=held.blocks[reserve + kl:], kl=held.blocks[reserve:reserve + kl],
                      train_indices=idx[reserve + kl:], kl_indices=idx[reserve:reserve + kl],
                      reserved_indices=idx[:reserve], relation=held.relation, excluded=held.excluded)
