"""nbl-dist: Neural Block Linearization of LLM attention layers, calibrated on Ray."""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from nbl_dist.linearized import load_linearized
    from nbl_dist.pipeline import calibrate_api as calibrate

__all__ = ["calibrate", "load_linearized"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use (PEP 562): `nbl-dist calibrate` and jobs/calibrate.py import nbl_dist.cli, and a
    # refused option should cost a fraction of a second, not the seconds torch and transformers take to import.
    if name == "calibrate":
        from nbl_dist.pipeline import calibrate_api

        return calibrate_api
    if name == "load_linearized":
        from nbl_dist.linearized import load_linearized

        return load_linearized
    raise AttributeError(f"module 'nbl_dist' has no attribute {name!r}")
