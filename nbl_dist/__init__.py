"""nbl-dist: Neural Block Linearization of LLM attention layers, calibrated on Ray."""

from nbl_dist.linearized import load_linearized
from nbl_dist.pipeline import calibrate_api as calibrate

__all__ = ["calibrate", "load_linearized"]
__version__ = "0.1.0"
