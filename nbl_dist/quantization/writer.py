"""The quantized folder's last touches, in the staging folder the engine wrote: config.json's nbl.quantization
section (for an nbl-dist output: the scheme, method, group size, maps, ignore list and the blocks it calibrated
on; an original gets none, since load_linearized refuses an "nbl" section beside a plain model_type) and
nbl_quantize_report.json (the same, with timings and the versions of llm-compressor, compressed-tensors and
transformers), then one publish (artifact.publish)."""

from __future__ import annotations

import json
from pathlib import Path

from nbl_dist.artifact.publish import publish

REPORT_NAME = "nbl_quantize_report.json"


def write_quantized(staging: Path, out: Path, section: dict | None, report: dict) -> Path:
    """Add the record to the staging folder and publish it as `out` (the caller checked --overwrite).

    Args:
        staging: the folder the engine wrote (a compressed-tensors checkpoint with its tokenizer).
        out: --out.
        section: config.json's nbl.quantization, or None for an original (no nbl section).
        report: nbl_quantize_report.json's content.
    Returns:
        out.
    """
    if section is not None:
        path = staging / "config.json"
        config = json.loads(path.read_text())
        config["nbl"] = {**config["nbl"], "quantization": section}
        path.write_text(json.dumps(config, indent=2))
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    return publish(staging, out)
