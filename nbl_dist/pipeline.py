"""calibrate(): plan -> stream -> reduce -> rank -> fit -> write, on either backend.

The entry point unpacks the frozen config into explicit arguments for the library below it; the phases talk to
the backend through the contract in backend.py and are timed by one PhaseTimer, from which report.py assembles
nbl_report.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from nbl_dist import resume
from nbl_dist.backend import Backend, Placement
from nbl_dist.config import CalibrationConfig
from nbl_dist.devices import DeviceBudget, gpu_budget, resolve_actor_device, resolve_local_device
from nbl_dist.errors import ConfigError, PlanError
from nbl_dist.linearized import atomic_replace_dir, write_linearized
from nbl_dist.plan import ShardPlan, check_memory, fmt_bytes, parse_bytes
from nbl_dist.plan import time_estimate as plan_time_estimate
from nbl_dist.progress import PhaseTimer, RunProgress
from nbl_dist.ray_cluster import RayCluster, cluster_address
from nbl_dist.report import (
    PLOT_NAME,
    Selection,
    build_report,
    plot_bounds,
    write_report,
)
from nbl_dist.safetensors_io import torch_dtype
from nbl_dist.selection import (
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
from nbl_dist.stats import resolve_precision
from nbl_dist.throughput import TimeEstimate


GPU_PROBE_TIMEOUT_S = 60.0  # for the memory probe on each GPU node


def open_cluster(backend: str, address: str | None) -> RayCluster | None:
    """The Ray cluster the actors will run on, joined (or started) before anything is loaded, so that their
    device and memory are resolved there; None for the in-process backend."""
    return RayCluster(address) if backend == "ray" else None


@contextlib.contextmanager
def closed_on_error(cluster: RayCluster | None):
    """Leave the cluster as it was (a Ray started here shut down) when set-up fails before a backend owns it."""
    try:
        yield
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise


def resolve_device(device: str, cluster: RayCluster | None, actors: int) -> str:
    """--device for the actors, from the cluster's resources (the driver's own CUDA is never asked), or for
    this process when there is no cluster (the in-process backend)."""
    if cluster is None:
        return resolve_local_device(device)
    return resolve_actor_device(device, cluster.gpus(), actors)


def resolve_dtype(dtype: str, hf_config, device: str) -> torch.dtype:
    """auto: the checkpoint's dtype on GPU; float32 on CPU (CPU bf16 matmuls are slow and gain nothing here)."""
    if dtype != "auto":
        return torch_dtype(dtype)
    if device == "cpu":
        return torch.float32
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return torch_dtype(str(stored).removeprefix("torch.")) if stored else torch.bfloat16


def load_model_config(model_dir: str):
    """The model's config, after the whole checkpoint is checked from its headers (validate.py): a damaged or
    unsuitable --model fails here, in seconds, before the data is read or any actor starts."""
    from nbl_dist.validate import check_checkpoint

    return check_checkpoint(model_dir)


def check_against_model(hf_config, linearize: int | None, seq_len: int) -> None:
    """Options that only the model's config can refuse: more layers than it has, a longer context."""
    n_layers = hf_config.num_hidden_layers
    if linearize is not None and linearize > n_layers:
        raise ConfigError(f"--linearize {linearize} is more than the model's {n_layers} layers")
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({max_pos}); lower --seq-len")


def prepare_output(out: str, overwrite: bool) -> tuple[Path, Path]:
    """(final folder, temporary sibling to write into): the output appears complete or not at all."""
    final = Path(out)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out!r} exists and is not empty; pass --overwrite or another --out")
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    return final, tmp


def calibration_blocks(cfg: CalibrationConfig,
                       blocks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """(statistics blocks, held-back blocks, data record) of token ids: read from cfg.data unless given. The record
    says which blocks of --data's block stream each are (data.block_record); None for blocks given in memory."""
    held = held_back_count(cfg.rank_by, cfg.score_samples)
    record = None
    if blocks is None:
        if cfg.data is None:
            raise ConfigError("no calibration data: pass --data PATH")
        from transformers import AutoTokenizer

        from nbl_dist.data import DataSource, block_record, choose_blocks

        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        source = DataSource(cfg.data, cfg.text_column, cfg.data_config, cfg.data_split)
        chosen = choose_blocks(source, tokenizer, cfg.samples + held, cfg.seq_len, cfg.seed)
        blocks = chosen.blocks
        record = block_record(source, tokenizer, cfg.seq_len, cfg.seed, chosen.indices, held)
    return (*split_held_back(blocks, held), record)


def device_budget(cfg: CalibrationConfig, device: str, cluster: RayCluster | None) -> DeviceBudget:
    """Memory per actor's device, before any weights are read: --device-memory when given; else, on GPUs, the
    smallest GPU that a probe on each GPU node reports (in-process: this process's GPU); on CPUs, the available
    RAM over the actors (a run on this machine) or each node's memory over the actors it can hold (a joined
    cluster, from Ray's resources). A GPU budget that cannot be read is refused, naming --device-memory."""
    actors = cfg.stages * cfg.replicas
    if cfg.device_memory is not None:
        return DeviceBudget(parse_bytes(cfg.device_memory), "--device-memory")
    if device == "cuda" and cluster is None:
        return DeviceBudget(torch.cuda.get_device_properties(0).total_memory, "this process's GPU")
    if device == "cuda":
        return gpu_budget(cluster.probe_gpus(GPU_PROBE_TIMEOUT_S), GPU_PROBE_TIMEOUT_S)
    if cluster is None or cluster_address(cfg.address)[0] is None:
        import psutil

        return DeviceBudget(psutil.virtual_memory().available // actors, f"available RAM over {actors} actor(s)")
    return DeviceBudget(cluster.memory_per_actor(actors, cfg.cpus_per_actor),
                        "the smallest node's memory (Ray's resources) over the actors it can hold")


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


def run_name(out: str, fingerprint: str) -> str:
    """Names the run's placement group and actors on the cluster: the output folder's name and the run's
    fingerprint (two runs into one folder on the same data share it, and Ray refuses the second)."""
    return f"nbl-{Path(out).name}-{fingerprint[:8]}"


def make_backend(cfg: CalibrationConfig, plan: ShardPlan, dtype: torch.dtype, device: str,
                 snapshots: tuple[Path, bool] | None = None, fingerprint: str = "",
                 cluster: RayCluster | None = None, stats_precision: str = "fp32") -> Backend:
    if cfg.backend == "in-process":
        from nbl_dist.local import InProcessBackend

        return InProcessBackend(cfg.model, dtype, device, stats_precision=stats_precision)
    from nbl_dist.ray_backend import RayBackend

    folder, restore = snapshots if snapshots else (None, False)
    return RayBackend(cfg.model, plan, dtype, device=device, address=cfg.address, placement=cfg.placement,
                      cpus_per_actor=cfg.cpus_per_actor, max_inflight=cfg.max_inflight,
                      stats_device=None if plan.stages[0].stats_on_device else "cpu",
                      checkpoint_dir=str(folder.absolute()) if folder else None,  # the same path on every node
                      checkpoint_every=cfg.checkpoint_every, restore=restore, fingerprint=fingerprint,
                      max_restarts=cfg.max_restarts, run_name=run_name(cfg.out, fingerprint), cluster=cluster,
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
    final, tmp = prepare_output(cfg.out, cfg.overwrite)
    cluster = open_cluster(cfg.backend, cfg.address)
    with closed_on_error(cluster):
        device = resolve_device(cfg.device, cluster, cfg.stages * cfg.replicas)
        budget = device_budget(cfg, device, cluster)
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
        output = write_linearized(cfg.model, tmp, selection.selected, backend.get_fit, nbl_meta=nbl_meta,
                                  progress=lambda total: backend.progress.phase("writing", total, "bytes"))
        timer.mark("write")
        workers = backend.worker_reports()
        recovery = {**stream.recovery(), **backend.recovery()}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    publish(report, tmp, final, cfg.plot, snapshots[0] if snapshots and not cfg.keep_checkpoint else None)
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


def publish(report: dict, tmp: Path, final: Path, plot: bool, drop_snapshots: Path | None) -> None:
    """Report and plot into the finished temporary folder, then move it into place; the snapshots of a complete
    run are removed (nothing is left to resume) unless kept."""
    write_report(tmp, report)
    if plot:
        plot_bounds(report, tmp / PLOT_NAME)
    atomic_replace_dir(tmp, final)
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
