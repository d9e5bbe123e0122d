"""The draft folder: speculators' EAGLE-3 format as its Eagle3DraftModel.save_pretrained writes it (config.json with
speculators_config, transformer_layer_config, draft_vocab_size, eagle_aux_hidden_state_layer_ids; model.safetensors
with fc, layers.0.*, norm, lm_head, embed_tokens, d2t and t2d), which vLLM loads as it is
(`speculative_config={"method": "eagle3", "model": DRAFT}`), plus nbl_draft.json: which blocks of --data prompted
the target, the budget, the held-out accuracy curve, the timings and the options. Staged beside --out and published
whole (artifact/publish.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from nbl_dist.artifact.publish import publish, staging_for
from nbl_dist.drafting.checks import REPORT_NAME


def write_draft(out_dir: str | Path, draft, report: dict) -> Path:
    """Write the draft folder and publish it as out_dir (the caller checked --overwrite).

    Args:
        out_dir: the draft folder.
        draft: the trained Eagle3DraftModel.
        report: nbl_draft.json's content (its "data" is the record later runs skip).
    Returns:
        out_dir.
    """
    staging = staging_for(out_dir)
    draft.save_pretrained(staging)
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=1, default=str))
    return publish(staging, out_dir)
