"""What `nbl-dist draft` refuses before any weight is read, each with one message that names the fix.

vLLM itself catches none of these: a draft whose hidden size is not the target's crashes the process (a segfault
in oneDNN on CPU), a draft of another vocabulary fails at run time with an IndexError, a target without the EAGLE-3
interface fails with "Target model does not have 'model' attribute", and repeated or out-of-range aux layer ids
with a reshape error. Reads config.json files, safetensors headers and the tokenizer, never a tensor; no vLLM (the
families below are those whose vLLM classes, and the plugin's NBL classes built from them, have the EAGLE-3
interface: tests/serving/test_drafting.py checks it against the installed vLLM).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nbl_dist.artifact.folder import ModelFolder
from nbl_dist.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from nbl_dist.model.arch import SUPPORTED_MODEL_TYPES
from nbl_dist.model.modeling_nbl import base_model_type

REPORT_NAME = "nbl_draft.json"  # beside a draft's config.json: its training record (data blocks, budget, accuracy)


@dataclasses.dataclass(frozen=True)
class Target:
    """The target as the draft sees it: its folder and the sizes a draft must match."""

    folder: ModelFolder
    family: str  # the base model_type (llama for nbl_llama)
    layers: int
    hidden: int
    vocab: int

    @property
    def path(self) -> Path:
        return self.folder.path

    def default_aux_layers(self) -> list[int]:
        """EAGLE-3's default taps, (2, L // 2, L - 3), made distinct and kept inside [0, L): vLLM deduplicates its
        own default, so a small L would collapse it (L = 6 gives (2, 3, 3))."""
        wanted = [2, self.layers // 2, self.layers - 3]
        ids = sorted({min(max(i, 0), self.layers - 1) for i in wanted})
        spare = (i for i in range(self.layers) if i not in ids)
        while len(ids) < min(3, self.layers):
            ids = sorted([*ids, next(spare)])
        return ids


def check_target(path: str) -> Target:
    """The target, if a draft can be trained for it and vLLM can tap it: a folder with config.json and safetensors
    weights, of a family whose vLLM class has the EAGLE-3 interface, not quantized.

    Raises:
        CheckpointError, UnsupportedArchitectureError: the message says what to pass instead.
    """
    from nbl_dist.model.safetensors_io import weight_map

    folder = ModelFolder.open(path, "--target")
    family = base_model_type(folder.config.get("model_type"))
    if family not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"--target {path!r} is a {folder.config.get('model_type')!r} model: vLLM taps the hidden states an "
            f"EAGLE-3 draft reads only from models with its EAGLE-3 interface, and nbl-dist drafts for "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (originals and their nbl-dist outputs)")
    if folder.quantization:
        raise CheckpointError(f"--target {path!r} is quantized ({folder.quantization.get('quant_method', '?')}): "
                              "train the draft for the float folder it was quantized from; the quantized model "
                              "serves with that draft too")
    weight_map(folder.path, "--target")
    cfg = folder.config
    return Target(folder=folder, family=family, layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]),
                  vocab=int(cfg["vocab_size"]))


def check_aux_layers(ids: list[int], layers: int, where: str) -> list[int]:
    """The aux layer ids, sorted, if they are distinct and inside [0, L); ConfigError naming `where` if not."""
    bad = [i for i in ids if not 0 <= i < layers]
    if bad or len(set(ids)) != len(ids) or not ids:
        raise ConfigError(f"{where} names layers {list(ids)}, but the target has {layers} layers: the draft reads the "
                          f"input of distinct layers 0 to {layers - 1} (vLLM cannot tap others)")
    return sorted(ids)


def read_draft(path: str, flag: str = "--init") -> dict:
    """A draft folder's config.json, if it is an EAGLE-3 draft in the speculators format vLLM loads."""
    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{flag} {path!r} has no config.json: pass a draft folder (an `nbl-dist draft` --out, "
                              "or another EAGLE-3 draft in the speculators format)")
    raw = json.loads(config.read_text())
    if raw.get("speculators_model_type") != "eagle3" or "transformer_layer_config" not in raw:
        raise CheckpointError(f"{flag} {path!r} is not an EAGLE-3 draft in the speculators format (its config.json "
                              "has no speculators_model_type 'eagle3' and transformer_layer_config)")
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{flag} {path!r} has no model.safetensors beside its config.json")
    return raw


def check_draft_fits(draft: dict, target: Target, flag: str = "--init") -> list[int]:
    """The draft's aux layer ids, if the draft fits the target: the same hidden size, the same vocabulary, and taps
    the target has. The message names the mismatch and what to do.

    Args:
        draft: the draft's config.json (read_draft).
        target: check_target's.
        flag: the option that named the draft.
    """
    layer = draft["transformer_layer_config"]
    hidden = draft.get("target_hidden_size") or layer.get("hidden_size")
    if layer.get("hidden_size") != target.hidden or hidden != target.hidden:
        raise CheckpointError(f"{flag} is a draft of hidden size {layer.get('hidden_size')} for a target of hidden "
                              f"size {hidden}; --target {str(target.path)!r} has {target.hidden}: a draft reads "
                              "its target's hidden states, so it fits only targets of its width (train a new draft "
                              "without --init)")
    if layer.get("vocab_size") != target.vocab or draft.get("draft_vocab_size", 0) > target.vocab:
        raise CheckpointError(f"{flag} is a draft for a vocabulary of {layer.get('vocab_size')} tokens; --target "
                              f"{str(target.path)!r} has {target.vocab}: its proposals would be other tokens (train "
                              "a new draft without --init)")
    ids = draft.get("eagle_aux_hidden_state_layer_ids")
    if not ids:
        raise CheckpointError(f"{flag} names no eagle_aux_hidden_state_layer_ids in its config.json: vLLM would take "
                              "its own default taps, which need not be the ones it was trained on")
    return check_aux_layers(list(ids), target.layers, f"{flag}'s eagle_aux_hidden_state_layer_ids")


def check_tokenizer(draft_record: dict | None, tokenizer_fingerprint: str, flag: str = "--init") -> None:
    """A draft that records the tokenizer it was trained with (nbl_draft.json) must share the target's."""
    if draft_record and draft_record.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint):
        raise CheckpointError(f"{flag} was trained with another tokenizer than --target's: its token ids mean other "
                              "text; train a new draft without --init")


def draft_records(path: str) -> list[dict]:
    """The data records of an nbl-dist draft and of the drafts it was refitted from (nbl_draft.json's "data", then
    its "init_data"), newest first: the blocks of --data every one of them trained on. Empty for a draft nbl-dist did
    not write. A refit of a refit keeps the whole line, so none of its prompts was seen by any ancestor."""
    report = Path(path) / REPORT_NAME
    if not report.is_file():
        return []
    saved = json.loads(report.read_text())
    return [r for r in [saved.get("data"), *saved.get("init_data", [])] if r]
