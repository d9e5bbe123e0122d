"""calibrate(): plan -> stream -> reduce -> rank -> fit -> write, on either backend.

The entry point unpacks the frozen config into explicit arguments for the library below it; the phases talk to
the backend through the contract in calibration/backend.py and are timed by one PhaseTimer, from which report.py
assembles nbl_report.json.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from nbl_dist.artifact.publish import check_out, publish, staging_dir, staging_for
from nbl_dist.artifact.write import write_linearized
from nbl_dist.calibration import resume
from nbl_dist.calibration.backend import Backend, Placement
from nbl_dist.calibration.config import CalibrationConfig, PlanConfig
from nbl_dist.calibration.plan import ShardPlan, check_memory
from nbl_dist.calibration.plan import time_estimate as plan_time_estimate
from nbl_dist.calibration.report import (
    PLOT_NAME,
    Selection,
    build_report,
    plot_bounds,
    write_report,
)
from nbl_dist.calibration.throughput import TimeEstimate
from nbl_dist.core.selection import (
    MEASURED_RULES,
    SET_RULES,
    choose_set,
    fits_needed,
    held_back_count,
    measured_work,
    select_layers,
    set_size,
    split_held_back,
)
from nbl_dist.core.stats import resolve_precision
from nbl_dist.errors import ConfigError, PlanError
from nbl_dist.runtime.cluster import RayCluster, closed_on_error, run_name
from nbl_dist.runtime.progress import PhaseTimer, RunProgress
from nbl_dist.runtime.resources import (
    DeviceBudget,
    fmt_bytes,
    memory_budget,
    parse_bytes,
    resolve_device,
    resolve_dtype,
)


def open_cluster(backend: str, address: str | None) -> RayCluster | None:
    """The Ray cluster the actors will run on, joined (or started) before anything is loaded, so that their
    device and memory are resolved there; None for the in-process backend."""
    return RayCluster(address) if backend == "ray" else None


def load_model_config(model_dir: str):
    """The model's config, after the whole checkpoint is checked from its headers (model/validate.py): a damaged or
    unsuitable --model fails here, in seconds, before the data is read or any actor starts."""
    from nbl_dist.model.validate import check_checkpoint

    return check_checkpoint(model_dir)


def check_against_model(hf_config, linearize: int | None, seq_len: int) -> None:
    """Options that only the model's config can refuse: more layers than it has, a longer context."""
    n_layers = hf_config.num_hidden_layers
    if linearize is not None and linearize > n_layers:
        raise ConfigError(f"--linearize {linearize} is more than the model's {n_layers} layers")
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({max_pos}); lower --seq-len")


def calibration_blocks(cfg: CalibrationConfig,
                       blocks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """(statistics blocks, held-back blocks, data record) of token ids: read from cfg.data unless given. The record
    says which blocks of --data's block stream each are (data.ledger.calibration_record); None for blocks given in
    memory."""
    held = held_back_count(cfg.rank_by, cfg.score_samples)
    record = None
    if blocks is None:
        if cfg.data is None:
            raise ConfigError("no calibration data: pass --data PATH")
        from transformers import AutoTokenizer

        from nbl_dist.data.blocks import choose_blocks
        from nbl_dist.data.ledger import calibration_record
        from nbl_dist.data.sources import DataSource

        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        source = DataSource(cfg.data, cfg.text_column, cfg.data_config, cfg.data_split)
        chosen = choose_blocks(source, tokenizer, cfg.samples + held, cfg.seq_len, cfg.seed)
        blocks = chosen.blocks
        record = calibration_record(source, tokenizer, cfg.seq_len, cfg.seed, chosen.indices, held)
    return (*split_held_back(blocks, held), record)


def checked_plan(cfg: CalibrationConfig, hf_config, dtype: torch.dtype, device: str, seq_len: int,
                 budget: DeviceBudget, log, stats_precision: str = "fp32") -> ShardPlan:
    """The shard plan, checked against the memory budget before anything is loaded."""
    check = check_memory(hf_config, cfg.stages, budget.bytes, parse_bytes(cfg.host_memory), cfg.stats_device,
                         replicas=cfg.replicas, dtype=dtype, batch_size=cfg.batch_size, seq_len=seq_len,
                         max_inflight=cfg.max_inflight, device=device, stats_precision=stats_precision)
    log(check.plan.describe())
    log(f"  memory check: {check.message} (budget: {budget.source})")
    if not check.fits:
        raise PlanError(f"the plan {check.message}")
    return check.plan


def time_estimate(cfg: CalibrationConfig, hf_config, plan: ShardPlan, precision: str,
                  tokens: int, score_tokens: int, seq_len: int, log) -> TimeEstimate | None:
    """The plan's estimate of the compute phases' wall time, from --device-tflops or from rates measured here
    (--measure); None when neither is asked for."""
    fitted, passes = cfg.linearize, None
    if cfg.rank_by in MEASURED_RULES:  # the rule's own count of fits and held-back forwards, not the loss rule's
        fitted, passes = measured_work(cfg.rank_by, cfg.linearize, cfg.shortlist, hf_config.num_hidden_layers)
    estimate = plan_time_estimate(
        hf_config, plan, tokens, seq_len, cfg.batch_size, precision, device_tflops=cfg.device_tflops,
        measure=cfg.measure, actors_here=plan.num_actors, fitted_layers=fitted,
        score_tokens=score_tokens if passes else 0, score_passes=passes)
    if estimate is not None:
        log(estimate.describe())
    return estimate


def model_config(path: str):
    """A model's transformers config from its folder or from a config.json file alone (`nbl-dist plan`)."""
    import json

    from transformers import AutoConfig

    from nbl_dist.model.arch import adapter_for

    p = Path(path)
    if p.is_file():
        raw = json.loads(p.read_text())
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    else:
        config = AutoConfig.from_pretrained(p)
    adapter_for(config)  # a clear error for an unsupported family
    return config


def plan_only(cfg: PlanConfig, log=print) -> bool:
    """`nbl-dist plan`: the shard plan, its memory check and (with --device-tflops or --measure) the time estimate
    of a calibration with these options, from the model's config alone (nothing loaded, no cluster joined).
    --device auto plans for this machine (its GPU, else its CPUs); --device cuda plans for GPU actors from anywhere.
    The budget is --device-memory, else on CPUs the available RAM over the actors (memory_budget), else unchecked.
    Returns whether the plan fits."""
    from nbl_dist.runtime.resources import resolve_local_device

    hf_config = model_config(cfg.model)
    device = resolve_local_device(cfg.device) if cfg.device != "cuda" else "cuda"
    dtype = resolve_dtype(cfg.dtype, hf_config, device)
    precision = resolve_precision(cfg.stats_precision, device, dtype)
    actors = cfg.stages * cfg.replicas
    budget = memory_budget(cfg.device_memory, device, None, actors) \
        if cfg.device_memory is not None or device == "cpu" else DeviceBudget(None, "pass --device-memory to check")
    check = check_memory(hf_config, cfg.stages, budget.bytes, parse_bytes(cfg.host_memory), cfg.stats_device,
                         replicas=cfg.replicas, dtype=dtype, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                         max_inflight=cfg.max_inflight, device=device, stats_precision=precision)
    log(check.plan.describe())
    log(f"  {cfg.samples} x {cfg.seq_len} tokens in micro-batches of {cfg.batch_size}; "
        f"{check.plan.total_params:,} parameters")
    log(f"  memory check: {check.message} (budget: {budget.source})")
    held = held_back_count(cfg.rank_by, cfg.score_samples)
    estimate = time_estimate(cfg, hf_config, check.plan, precision, cfg.samples * cfg.seq_len, held * cfg.seq_len,
                             cfg.seq_len, log)
    if estimate is None:
        log("  time estimate: pass --device-tflops T or --measure for one")
    return check.fits


def estimate_vs_measured(estimate: TimeEstimate | None, timings: dict) -> dict | None:
    """The report's record of the estimate: each estimated phase's seconds, measured seconds and their ratio."""
    if estimate is None:
        return None
    measured = {k: timings.get("fit" if k == "loss_scoring" else k) for k in estimate.phases}
    return {**estimate.to_dict(), "measured": measured,
            "measured_over_estimate": {k: measured[k] / v for k, v in estimate.phases.items() if measured[k] and v}}


def snapshot_folder(cfg: CalibrationConfig, fingerprint: str, log) -> tuple[Path, bool]:
    """(folder, restore): the run's snapshot folder, and whether it holds a matching run to resume."""
    folder = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else resume.default_folder(cfg.out)
    record = {"model": cfg.model, "options": {k: getattr(cfg, k) for k in (
        "data", "samples", "seq_len", "seed", "stages", "replicas", "batch_size", "dtype", "stats_precision")}}
    return folder, resume.open_folder(folder, fingerprint, cfg.resume, record, log)


def make_backend(cfg: CalibrationConfig, plan: ShardPlan, dtype: torch.dtype, device: str,
                 snapshots: tuple[Path, bool] | None = None, fingerprint: str = "",
                 cluster: RayCluster | None = None, stats_precision: str = "fp32") -> Backend:
    if cfg.backend == "in-process":
        from nbl_dist.calibration.local import InProcessBackend

        return InProcessBackend(cfg.model, dtype, device, stats_precision=stats_precision)
    from nbl_dist.calibration.ray.backend import RayBackend

    folder, restore = snapshots if snapshots else (None, False)
    return RayBackend(cfg.model, plan, dtype, device=device, address=cfg.address, placement=cfg.placement,
                      cpus_per_actor=cfg.cpus_per_actor, max_inflight=cfg.max_inflight,
                      stats_device=None if plan.stages[0].stats_on_device else "cpu",
                      checkpoint_dir=str(folder.absolute()) if folder else None,  # the same path on every node
                      checkpoint_every=cfg.checkpoint_every, restore=restore, fingerprint=fingerprint,
                      max_restarts=cfg.max_restarts, run_name=run_name("nbl", cfg.out, fingerprint), cluster=cluster,
                      stats_precision=stats_precision)


def progress_callback(progress: RunProgress, total: int,
                      also: Callable[[int], None] | None) -> Callable[[int], None]:
    """The streaming progress line, and the caller's own callback if any, for every finished micro-batch."""
    bar = progress.phase("streaming", total, "tokens")

    def progress(tokens: int) -> None:
        bar(tokens)
        if also:
            also(tokens)
    return progress


def log_placement(placement: list[Placement], log) -> None:
    log("Placement:")
    for p in placement:
        log(f"  replica {p.replica} stage {p.stage}: layers {p.layers[0]}-{p.layers[1] - 1} "
            f"on node {str(p.node)[:12]} ({p.device})")


def rank_and_fit(backend: Backend, score_blocks: torch.Tensor, rank_by: str, linearize: int | None,
                 max_bound: float | None, ridge: float | None, batch_size: int, timer: PhaseTimer,
                 shortlist: int = 8) -> Selection:
    """Score every layer, choose the layers, fit them. The loss rule fits every layer first and measures each
    alone on the held-back blocks; a set rule (auto, greedy) fits the layers it may choose and measures whole
    sets (selection.choose_set); a statistic rule fits only the chosen ones."""
    scores = backend.scores(ridge)
    timer.mark("rank")
    candidates = []
    if rank_by in SET_RULES:
        k = set_size(scores, linearize, max_bound)
        ridges = backend.fit(fits_needed(scores, rank_by, k, shortlist), ridge) if k else {}
        measure = lambda sets: backend.measure_sets(sets, score_blocks, batch_size)  # noqa: E731
        selected, candidates = choose_set(scores, rank_by, k, shortlist, measure)
    elif rank_by in MEASURED_RULES:
        ridges = backend.fit([s.layer for s in scores], ridge)
        losses = backend.loss_scores(score_blocks, batch_size)
        scores = [dataclasses.replace(s, loss_increase=losses[s.layer]) for s in scores]
        selected = select_layers(scores, rank_by, linearize, max_bound)
    else:
        selected = select_layers(scores, rank_by, linearize, max_bound)
        ridges = backend.fit(selected, ridge)
    timer.mark("fit")
    return Selection(rank_by, scores, selected, ridges, candidates)


def calibrate(cfg: CalibrationConfig, blocks: torch.Tensor | None = None, log=print,
              on_progress: Callable[[int], None] | None = None) -> dict:
    """Run the whole calibration described by cfg and write cfg.out. Returns the report.

    Args:
        cfg: the validated config.
        blocks: (N, T) token ids to use instead of reading cfg.data (tests, notebooks).
        log: where progress text goes.
        on_progress: called with the token count of every finished micro-batch (a UI, a test's interrupt).
    """
    cfg.validate()
    timer = PhaseTimer()
    hf_config = load_model_config(cfg.model)
    check_against_model(hf_config, cfg.linearize, cfg.seq_len if blocks is None else int(blocks.shape[1]))
    final = check_out(cfg.out, cfg.overwrite)
    cluster = open_cluster(cfg.backend, cfg.address)
    with closed_on_error(cluster):
        device = resolve_device(cfg.device, cluster, cfg.stages * cfg.replicas)
        budget = memory_budget(cfg.device_memory, device, cluster, cfg.stages * cfg.replicas, cfg.cpus_per_actor)
        dtype = resolve_dtype(cfg.dtype, hf_config, device)  # the actors' device decides "auto"
        timer.mark("startup")
        blocks, score_blocks, data_record = calibration_blocks(cfg, blocks)
        timer.mark("data")
        precision = resolve_precision(cfg.stats_precision, device, dtype)
        plan = checked_plan(cfg, hf_config, dtype, device, int(blocks.shape[1]), budget, log, precision)
        estimate = time_estimate(cfg, hf_config, plan, precision, int(blocks.numel()), int(score_blocks.numel()),
                                 int(blocks.shape[1]), log)
        fingerprint = resume.run_fingerprint(cfg.model, blocks, cfg.stages, cfg.replicas, cfg.batch_size, dtype,
                                             precision)
        snapshots = snapshot_folder(cfg, fingerprint, log) if cfg.backend == "ray" else None
        backend = make_backend(cfg, plan, dtype, device, snapshots, fingerprint, cluster, precision)
    try:
        log_placement(backend.placement, log)
        timer.mark("startup")
        stream = backend.stream(blocks, cfg.batch_size,
                                progress_callback(backend.progress, int(blocks.numel()), on_progress))
        timer.mark("stream")
        backend.reduce()
        timer.mark("reduce")
        selection = rank_and_fit(backend, score_blocks, cfg.rank_by, cfg.linearize, cfg.max_bound, cfg.ridge,
                                 cfg.batch_size, timer, cfg.shortlist)
        nbl_meta = {"rank_by": cfg.rank_by, "tokens": int(blocks.numel()), "tool": "nbl-dist", "data": data_record}
        staging = staging_for(final)
        output = write_linearized(cfg.model, staging, selection.selected, backend.get_fit, nbl_meta=nbl_meta,
                                  progress=lambda total: backend.progress.phase("writing", total, "bytes"))
        timer.mark("write")
        workers = backend.worker_reports()
        recovery = {**stream.recovery(), **backend.recovery()}
    except BaseException:
        shutil.rmtree(staging_dir(final), ignore_errors=True)
        raise
    finally:
        backend.close()
    report = build_report(model=str(cfg.model), hf_config=hf_config, tokens=int(blocks.numel()),
                          score_tokens=int(score_blocks.numel()), selection=selection, timer=timer, stream=stream,
                          recovery=recovery,
                          workers=workers, placement=backend.placement, plan=plan, backend=backend.name,
                          dtype=str(dtype).removeprefix("torch."), device=device, output=output,
                          config=dataclasses.asdict(cfg), data=data_record)
    report.update(stats_precision=precision, time_estimate=estimate_vs_measured(estimate, report["timings"]))
    finish(report, staging, final, cfg.plot, snapshots[0] if snapshots and not cfg.keep_checkpoint else None)
    if recovery["actor_restarts"]:
        log(f"Recovered from {recovery['actor_restarts']} actor deaths {recovery['restarts_by_phase']}; waited "
            f"{recovery['restart_wait_s']:.1f} s for the recreated actors to load (and to be placed)")
    log(f"Linearized layers {selection.selected} (by {cfg.rank_by}); wrote {final} "
        f"({fmt_bytes(output['removed_bytes'] - output['added_bytes'])} smaller) "
        f"in {report['timings']['total']:.1f} s, {report['timings']['tokens_per_s']:,.0f} tok/s streaming")
    if estimate is not None:
        log(f"  streaming took {report['timings']['stream']:.1f} s; the plan estimated "
            f"{estimate.phases['stream']:.1f} s")
    return report


def finish(report: dict, staging: Path, final: Path, plot: bool, drop_snapshots: Path | None) -> None:
    """Report and plot into the finished staging folder, then publish it; the snapshots of a complete run are
    removed (nothing is left to resume) unless kept."""
    write_report(staging, report)
    if plot:
        plot_bounds(report, staging / PLOT_NAME)
    publish(staging, final)
    if drop_snapshots is not None:
        shutil.rmtree(drop_snapshots, ignore_errors=True)


def calibrate_api(model: str | os.PathLike, out: str | os.PathLike, *, blocks: torch.Tensor | None = None,
                  log: Callable[..., None] | None = None, on_progress: Callable[[int], None] | None = None,
                  **options) -> dict:
    """nbl_dist.calibrate(model=..., out=..., data=..., linearize=..., ...): the Python entry point.

    Args:
        model: the checkpoint folder (--model).
        out: the output folder (--out).
        blocks: (N, T) token ids to use instead of reading `data`.
        log: where progress text goes (default: stderr).
        on_progress: called with the token count of every finished micro-batch.
        **options: any other calibrate option by its field name (seq_len=..., rank_by=...); a string of the
            declared type ("4", "1e-6") is converted, like a YAML value.
    Returns:
        The report (nbl_report.json as a dict).
    Raises:
        ConfigError: an unknown, mistyped, out-of-range or conflicting option, before anything is read.
        NBLError: any other expected failure (model folder, data, memory plan, cluster), as its typed subclass.
    """
    cfg = CalibrationConfig.from_dict({"model": model, "out": out, **options})
    log = log if log is not None else (lambda *a: print(*a, file=sys.stderr))
    return calibrate(cfg, blocks=blocks, log=log, on_progress=on_progress)
