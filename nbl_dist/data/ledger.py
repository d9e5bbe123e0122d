"""The ledger of which blocks of --data a run used, so that no later run trains or evaluates on them.

Calibration records the blocks it took its statistics from and held back (`calibration_record`), healing the
blocks it trained on, measured its KL on and left for eval (healing.blocks), quantization the blocks GPTQ or AWQ
calibrated on and those it left for eval (quantization.blocks), drafting the blocks that prompted the target
(drafting.data); each record is kept in the output folder (the "nbl" section of a model's config.json, a draft's
nbl_draft.json) beside the data's fingerprint and the tokenizer's. `heldout_blocks` reads --data again and
skips every block that overlaps one a record lists, comparing token ranges, so another --seq-len is fine.
"""

from __future__ import annotations

import dataclasses

import torch

from nbl_dist.data.blocks import BlockStream, seeded_choice, tokenizer_fingerprint
from nbl_dist.data.sources import DataSource
from nbl_dist.errors import DataError

# How --data at evaluation relates to the run's calibration data.
SAME_DATA, OTHER_DATA, UNRECORDED = "calibration data", "other data", "unrecorded"


@dataclasses.dataclass(frozen=True)
class HeldOutBlocks:
    """Evaluation blocks: blocks[k] is block indices[k] of --data's block stream (seq_len tokens each).

    Attributes:
        relation: SAME_DATA (the run's --data: the blocks it used were skipped), OTHER_DATA (nothing to skip) or
            UNRECORDED (the model folder records no calibration blocks: nothing could be skipped).
        excluded: blocks of this stream skipped because they overlap a block the run used.
    """

    blocks: torch.Tensor  # (N, seq_len) int64
    indices: list[int]
    relation: str
    excluded: int

    def describe(self) -> str:
        if self.relation == SAME_DATA:
            return (f"--data is the calibration data: skipped the {self.excluded} blocks that overlap a block the "
                    "run used (statistics or held back)")
        if self.relation == OTHER_DATA:
            return "--data is not the calibration data (another fingerprint): no block needs to be skipped"
        return ("the model folder records no calibration blocks (a plain checkpoint, or calibrated from blocks "
                "given in memory): no block skipped")


# The keys of a data record (calibration_record, healing's, quantization's, drafting's) that list blocks a run used.
USED_BLOCK_KEYS = ("statistics_blocks", "held_back_blocks", "training_blocks", "kl_blocks", "quantization_blocks",
                   "draft_prompt_blocks", "draft_heldout_blocks")


def heldout_blocks(source: DataSource, tokenizer, seq_len: int, samples: int, run: dict | list[dict] | None,
                   advice: str | None = None, seed: int | None = None) -> HeldOutBlocks:
    """The first `samples` blocks of `source` that share no token with a block the run used; with a seed, a seeded
    choice of `samples` among all such blocks (spread over the whole data, in the order of the choice).

    Without a seed, reads --data lazily, only as far as those blocks need; with one, tokenizes all of it once (a hub
    stream, possibly endless, is refused). The run's blocks are compared as token ranges, so another --seq-len than
    the run's still skips every block that overlaps one it used.

    Args:
        source: --data and how to read it.
        tokenizer: the tokenizer of the evaluated models.
        seq_len: tokens per evaluation block.
        samples: blocks wanted.
        run: the data record of the run (the "nbl" section's "data", calibration_record), a list of records (a
            healed folder has its calibration's and its healing's: data_records), or None.
        advice: the fix a too-short --data message names (default: calibrate's and eval's options).
        seed: None for the first unused blocks, else the seed of a choice among all of them.
    Returns:
        The blocks, their stream indices, how --data relates to the run's, and how many blocks were skipped.
    Raises:
        DataError: --data is the run's data read by another tokenizer, or has too few unused blocks.
    """
    records = [] if not run else [run] if isinstance(run, dict) else list(run)
    if seed is not None and source.is_hub:
        raise DataError(f"a seeded choice of blocks reads all of --data, and {source.path!r} is a hub dataset read as a "
                        "stream (possibly endless): save a slice of it locally (Dataset.save_to_disk) and pass that")
    relation, used = _run_blocks(source, tokenizer, records)  # used: (the record's seq_len, its block indices)
    stream = BlockStream(source.documents(), tokenizer, seq_len)
    chosen, indices, excluded = [], [], 0
    for j, block in enumerate(stream):
        # Block j is tokens [j * seq_len, (j + 1) * seq_len): the blocks of each record it touches, at their length.
        if any(any(i in blocks for i in range(j * seq_len // n, ((j + 1) * seq_len - 1) // n + 1))
               for n, blocks in used):
            excluded += 1
            continue
        chosen.append(block)
        indices.append(j)
        if seed is None and len(chosen) == samples:
            return HeldOutBlocks(torch.stack(chosen), indices, relation, excluded)
    if seed is not None and len(chosen) >= samples:
        pick = seeded_choice(len(chosen), samples, seed)
        return HeldOutBlocks(torch.stack([chosen[k] for k in pick]), [indices[k] for k in pick], relation, excluded)
    raise stream.too_few(len(chosen), samples, f"--data {source.path!r}",
                         f" besides the {excluded} the run used" if excluded else "", *([advice] if advice else []))


def data_records(nbl_section: dict) -> list[dict]:
    """Every data record of an output folder's "nbl" section: its calibration's, its healing's if healed, its
    quantization's if quantized."""
    later = [nbl_section.get(k) or {} for k in ("healing", "quantization")]
    return [r for r in (nbl_section.get("data"), *(s.get("data") for s in later)) if r]


def _run_blocks(source: DataSource, tokenizer, records: list[dict]) -> tuple[str, list[tuple[int, set[int]]]]:
    """(how --data relates to the runs' data, [(seq_len, block indices used)] of each record of this data)."""
    if not records:
        return UNRECORDED, []
    mine = [r for r in records if r["fingerprint"] == source.fingerprint()]
    if not mine:
        return OTHER_DATA, []
    if any(r["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer) for r in mine):
        raise DataError(f"--data {source.path!r} is the calibration data, but the model's tokenizer is not the one "
                        "that cut it into the run's blocks, so those blocks cannot be found and skipped; evaluate "
                        "with the tokenizer of the calibrated model (the output folder holds a copy)")
    return SAME_DATA, [(int(r["seq_len"]), {i for k in USED_BLOCK_KEYS for i in r.get(k, [])}) for r in mine]


def usage_record(source: DataSource, tokenizer, seq_len: int, seed: int | None, blocks: dict[str, list[int]]) -> dict:
    """A run's data record: how --data was read, the fingerprints of the data and the tokenizer, seq_len, seed, and
    the block indices of each use (USED_BLOCK_KEYS name those never to use again).

    Args:
        source: the run's --data.
        tokenizer: the tokenizer that cut it into blocks.
        seq_len: tokens per block.
        seed: the run's --seed.
        blocks: what the blocks were used for -> their indices in the block stream.
    """
    return {**source.to_record(), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "seq_len": seq_len,
            "seed": seed, **{k: list(v) for k, v in blocks.items()}}


def calibration_record(source: DataSource, tokenizer, seq_len: int, seed: int | None, indices: list[int],
                       held_back: int) -> dict:
    """Which blocks a calibration used, as its report and output's "nbl" section record them: `indices` are the
    block-stream indices of the blocks read, statistics blocks first, the `held_back` ones last."""
    n = len(indices) - held_back
    return usage_record(source, tokenizer, seq_len, seed,
                        {"statistics_blocks": indices[:n], "held_back_blocks": indices[n:]})
