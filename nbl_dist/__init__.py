"""nbl-dist: Neural Block Linearization of LLM attention layers, calibrated on Ray."""

from nbl_dist.linearized import load_linearized, register_auto_classes
from nbl_dist.pipeline import calibrate_api as calibrate

# AutoConfig / AutoModelForCausalLM.from_pretrained load nbl-dist output folders once nbl_dist is imported.
register_auto_classes()

__all__ = ["calibrate", "load_linearized"]
__version__ = "0.1.0"
