"""calibrate(): plan -> stream -> reduce -> rank -> fit -> write, on either backend.

The entry point unpacks the frozen config into explicit arguments for the library below it; the phases talk to
the backend through the contract in backend.py and are timed by one PhaseTimer, from which report.py assembles
nbl_report.json.
"""

from __future__ import annotations

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
from nbl_dist.errors import ConfigError, PlanError
from nbl_dist.linearized import atomic_replace_dir, write_linearized
from nbl_dist.plan import ShardPlan, check_memory, fmt_bytes, parse_bytes
from nbl_dist.progress import PhaseTimer, Progress
from nbl_dist.ray_cluster import cluster_address
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
    select_layers,
    set_size,
    split_held_back,
)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu or auto")
    return device


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


def calibration_blocks(cfg: CalibrationConfig, blocks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics blocks, held-back blocks) of token ids: read from cfg.data unless given."""
    held = held_back_count(cfg.rank_by, cfg.score_samples)
    if blocks is None:
        if cfg.data is None:
            raise ConfigError("no calibration data: pass --data PATH")
        from transformers import AutoTokenizer

        from nbl_dist.data import load_blocks

        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        blocks = load_blocks(cfg.data, tokenizer, cfg.samples + held, cfg.seq_len, cfg.seed, cfg.text_column)
    return split_held_back(blocks, held)


def default_device_memory(device_memory: str | None, device: str, local: bool, actors: int) -> int | None:
    """Per-actor budget when none is given: the GPU's memory, or (local CPU runs) available RAM over the actors."""
    if device_memory is not None:
        return parse_bytes(device_memory)
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    if local:
        import psutil

        return psutil.virtual_memory().available // actors
    return None  # a remote CPU cluster: its nodes' memory is not known here


def checked_plan(cfg: CalibrationConfig, hf_config, dtype: torch.dtype, device: str, seq_len: int, log) -> ShardPlan:
    """The shard plan, checked against the memory budget before anything is loaded."""
    local = cfg.backend == "in-process" or cluster_address(cfg.address)[0] is None
    budget = default_device_memory(cfg.device_memory, device, local, cfg.stages * cfg.replicas)
    check = check_memory(hf_config, cfg.stages, budget, parse_bytes(cfg.host_memory), cfg.stats_device,
                         replicas=cfg.replicas, dtype=dtype, batch_size=cfg.batch_size, seq_len=seq_len,
                         max_inflight=cfg.max_inflight, device=device)
    log(check.plan.describe())
    log(f"  memory check: {check.message}")
    if not check.fits:
        raise PlanError(f"the plan {check.message}")
    return check.plan


def snapshot_folder(cfg: CalibrationConfig, fingerprint: str, log) -> tuple[Path, bool]:
    """(folder, restore): the run's snapshot folder, and whether it holds a matching run to resume."""
    folder = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else resume.default_folder(cfg.out)
    record = {"model": cfg.model, "options": {k: getattr(cfg, k) for k in (
        "data", "samples", "seq_len", "seed", "stages", "replicas", "batch_size", "dtype")}}
    return folder, resume.open_folder(folder, fingerprint, cfg.resume, record, log)


def make_backend(cfg: CalibrationConfig, plan: ShardPlan, dtype: torch.dtype, device: str,
                 snapshots: tuple[Path, bool] | None = None, fingerprint: str = "") -> Backend:
    if cfg.backend == "in-process":
        from nbl_dist.local import InProcessBackend

        return InProcessBackend(cfg.model, dtype, device)
    from nbl_dist.ray_backend import RayBackend

    folder, restore = snapshots if snapshots else (None, False)
    return RayBackend(cfg.model, plan, dtype, device=device, address=cfg.address, placement=cfg.placement,
                      cpus_per_actor=cfg.cpus_per_actor, max_inflight=cfg.max_inflight,
                      stats_device=None if plan.stages[0].stats_on_device else "cpu",
                      checkpoint_dir=str(folder) if folder else None, checkpoint_every=cfg.checkpoint_every,
                      restore=restore, fingerprint=fingerprint, max_restarts=cfg.max_restarts)


def progress_callback(total: int, also: Callable[[int], None] | None) -> Callable[[int], None]:
    """The progress line, and the caller's own callback if any, for every finished micro-batch."""
    bar = Progress(total)

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
        measure = lambda sets: backend.set_losses(sets, score_blocks, batch_size)  # noqa: E731
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
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, hf_config, device)
    final, tmp = prepare_output(cfg.out, cfg.overwrite)
    blocks, score_blocks = calibration_blocks(cfg, blocks)
    timer.mark("data")
    plan = checked_plan(cfg, hf_config, dtype, device, int(blocks.shape[1]), log)
    fingerprint = resume.run_fingerprint(cfg.model, blocks, cfg.stages, cfg.replicas, cfg.batch_size, dtype)
    snapshots = snapshot_folder(cfg, fingerprint, log) if cfg.backend == "ray" else None
    backend = make_backend(cfg, plan, dtype, device, snapshots, fingerprint)
    try:
        log_placement(backend.placement, log)
        timer.mark("startup")
        stream = backend.stream(blocks, cfg.batch_size, progress_callback(int(blocks.numel()), on_progress))
        timer.mark("stream")
        backend.reduce()
        timer.mark("reduce")
        selection = rank_and_fit(backend, score_blocks, cfg.rank_by, cfg.linearize, cfg.max_bound, cfg.ridge,
                                 cfg.batch_size, timer, cfg.shortlist)
        nbl_meta = {"rank_by": cfg.rank_by, "tokens": int(blocks.numel()), "tool": "nbl-dist"}
        output = write_linearized(cfg.model, tmp, selection.selected, backend.get_fit, nbl_meta=nbl_meta)
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
                          config=dataclasses.asdict(cfg))
    publish(report, tmp, final, cfg.plot, snapshots[0] if snapshots and not cfg.keep_checkpoint else None)
    if recovery["actor_restarts"]:
        log(f"Recovered from {recovery['actor_restarts']} actor deaths {recovery['restarts_by_phase']}; waited "
            f"{recovery['restart_wait_s']:.1f} s for the recreated actors to load (and to be placed)")
    log(f"Linearized layers {selection.selected} (by {cfg.rank_by}); wrote {final} "
        f"({fmt_bytes(output['removed_bytes'] - output['added_bytes'])} smaller) "
        f"in {report['timings']['total']:.1f} s, {report['timings']['tokens_per_s']:,.0f} tok/s streaming")
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
