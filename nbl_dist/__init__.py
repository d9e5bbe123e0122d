"""nbl-dist: Neural Block Linearization of LLM attention layers, calibrated on Ray."""

from __future__ import annotations

import typing

from nbl_dist.artifact.loading import load_linearized
from nbl_dist.model.registry import register_auto_classes

if typing.TYPE_CHECKING:
    from nbl_dist.calibration.pipeline import calibrate_api as calibrate
    from nbl_dist.drafting.pipeline import draft_api as draft
    from nbl_dist.healing.pipeline import heal_api as heal
    from nbl_dist.quantization.pipeline import quantize_api as quantize

# AutoConfig / AutoModelForCausalLM.from_pretrained load nbl-dist output folders once nbl_dist is imported. This
# imports torch and transformers' model classes (a few seconds); the pipeline itself is imported on first use.
register_auto_classes()

__all__ = ["calibrate", "draft", "heal", "load_linearized", "quantize"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # PEP 562: `import nbl_dist` to load a model need not import a workflow's pipeline (calibration, healing,
    # quantization, drafting).
    if name == "calibrate":
        from nbl_dist.calibration.pipeline import calibrate_api

        return calibrate_api
    if name == "heal":
        from nbl_dist.healing.pipeline import heal_api

        return heal_api
    if name == "quantize":
        from nbl_dist.quantization.pipeline import quantize_api

        return quantize_api
    if name == "draft":
        from nbl_dist.drafting.pipeline import draft_api

        return draft_api
    raise AttributeError(f"module 'nbl_dist' has no attribute {name!r}")
