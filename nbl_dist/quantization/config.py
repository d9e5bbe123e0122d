"""QuantizeConfig: the frozen, typed options of `nbl-dist quantize`, built once at the entry point (CLI, YAML file,
jobs/quantize.py, Python API) by `QuantizeConfig.from_dict` (nbl_dist/options.py's Options: unknown keys refused
naming the nearest option, values converted to their declared types, choices and minimums checked) before any
tokenizer or weight is read. Each field carries its command-line help, from which the `quantize` flags are built.
"""

from __future__ import annotations

import dataclasses
import typing

from nbl_dist.errors import ConfigError
from nbl_dist.options import DEVICES, DTYPES, Options, option

SCHEMES = ("W4A16", "W8A8")
METHODS = ("gptq", "awq")
MAPS = ("quantize", "keep")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(Options):
    REQUIRED: typing.ClassVar[tuple[str, ...]] = ("model", "data", "out")

    model: str = option(help="the folder to quantize: an nbl-dist output (calibrated or healed) or an original "
                             "checkpoint of a supported family")
    data: str = option(help="calibration text for GPTQ/AWQ: any form calibrate reads; blocks a recorded run used "
                            "are skipped")
    out: str = option(help="the quantized output folder (a compressed-tensors checkpoint)")
    scheme: str = option("W4A16", choices=SCHEMES,
                         help="W4A16: 4-bit integer weights (symmetric, per group), 16/32-bit activations; W8A8: "
                              "8-bit integer weights (per channel) and activations (per token, dynamic)")
    method: str = option("gptq", choices=METHODS,
                         help="gptq: GPTQ's error-compensating rounding; awq: AWQ's activation-aware scales, then "
                              "round-to-nearest (a linearized layer's map is never smoothed, docs/method.md §13)")
    group_size: int | None = option(None, minimum=-1,
                                    help="W4A16: weights per scale along the input (even; -1: one scale per output "
                                         "channel); default: the largest of 128, 64, 32 that divides every "
                                         "quantized layer's input width")
    maps: str = option("quantize", choices=MAPS,
                       help="the linearized layers' maps W: quantize them like every other linear layer, or keep "
                            "them in the folder's float dtype (llm-compressor's ignore list)")
    samples: int = option(64, minimum=1, help="calibration blocks")
    seq_len: int | None = option(None, minimum=2, help="tokens per block (default: the calibration's, else 256)")
    seed: int = option(0, minimum=0, help="llm-compressor's seed (the blocks are the first unused ones)")
    reserve_eval: int = option(32, minimum=0, help="unused blocks left for `nbl-dist eval` before the "
                                                   "calibration blocks (its default --samples)")
    device: str = option("auto", choices=DEVICES, help="where llm-compressor runs (auto: a GPU when there is one, "
                                                      "else CPU); with --device cpu the scheme must be one vLLM's "
                                                      "CPU build runs")
    dtype: str = option("auto", choices=DTYPES, help="the dtype the model is loaded in for calibration (auto: "
                                                     "float32 on CPU, the checkpoint's on GPU)")
    address: str | None = option(None, help="Ray cluster to run the quantization on, as one task (default: the "
                                            "cluster of the Ray job it runs in, else this machine without Ray)")
    text_column: str = option("text", help="text column of tabular data")
    data_config: str | None = option(None, help="configuration of a hub dataset --data")
    data_split: str | None = option(None, help="split of a hub dataset or saved DatasetDict --data")
    overwrite: bool = option(False, help="replace a non-empty --out")

    def check(self) -> None:
        if self.group_size is not None:
            if self.scheme != "W4A16":
                raise ConfigError(f"--group-size is a W4A16 option; {self.scheme} quantizes each output channel "
                                  "with one scale: drop --group-size")
            if self.group_size == 0 or (self.group_size != -1 and self.group_size % 2):
                raise ConfigError(f"--group-size must be even (vLLM's 4-bit kernels pack pairs) or -1 for one "
                                  f"scale per output channel, got {self.group_size}")
        if self.dtype == "float64":
            raise ConfigError("--dtype float64: llm-compressor calibrates in float32, float16 or bfloat16; use "
                              "auto or one of those")
