"""Frozen, typed calibration config: built once at the entry point (CLI, YAML file, job, Python API), validated,
then unpacked into explicit arguments. Library functions below the pipeline never receive it whole.

The one way in is `CalibrationConfig.from_dict`: unknown keys are refused naming the nearest option, every value
is converted to its field's declared type (`__post_init__`), and `validate()` refuses bad ranges, choices and
conflicting options, all before the tokenizer or any weight is read. Each field also carries its command-line
help and choices (`dataclasses.field(metadata=...)`), from which `cli.add_calibrate_options` builds the flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
import typing
from collections.abc import Mapping
from pathlib import Path

from nbl_dist.errors import ConfigError, PlanError
from nbl_dist.selection import MEASURED_RULES, RANK_RULES, SET_RULES

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("ray", "in-process")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
STATS_DEVICES = ("auto", "device", "cpu")
STATS_PRECISIONS = ("auto", "fp32", "bf16x3", "bf16")  # stats.PRECISIONS and auto (config stays torch-free)
REQUIRED = ("model", "out")


def option(default=dataclasses.MISSING, *, help: str, choices: tuple[str, ...] | None = None,
           minimum: float | None = None, group: str | None = None) -> typing.Any:
    """A config field carrying its command-line definition.

    Args:
        default: the field's default (none: the option is required).
        help: the --help text of the flag; "(default X)" is appended from `default` by the CLI.
        choices: the accepted values (checked by validate(), and by argparse on the command line).
        minimum: the smallest accepted value of a number.
        group: options sharing a group are mutually exclusive on the command line.
    Returns:
        A dataclasses.field with that metadata.
    """
    meta = {"help": help, "choices": choices, "minimum": minimum, "group": group}
    return dataclasses.field(default=default, metadata=meta)


class Options:
    """What every frozen option config shares (CalibrationConfig, healing's HealConfig): values converted to their
    declared types on construction, choices and minimums checked by `validate`, and `from_dict`, the one builder
    the CLI, a YAML file, a job and the Python API go through. A subclass is a frozen dataclass of `option` fields,
    names its required options in REQUIRED and its own cross-option checks in `check`."""

    REQUIRED: typing.ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        # Every way of building a config (from_dict, the constructor, dataclasses.replace) converts each value to
        # its declared type here, so a YAML string such as "1e-6" never reaches the library as a str.
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name), type(self)))

    def validate(self):
        """Refuse out-of-range values, unknown choices and conflicting options (ConfigError naming the fix).

        Returns:
            self, so that `Config.from_dict(values).validate()` reads as one expression.
        """
        check_choices(self)
        check_minimums(self)
        self.check()
        return self

    def check(self) -> None:
        """The subclass's checks of options that are each valid but not together."""

    @classmethod
    def from_dict(cls, values: Mapping[str, typing.Any]):
        """The one builder of a config, shared by the CLI, the YAML file, the job and the Python API.

        Args:
            values: option name (`seq_len` or `seq-len`) -> value, of the declared type or a string of it
                ("4", "1e-6", "true"); the options left out take their defaults.
        Returns:
            The converted, validated config.
        Raises:
            ConfigError: an unknown or missing option, a value of the wrong type, out of range, or in conflict
                with another; the message names the option and the fix.
        """
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        check_known(values, cls)
        for name in cls.REQUIRED:
            if values.get(name) in (None, ""):
                raise ConfigError(f"--{name} is required (on the command line, in the --config file, or as "
                                  f"{name}=... in Python)")
        return cls(**values).validate()


@dataclasses.dataclass(frozen=True)
class CalibrationConfig(Options):
    REQUIRED: typing.ClassVar[tuple[str, ...]] = REQUIRED
    model: str = option(help="Hugging Face checkpoint folder (safetensors)")
    out: str = option(help="output folder (linearized checkpoint + report)")
    data: str | None = option(None, help="calibration text: .txt/.jsonl/.jsonl.gz/.json/.csv/.parquet file or "
                                         "folder, a save_to_disk folder, or a hub dataset name")
    samples: int = option(128, minimum=1, help="number of token blocks")
    seq_len: int = option(2048, minimum=1, help="tokens per block")
    linearize: int | None = option(None, minimum=0, group="how_many",
                                   help="number of attention layers to linearize")
    max_bound: float | None = option(None, minimum=0, group="how_many",
                                     help="linearize every layer whose CCA bound is at most this")
    rank_by: str = option("auto", choices=RANK_RULES,
                          help="layer ranking rule; auto measures the K-sets of cca, nmse and cosine together on "
                               "--score-samples held-back blocks and keeps the one closest to the original (lowest KL "
                               "divergence)")
    stages: int = option(1, minimum=1, help="pipeline stages: actors per replica")
    replicas: int = option(1, minimum=1, help="data-parallel pipeline replicas")
    batch_size: int = option(1, minimum=1, help="blocks per micro-batch")
    max_inflight: int = option(2, minimum=1, help="micro-batches in flight per replica")
    dtype: str = option("auto", choices=DTYPES, help="forward dtype")
    device: str = option("auto", choices=DEVICES, help="the actors' forward device (auto: one GPU per actor when "
                                                        "the cluster has GPUs, else CPU)")
    seed: int | None = option(None, minimum=0, help="random choice of blocks with this seed (default: the first N)")
    address: str | None = option(None, help="Ray cluster to join (default: the cluster of the Ray job it runs in, "
                                 "else a local Ray started in this process)")
    text_column: str = option("text", help="text column of tabular data (.jsonl/.json/.csv/.parquet, datasets)")
    data_config: str | None = option(None, help="configuration of a hub dataset --data")
    data_split: str | None = option(None, help="split of a hub dataset or saved DatasetDict --data (default: its "
                                               "only split)")
    ridge: float | None = option(None, minimum=0,
                                 help="ridge lambda, relative to mean(diag(C)) (default: only if needed)")
    backend: str = option("ray", choices=BACKENDS, help="ray or in-process")
    placement: str = option("PACK", choices=PLACEMENTS, help="placement-group strategy")
    cpus_per_actor: float | None = option(None, minimum=0, help="CPUs reserved per actor")
    overwrite: bool = option(False, help="replace a non-empty --out")
    plot: bool = option(True, help="skip the PNG plot")  # a True default: the flag is --no-plot
    device_memory: str | None = option(None, help="memory budget per actor, e.g. 80GiB (default: the smallest GPU "
                                                  "a probe finds on the GPU nodes, or RAM / actors on CPU)")
    host_memory: str | None = option(None, help="host RAM per actor for statistics kept on the host, e.g. 256GiB")
    stats_device: str = option("auto", choices=STATS_DEVICES,
                               help="where statistics live: the actor's device, host memory, or auto")
    stats_precision: str = option("auto", choices=STATS_PRECISIONS,
                                  help="precision of the statistics' Gram products (float64 sums either way): "
                                       "fp32, bf16x3 (three bf16 GEMMs), bf16, or auto (per device, see "
                                       "benchmarks/RESULTS.md)")
    device_tflops: float | None = option(None, minimum=0, group="rates",
                                         help="dense TFLOP/s of one actor's device in the forward dtype: the plan "
                                              "then estimates each phase's wall time")
    measure: bool = option(False, group="rates", help="estimate each phase's wall time from rates measured here "
                                                      "with one micro-batch through one layer (CPU actors)")
    # The output folder stays atomic: checkpoints go to a sibling folder by default.
    checkpoint_dir: str | None = option(None, help="where actors checkpoint statistics "
                                                   "(default: .OUT.ckpt beside --out)")
    checkpoint_every: int = option(20, minimum=0, help="micro-batches between checkpoints; 0: only at the end")
    resume: bool = option(False, help="resume from the checkpoint (rerunning the same command resumes anyway)")
    keep_checkpoint: bool = option(False, help="keep the finished statistics, so a later run with another "
                                               "--rank-by or --linearize (same model, data, stages, replicas, "
                                               "batch size, dtype) skips the streaming pass")
    max_restarts: int = option(3, minimum=0, help="actor deaths survived before giving up")
    score_samples: int = option(8, minimum=0, help="held-back blocks, not used for statistics, scored by "
                                                   "--rank-by auto, greedy and loss")
    shortlist: int = option(8, minimum=1, help="--rank-by greedy: the layers it chooses among, the best of cca, "
                                               "nmse and cosine in turn (at least K)")

    def check(self) -> None:
        check_memory_sizes(self)
        check_conflicts(self)


def flag(name: str) -> str:
    """The command-line flag of a field: seq_len -> --seq-len."""
    return "--" + name.replace("_", "-")


@functools.cache
def field_types(cls: type | None = None) -> dict[str, tuple[type, bool]]:
    """Field name -> (scalar type, whether None is allowed), read from the dataclass annotations of `cls`
    (default CalibrationConfig)."""
    hints = typing.get_type_hints(cls or CalibrationConfig)
    types = {}
    for name, hint in hints.items():
        if typing.get_origin(hint) is typing.ClassVar:
            continue
        args = typing.get_args(hint)  # (int, NoneType) for `int | None`; () for a plain type
        scalars = [a for a in args if a is not type(None)] or [hint]
        types[name] = (scalars[0], type(None) in args)
    return types


def check_known(values: Mapping[str, typing.Any], cls: type | None = None) -> None:
    """Refuse keys that are not options of `cls` (default CalibrationConfig), naming the nearest option (a typo
    must not be silently ignored)."""
    names = [f.name for f in dataclasses.fields(cls or CalibrationConfig)]
    problems = []
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the options are {', '.join(names)}"
            problems.append(f"unknown option {key!r}; {hint}")
    if problems:
        raise ConfigError("; ".join(problems))


EXAMPLES = {int: "4", float: "0.5", bool: "true", str: "'text'"}
KINDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "a string"}


def coerce(name: str, value: typing.Any, cls: type | None = None) -> typing.Any:
    """`value` converted to the declared type of field `name`.

    Args:
        name: a field of `cls` (default CalibrationConfig).
        value: the value as given: of the declared type, or a string of it (command line, YAML).
        cls: the config class.
    Returns:
        The value of the declared type (None where the field allows it).
    Raises:
        ConfigError: the value cannot be read as that type; the message names the option and an example.
    """
    kind, optional = field_types(cls or CalibrationConfig)[name]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option {name!r} needs a value ({KINDS[kind]}), or leave it out for the default")
    converted = CONVERTERS[kind](value)
    if converted is None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        wanted = KINDS[kind] if kind is bool else f"{KINDS[kind]} like {example(name, kind, cls)}"
        raise ConfigError(f"option {name!r} must be {wanted}, got {shown} ({type(value).__name__})")
    return converted


def example(name: str, kind: type, cls: type | None = None) -> str:
    """A valid value to show in a message: the field's default where it has one, else one of its type."""
    default = (cls or CalibrationConfig).__dataclass_fields__[name].default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return str(default)
    return EXAMPLES[kind]


def _to_int(value) -> int | None:
    if isinstance(value, bool):  # True is an int to Python, never a count to a user
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _to_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            return None
    elif isinstance(value, str):  # PyYAML reads 1e-6 (no dot) as a string
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _to_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None  # not 1/0, "yes", "on": a count or a typo should not switch an option


def _to_str(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):  # the Python API is given pathlib.Path folders
        path = os.fspath(value)
        return path if isinstance(path, str) else None
    return None


CONVERTERS = {int: _to_int, float: _to_float, bool: _to_bool, str: _to_str}


def check_choices(cfg: Options) -> None:
    """Every option with choices holds one of them (the placement in any case: Ray upper-cases it)."""
    for f in dataclasses.fields(cfg):
        choices = f.metadata["choices"]
        value = getattr(cfg, f.name)
        if choices and (value.upper() if f.name == "placement" else value) not in choices:
            raise ConfigError(f"unknown {flag(f.name)} {value!r}; use one of {', '.join(choices)}")


def check_minimums(cfg: Options) -> None:
    """Counts and sizes at least their field's minimum (0 or 1)."""
    for f in dataclasses.fields(cfg):
        low, value = f.metadata["minimum"], getattr(cfg, f.name)
        if low is not None and value is not None and value < low:
            bound = "0 or more" if low == 0 else f"at least {low}"
            raise ConfigError(f"{flag(f.name)} must be {bound}, got {value}")


def check_memory_sizes(cfg: Options, names: tuple[str, ...] = ("device_memory", "host_memory")) -> None:
    """Memory sizes (--device-memory, --host-memory) are read now, not when the plan is made after the data."""
    for name in names:
        text = getattr(cfg, name)
        if text is None:
            continue
        try:
            size = parse_bytes(text)
        except PlanError:  # re-raised below naming the option, which parse_bytes does not know
            size = 0
        if size <= 0:
            raise ConfigError(f"{flag(name)} must be a positive size like 80GiB, 24GB or 512MiB, got {text!r}")


def check_conflicts(cfg: CalibrationConfig) -> None:
    """Options that are each valid but not together."""
    def bad(msg):
        raise ConfigError(msg)

    if cfg.linearize is None and cfg.max_bound is None:
        bad("say how many layers to linearize: --linearize K or --max-bound B")
    if cfg.linearize is not None and cfg.max_bound is not None:
        bad("--linearize and --max-bound both given; keep one: --linearize K (the K best layers) or "
            "--max-bound B (every layer whose CCA bound is at most B)")
    if cfg.max_bound is not None and cfg.rank_by not in ("cca", *SET_RULES):
        bad("--max-bound is a threshold on the CCA bound: use it with --rank-by cca (or auto, greedy: the bound "
            "then says how many layers), or use --linearize K")
    if cfg.rank_by in MEASURED_RULES and cfg.score_samples < 1:
        bad(f"--rank-by {cfg.rank_by} needs held-back blocks: --score-samples must be at least 1")
    if cfg.backend == "in-process" and (cfg.stages, cfg.replicas) != (1, 1):
        bad("the in-process backend runs one stage and one replica; use the Ray backend for more")
    if cfg.device_tflops is not None and cfg.measure:
        bad("--device-tflops and --measure both given; keep one: the rate you know, or one measured here")
    if cfg.backend == "in-process" and cfg.resume:
        bad("--resume needs the Ray backend (the in-process backend keeps no checkpoints); drop --resume")


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
    """Options from a YAML file; keys are the command-line names with '-' or '_'.

    Args:
        path: the --config file.
    Returns:
        option name (with '_') -> value as YAML read it (converted later by CalibrationConfig.from_dict).
    Raises:
        ConfigError: the file is missing, unreadable, not YAML, not a mapping, or names an option twice.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist or is not a file; check the --config path")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}; check the file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{str(path)!r} is not valid YAML{where}: {problem}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of option: value")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in values:
            raise ConfigError(f"{str(path)!r} sets option {name!r} twice (as '-' and '_' spellings); keep one")
        values[name] = value
    return values
