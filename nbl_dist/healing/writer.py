"""The healed folder: the same format as the model it heals (docs/method.md §12).

Every file of the output folder is copied as it is (so every frozen tensor is bit for bit the original's), except
the safetensors files holding the linear maps, which are written again, one tensor at a time, with the trained W
and b in the stored dtype, read one at a time from the final checkpoint's maps file; config.json's "nbl" section
gains a "healing" section, and nbl_heal_report.json the run's report. Written to a temporary folder beside --out
and moved into place at the end, so --out is all or nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open

from nbl_dist.arch import adapter_for
from nbl_dist.linearized import atomic_replace_dir, read_nbl_section
from nbl_dist.safetensors_io import tensor_specs, weight_map, write_safetensors_streaming

REPORT_NAME = "nbl_heal_report.json"
MAPS_NAME = "maps.safetensors"  # the trained maps (float32, LoRA merged) in a checkpoint folder


def map_keys(model_dir: Path) -> list[str]:
    """The checkpoint keys of every linearized layer's W and b."""
    from types import SimpleNamespace

    config = json.loads((model_dir / "config.json").read_text())
    adapter = adapter_for(SimpleNamespace(model_type=config["model_type"]))
    return [k for i in read_nbl_section(model_dir)["linearized_layers"] for k in adapter.nbl_keys(i)]


def write_healed(model_dir: str | Path, out_dir: str | Path, maps_file: str | Path, healing: dict,
                 report: dict) -> Path:
    """Write the healed folder.

    Args:
        model_dir: the folder that was healed.
        out_dir: the healed folder to create (replaced if it exists: the caller checked --overwrite).
        maps_file: safetensors file of the trained maps, under their checkpoint keys.
        healing: config.json's nbl.healing section.
        report: nbl_heal_report.json's content.
    Returns:
        out_dir.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.writing"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trained = set(map_keys(model_dir))
    wmap, specs = weight_map(model_dir), tensor_specs(model_dir)
    rewrite = {f for k, f in wmap.items() if k in trained}
    for p in model_dir.iterdir():
        if p.is_file() and p.name not in rewrite and p.name not in ("config.json", REPORT_NAME):
            shutil.copy2(p, tmp / p.name)
    with safe_open(str(maps_file), framework="pt") as new:
        for fname in sorted(rewrite):
            with safe_open(str(model_dir / fname), framework="pt") as old:
                keys = [k for k, f in wmap.items() if f == fname]
                sources = [(k, *specs[k], (lambda k=k, old=old: (new.get_tensor(k) if k in trained
                                                                  else old.get_tensor(k)).to(specs[k][0])))
                           for k in keys]
                write_safetensors_streaming(tmp / fname, sources)
    config = json.loads((model_dir / "config.json").read_text())
    config["nbl"] = {**config["nbl"], "healing": healing}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    atomic_replace_dir(tmp, out_dir)
    return out_dir
