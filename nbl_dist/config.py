"""Frozen, typed calibration config: built once at the entry point (CLI, job, Python API), validated, then
unpacked into explicit arguments. Library functions below the pipeline never receive it whole."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from nbl_dist.errors import ConfigError, PlanError
from nbl_dist.selection import MEASURED_RULES, RANK_RULES

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("ray", "in-process")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    model: str
    out: str
    data: str | None = None
    samples: int = 128
    seq_len: int = 2048
    linearize: int | None = None
    max_bound: float | None = None
    rank_by: str = "cca"
    stages: int = 1
    replicas: int = 1
    batch_size: int = 1
    max_inflight: int = 2
    dtype: str = "auto"
    device: str = "auto"
    seed: int | None = None
    address: str | None = None
    text_column: str = "text"
    ridge: float | None = None
    backend: str = "ray"
    placement: str = "PACK"
    cpus_per_actor: float | None = None
    overwrite: bool = False
    plot: bool = True
    device_memory: str | None = None  # per actor, e.g. "80GiB"; default: the GPU's, or host RAM / actors
    host_memory: str | None = None  # per actor, for statistics kept on the host
    stats_device: str = "auto"  # auto | device | cpu
    checkpoint_dir: str | None = None  # default: .<out>.ckpt beside --out (the output folder stays atomic)
    checkpoint_every: int = 20  # micro-batches between an actor's checkpoints (0: only at the end)
    resume: bool = False  # require a checkpoint to resume from (a matching one is used anyway)
    keep_checkpoint: bool = False  # keep the finished statistics: re-rank or re-select later without a pass
    max_restarts: int = 3
    score_samples: int = 8  # held-back blocks (not used for statistics) scored by the loss rule

    def validate(self) -> "CalibrationConfig":
        def bad(msg):
            raise ConfigError(msg)

        if self.dtype not in DTYPES:
            bad(f"unknown --dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            bad(f"unknown --device {self.device!r}; use one of {', '.join(DEVICES)}")
        if self.rank_by not in RANK_RULES:
            bad(f"unknown --rank-by {self.rank_by!r}; use one of {', '.join(RANK_RULES)}")
        if self.rank_by in MEASURED_RULES and self.score_samples < 1:
            bad(f"--rank-by {self.rank_by} needs held-back blocks: --score-samples must be at least 1")
        if self.backend not in BACKENDS:
            bad(f"unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.placement.upper() not in PLACEMENTS:
            bad(f"unknown --placement {self.placement!r}; use one of {', '.join(PLACEMENTS)}")
        for name in ("samples", "seq_len", "stages", "replicas", "batch_size", "max_inflight"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.linearize is None and self.max_bound is None:
            bad("say how many layers to linearize: --linearize K or --max-bound B")
        if self.linearize is not None and self.linearize < 0:
            bad(f"--linearize must be 0 or more, got {self.linearize}")
        if self.max_bound is not None and self.rank_by != "cca":
            bad("--max-bound is a threshold on the CCA bound: use it with --rank-by cca, or use --linearize K")
        if self.stats_device not in ("auto", "device", "cpu"):
            bad(f"unknown --stats-device {self.stats_device!r}; use auto, device or cpu")
        if self.backend == "in-process" and (self.stages, self.replicas) != (1, 1):
            bad("the in-process backend runs one stage and one replica; use the Ray backend for more")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "CalibrationConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**values)


def parse_bytes(text: str | int | None) -> int | None:
    """A memory size: '80GiB', '1.5GB', '512MiB', '1e9' or a number of bytes.

    Args:
        text: the size as written, a number of bytes, or None.
    Returns:
        The size in bytes (None for None).
    Raises:
        PlanError: the text is not a size.
    """
    if text is None or isinstance(text, int):
        return text
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9,
             "tb": 1e12, "b": 1}
    t = str(text).strip().lower().replace(" ", "")
    unit = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), None)
    try:
        number = float(t[: -len(unit)] if unit else t) * (units[unit] if unit else 1)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise PlanError(f"cannot read the memory size {text!r}; write it like 80GiB, 24GB or 512MiB")
    return int(number)


def load_yaml(path: str | Path) -> dict:
    """Options from a YAML file; keys are the command-line names with '-' or '_'."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}
