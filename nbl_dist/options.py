"""What every workflow's options share: a frozen, typed config class (`Options`) whose fields carry their
command-line definition (`option`), the one builder every entry point goes through (`Options.from_dict`: the CLI,
a YAML file, a Ray job, the Python API), the conversion of every value to its declared type, the checks of
choices, minimums and memory sizes, and the YAML reader. Each workflow declares its own config class over it
(calibration.config.CalibrationConfig, healing.config.HealConfig, ...); the library below an entry point never
receives a config whole. It imports neither torch nor Ray itself (importing it still runs nbl_dist/__init__.py,
which imports torch and transformers to register the model classes).
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
from nbl_dist.runtime.resources import parse_bytes

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
DEVICES = ("auto", "cpu", "cuda")


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
    """What every frozen option config shares (CalibrationConfig, HealConfig, ...): values converted to their
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


def flag(name: str) -> str:
    """The command-line flag of a field: seq_len -> --seq-len."""
    return "--" + name.replace("_", "-")


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Field name -> (scalar type, whether None is allowed), read from the dataclass annotations of `cls`
   ."""
    hints = typing.get_type_hints(cls)
    types = {}
    for name, hint in hints.items():
        if typing.get_origin(hint) is typing.ClassVar:
            continue
        args = typing.get_args(hint)  # (int, NoneType) for `int | None`; () for a plain type
        scalars = [a for a in args if a is not type(None)] or [hint]
        types[name] = (scalars[0], type(None) in args)
    return types


def check_known(values: Mapping[str, typing.Any], cls: type) -> None:
    """Refuse keys that are not options of `cls`, naming the nearest option (a typo
    must not be silently ignored)."""
    names = [f.name for f in dataclasses.fields(cls)]
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


def coerce(name: str, value: typing.Any, cls: type) -> typing.Any:
    """`value` converted to the declared type of field `name`.

    Args:
        name: a field of `cls`.
        value: the value as given: of the declared type, or a string of it (command line, YAML).
        cls: the config class.
    Returns:
        The value of the declared type (None where the field allows it).
    Raises:
        ConfigError: the value cannot be read as that type; the message names the option and an example.
    """
    kind, optional = field_types(cls)[name]
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


def example(name: str, kind: type, cls: type) -> str:
    """A valid value to show in a message: the field's default where it has one, else one of its type."""
    default = (cls).__dataclass_fields__[name].default
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


def check_memory_sizes(cfg: Options, names: tuple[str, ...]) -> None:
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


def load_yaml(path: str | Path) -> dict:
    """Options from a YAML file; keys are the command-line names with '-' or '_'.

    Args:
        path: the --config file.
    Returns:
        option name (with '_') -> value as YAML read it (converted later by the config's from_dict).
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
