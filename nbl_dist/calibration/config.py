"""Frozen, typed calibration config: built once at the entry point (CLI, YAML file, job, Python API), validated,
then unpacked into explicit arguments. Library functions below the pipeline never receive it whole.

The one way in is `CalibrationConfig.from_dict`: unknown keys are refused naming the nearest option, every value
is converted to its field's declared type (`__post_init__`), and `validate()` refuses bad ranges, choices and
conflicting options, all before the tokenizer or any weight is read. Each field also carries its command-line
help and choices (options.option), from which `cli.add_config_options` builds the flags of `calibrate` and `plan`.
"""

from __future__ import annotations

import dataclasses
import typing

from nbl_dist.core.selection import MEASURED_RULES, RANK_RULES, SET_RULES
from nbl_dist.errors import ConfigError
from nbl_dist.options import DEVICES, DTYPES, Options, check_memory_sizes, option

BACKENDS = ("ray", "in-process")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
STATS_DEVICES = ("auto", "device", "cpu")
STATS_PRECISIONS = ("auto", "fp32", "bf16x3", "bf16")  # core.stats.PRECISIONS and auto
REQUIRED = ("model", "out")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig(Options):
    REQUIRED: typing.ClassVar[tuple[str, ...]] = REQUIRED
    model: str = option(help="Hugging Face checkpoint folder (safetensors)")
    out: str | None = option(None, help="output folder (linearized checkpoint + report)")
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
        check_memory_sizes(self, ("device_memory", "host_memory"))
        check_conflicts(self)


@dataclasses.dataclass(frozen=True)
class PlanConfig(CalibrationConfig):
    """`nbl-dist plan`'s options: calibrate's own, one declaration, but only --model is required (the plan reads the
    config alone: no --out, no --data), and --linearize / --max-bound only count the fits in the time estimate
    (neither: every layer's)."""

    REQUIRED: typing.ClassVar[tuple[str, ...]] = ("model",)

    def check(self) -> None:
        check_memory_sizes(self, ("device_memory", "host_memory"))
        check_conflicts(self, count_required=False)


def check_conflicts(cfg: CalibrationConfig, count_required: bool = True) -> None:
    """Options that are each valid but not together (and, unless count_required is off, --linearize K or
    --max-bound B, one of which says how many layers)."""
    def bad(msg):
        raise ConfigError(msg)

    if count_required and cfg.linearize is None and cfg.max_bound is None:
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


