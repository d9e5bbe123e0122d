"""The healed folder: the same format as the model it heals (docs/method.md §12), written by artifact.write_derived:
every file copied as it is (so every frozen tensor is bit for bit the original's) but the safetensors files
holding the linear maps, written again with the trained W and b in the stored dtype; config.json's "nbl" section
gains a "healing" section, and nbl_heal_report.json the run's report. Staged beside --out and published whole.
"""

from __future__ import annotations

from pathlib import Path

from nbl_dist.artifact.folder import ModelFolder
from nbl_dist.artifact.publish import publish, staging_for
from nbl_dist.artifact.write import write_derived

REPORT_NAME = "nbl_heal_report.json"
MAPS_NAME = "maps.safetensors"  # the trained maps (float32, LoRA merged) in a checkpoint folder


def write_healed(model: ModelFolder, out_dir: str | Path, maps_file: str | Path, healing: dict,
                 report: dict) -> Path:
    """Write the healed folder and publish it as out_dir (the caller checked --overwrite).

    Args:
        model: the folder that was healed.
        out_dir: the healed folder.
        maps_file: safetensors file of the trained maps, under their checkpoint keys.
        healing: config.json's nbl.healing section.
        report: nbl_heal_report.json's content.
    Returns:
        out_dir.
    """
    staging = staging_for(out_dir)
    write_derived(model, staging, maps_file, {"healing": healing}, {REPORT_NAME: report})
    return publish(staging, out_dir)
