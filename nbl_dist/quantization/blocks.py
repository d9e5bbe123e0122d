"""Which blocks of --data calibrate the quantization (GPTQ's Hessians, AWQ's activation scales): never a block a
recorded run used (the calibration's statistics and held-back blocks, a healing's training and KL blocks), then,
as healing does, the first `reserve` unused blocks are left alone for `nbl-dist eval` (its default --samples
scores exactly those, on the float and the quantized folder alike), and the next `samples` calibrate. The
quantized folder records both lists (config.json's nbl.quantization.data), so a later eval skips the blocks this
run used."""

from __future__ import annotations

import dataclasses

import torch

from nbl_dist.data.ledger import heldout_blocks, usage_record
from nbl_dist.data.sources import DataSource


@dataclasses.dataclass(frozen=True)
class QuantizeBlocks:
    """The calibration blocks (N, T) and their indices in --data's block stream, and the reserved ones'."""

    blocks: torch.Tensor
    indices: list[int]
    reserved_indices: list[int]
    relation: str  # how --data relates to the recorded runs' data (data.ledger.SAME_DATA, ...)
    excluded: int  # blocks skipped because a recorded run used them

    def record(self, source: DataSource, tokenizer, seq_len: int, seed: int) -> dict:
        """The quantization's data record (data.ledger.USED_BLOCK_KEYS lists "quantization_blocks")."""
        return usage_record(source, tokenizer, seq_len, seed, {"quantization_blocks": self.indices,
                                                                 "reserved_for_eval": self.reserved_indices})


def quantize_blocks(source: DataSource, tokenizer, seq_len: int, records: list[dict], reserve: int,
                    samples: int) -> QuantizeBlocks:
    """The first reserve + samples blocks of --data that no recorded run used; the last `samples` calibrate.

    Raises:
        DataError: --data has too few such blocks; the message says how many and which options to lower.
    """
    held = heldout_blocks(source, tokenizer, seq_len, reserve + samples, records,
                          advice=f"it needs --reserve-eval {reserve} + --samples {samples} blocks: lower them or "
                                 "--seq-len, or add text")
    return QuantizeBlocks(blocks=held.blocks[reserve:], indices=held.indices[reserve:],
                          reserved_indices=held.indices[:reserve], relation=held.relation, excluded=held.excluded)
