"""The one typed path into CalibrationConfig: values converted to the declared types, unknown keys refused with
the nearest name, conflicts refused, all before the tokenizer or a weight is read; and a property test that
throws generated bad options at the command line, the YAML file and the Python API."""

import contextlib
import dataclasses
import hashlib
import io
import string
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbl_dist
from nbl_dist.calibration import pipeline
from nbl_dist.calibration.config import PLACEMENTS, CalibrationConfig
from nbl_dist.cli import main
from nbl_dist.errors import ConfigError
from nbl_dist.options import field_types, load_yaml
from tests.helpers import CORPUS

BASE = {"model": "m", "out": "o", "linearize": 1}


def build(**values):
    return CalibrationConfig.from_dict({**BASE, **values})


def test_yaml_exponents_become_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\nout: o\nridge: 1e-6\nmax-bound: 5e1\n")
    raw = load_yaml(path)
    assert raw["ridge"] == "1e-6" and raw["max_bound"] == "5e1"  # PyYAML (YAML 1.1) reads them as strings
    cfg = CalibrationConfig.from_dict(raw)
    assert type(cfg.ridge) is float and cfg.ridge == 1e-6
    assert type(cfg.max_bound) is float and cfg.max_bound == 50.0


def test_strings_of_the_declared_type_convert():
    cfg = build(samples="4", stages=" 2 ", ridge=0, overwrite="true", plot="False", model=Path("/x/m"),
                cpus_per_actor="1.5", **{"seq-len": "16"})
    assert (cfg.samples, cfg.stages, cfg.seq_len) == (4, 2, 16) and type(cfg.samples) is int
    assert type(cfg.ridge) is float and cfg.ridge == 0.0 and cfg.cpus_per_actor == 1.5
    assert cfg.overwrite is True and cfg.plot is False and cfg.model == "/x/m"
    # The constructor and dataclasses.replace convert too: no path leaves a str where a number belongs.
    assert dataclasses.replace(cfg, stages="3").stages == 3
    assert CalibrationConfig(model="m", out="o", ridge="1e-6").ridge == 1e-6


@pytest.mark.parametrize("values, message", [
    ({"linearise": 4}, "unknown option 'linearise'; did you mean 'linearize'?"),
    ({"seq_lenn": 4}, "unknown option 'seq_lenn'; did you mean 'seq_len'?"),
    ({"stages": "two"}, "option 'stages' must be a whole number"),
    ({"samples": 2.5}, "option 'samples' must be a whole number"),
    ({"linearize": True}, "option 'linearize' must be a whole number"),
    ({"ridge": "abc"}, "option 'ridge' must be a finite number"),
    ({"ridge": "nan"}, "option 'ridge' must be a finite number"),
    ({"overwrite": "yes"}, "option 'overwrite' must be true or false"),
    ({"overwrite": 1}, "option 'overwrite' must be true or false"),
    ({"data": 5}, "option 'data' must be a string"),
    ({"samples": None}, "option 'samples' needs a value"),
    ({"out": ""}, "--out is required"),
    ({"dtype": "float8"}, "unknown --dtype 'float8'"),
    ({"placement": "sideways"}, "unknown --placement 'sideways'"),
    ({"stages": 0}, "--stages must be at least 1, got 0"),
    ({"checkpoint_every": -1}, "--checkpoint-every must be 0 or more"),
    ({"ridge": -1e-3}, "--ridge must be 0 or more"),
    ({"device_memory": "lots"}, "--device-memory must be a positive size"),
    ({"max_bound": 0.5}, "--linearize and --max-bound both given"),
    ({"linearize": None}, "--linearize K or --max-bound B"),
    ({"linearize": None, "max_bound": 0.5, "rank_by": "nmse"}, "--max-bound is a threshold on the CCA bound"),
    ({"rank_by": "loss", "score_samples": 0}, "needs held-back blocks"),
    ({"backend": "in-process", "stages": 2}, "the in-process backend runs one stage"),
    ({"backend": "in-process", "resume": True}, "--resume needs the Ray backend"),
])
def test_refused_naming_the_option(values, message):
    with pytest.raises(ConfigError) as e:
        build(**values)
    assert message in str(e.value)


def test_lower_case_placement_still_accepted():
    assert build(placement="spread").placement == "spread"  # Ray upper-cases it; YAML users wrote it so


@pytest.fixture(scope="module")
def tiny(make_model_dir, tmp_path_factory):
    """(model folder, text folder) for runs that must be refused before they start."""
    texts = tmp_path_factory.mktemp("texts")
    (texts / "a.txt").write_text(" ".join(CORPUS))
    return str(make_model_dir("llama", torch.float32)), str(texts)


@pytest.mark.parametrize("bad, key", [({"linearise": 4}, "linearise"), ({"stages": "two"}, "stages"),
                                      ({"ridge": "abc"}, "ridge")])
def test_python_api_raises_config_error_before_reading(tiny, tmp_path, monkeypatch, bad, key):
    def must_not_run(*a, **k):
        raise AssertionError("the model was read before the options were checked")

    monkeypatch.setattr(pipeline, "load_model_config", must_not_run)
    monkeypatch.setattr(pipeline, "calibration_blocks", must_not_run)
    model, data = tiny
    options = {"data": data, "samples": 2, "seq_len": 16, "backend": "in-process", "linearize": 1, **bad}
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=repr(key)):
        nbl_dist.calibrate(model, tmp_path / "o", log=lambda *a: None, **options)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "o").exists()


# ---- property test: generated bad options, three ways in ----------------------------------------------------

FIELDS = {f.name: f for f in dataclasses.fields(CalibrationConfig)}
API_PARAMS = ("blocks", "log", "on_progress")  # nbl_dist.calibrate's own keywords, not options
MAX_EXAMPLES = 600
COUNTS = {"cli": 0, "yaml": 0, "api": 0}


def _parses(convert, text: str) -> bool:
    try:
        value = convert(text.strip())
    except ValueError:
        return False
    return value == value and abs(value) != float("inf")  # NaN and Inf are refused as floats


JUNK = st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                         max_size=1))
NOT_INT = st.one_of(st.text().filter(lambda s: not _parses(int, s)), st.booleans(), JUNK, st.floats())
NOT_FLOAT = st.one_of(st.text().filter(lambda s: not _parses(float, s)), st.booleans(), JUNK,
                      st.sampled_from([float("nan"), float("inf"), -float("inf")]))
NOT_BOOL = st.one_of(st.text().filter(lambda s: s.strip().lower() not in ("true", "false")), st.integers(),
                     st.floats(), JUNK)
NOT_STR = st.one_of(st.integers(), st.floats(), st.booleans(), JUNK)
NOT_SIZE = st.one_of(st.text(alphabet=string.ascii_letters),  # letters only: never a number, at best inf/nan
                     st.sampled_from(["-1GB", "0", "0GiB", "1e400GB", "12 parsecs"]))
BAD_BY_TYPE = {int: NOT_INT, float: NOT_FLOAT, bool: NOT_BOOL, str: NOT_STR}


def bad_value(name: str, channel: str) -> st.SearchStrategy:
    """Values field `name` must refuse. On the command line every value is text, so a str field has no bad type
    there; its bad values are bad choices or sizes."""
    kind = field_types(CalibrationConfig)[name][0]
    choices, low = FIELDS[name].metadata["choices"], FIELDS[name].metadata["minimum"]
    options = [] if (kind is str and channel == "cli") else [BAD_BY_TYPE[kind]]
    if choices:
        options.append(st.text().filter(lambda s: s not in choices and s.upper() not in PLACEMENTS))
    if name in ("device_memory", "host_memory"):
        options.append(NOT_SIZE)
    if low is not None:
        below = st.integers(max_value=int(low) - 1) if kind is int else st.floats(max_value=low - 1e-6,
                                                                               allow_nan=False)
        options.append(below)
    return st.one_of(options) if options else st.nothing()


def wrong_field(channel):
    names = [n for n in FIELDS if n not in ("model", "out", "data", "address", "text_column", "checkpoint_dir")
             or channel != "cli"]
    return st.sampled_from(names).flatmap(lambda n: bad_value(n, channel).map(lambda v: {n: v}))


def unknown_key(channel):
    flags = ("--help", "--config", *(f"--{n.replace('_', '-')}" for n in FIELDS), "--no-plot")
    keys = st.text(alphabet=string.ascii_lowercase + "_-", min_size=1, max_size=12).filter(
        lambda k: k.replace("-", "_") not in FIELDS and k not in API_PARAMS
        # argparse accepts an unambiguous prefix of a flag (--lin for --linearize): not unknown there
        and not any(f.startswith("--" + k) for f in flags))
    return st.builds(lambda k, v: {k: v}, keys, st.integers())


CONFLICTS = st.one_of(
    st.builds(lambda b: {"max_bound": b}, st.floats(0, 10)),  # with the base's linearize
    st.just({"linearize": None}),
    st.builds(lambda r: {"linearize": None, "max_bound": 0.5, "rank_by": r}, st.sampled_from(["nmse", "cosine"])),
    st.just({"rank_by": "loss", "score_samples": 0}),
    st.builds(lambda n: {"stages": n}, st.integers(2, 64)),  # the base runs in-process
    st.builds(lambda n: {"replicas": n}, st.integers(2, 64)),
    st.just({"resume": True}),
    st.just({"out": ""}),
)


def bad_options(channel):
    return st.one_of(wrong_field(channel), unknown_key(channel), CONFLICTS)


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def as_argv(options: dict) -> list[str]:
    """Options as a command line: --name=value (so a value such as '-h' stays a value), switches bare."""
    argv = ["calibrate"]
    for name, value in options.items():
        flag = ("--no-plot" if name == "plot" else "--" + name.replace("_", "-"))
        if name in FIELDS and field_types(CalibrationConfig)[name][0] is bool and value is True:
            argv.append(flag)
        else:
            argv.append(f"{flag}={value}")
    return argv


def run_entry(channel: str, options: dict, folder: Path) -> tuple[int, str]:
    """(exit status, stderr) of one way in; the Python API's typed error counts as status 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        if channel == "api":
            try:
                nbl_dist.calibrate(**options, log=lambda *a: None)
            except ConfigError as e:
                return 2, f"{type(e).__name__}: {e}"
            return 0, ""
        if channel == "yaml":
            (folder / "c.yaml").write_text(yaml.safe_dump(options))
            argv = ["calibrate", "--config", str(folder / "c.yaml")]
        else:
            argv = as_argv(options)
        try:
            return main(argv), err.getvalue()
        except SystemExit as e:  # argparse's usage errors
            return e.code, err.getvalue()


@pytest.fixture(scope="module")
def fuzz_dirs(tiny, tmp_path_factory):
    return tiny, tmp_path_factory.mktemp("fuzz-out"), tmp_path_factory.mktemp("fuzz-cfg")


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(["cli", "yaml", "api"]).flatmap(lambda c: st.tuples(st.just(c), bad_options(c))))
def test_generated_bad_options_are_refused_before_any_work(fuzz_dirs, case):
    (model, data), out_parent, cfg_dir = fuzz_dirs
    channel, bad = case
    before = folder_hash(Path(model))
    options = {"model": model, "data": data, "out": str(out_parent / "o"), "samples": 2, "seq_len": 16,
               "backend": "in-process", "linearize": 1, **bad}
    options = {k: v for k, v in options.items() if v is not None}  # None: the option left out
    t0 = time.perf_counter()
    code, err = run_entry(channel, options, cfg_dir)
    COUNTS[channel] += 1
    assert code == 2, (channel, bad, err)
    assert "Traceback" not in err and time.perf_counter() - t0 < 10, (channel, bad, err)
    if channel != "cli" or not err.startswith("usage:"):  # a typed error: exactly one line
        assert len(err.strip().splitlines()) == 1, (channel, bad, err)
    assert list(out_parent.iterdir()) == [], (channel, bad)  # nothing under --out, no .tmp or .ckpt beside it
    assert folder_hash(Path(model)) == before


def test_generated_case_count(fuzz_dirs):
    """The property test generated at least 100 cases, through every way in. It ran before this one (file order);
    when this test runs alone it runs the property test first, so the count is never taken over nothing."""
    if not sum(COUNTS.values()):
        test_generated_bad_options_are_refused_before_any_work(fuzz_dirs)
    print(f"\nhypothesis cases: {sum(COUNTS.values())} of max_examples={MAX_EXAMPLES}, per way in: {COUNTS}")
    assert sum(COUNTS.values()) >= 100 and all(COUNTS[c] > 0 for c in ("cli", "yaml", "api")), COUNTS
