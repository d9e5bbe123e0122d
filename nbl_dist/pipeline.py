"""calibrate(): plan -> stream -> reduce -> rank -> fit -> write, on either backend."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nbl_dist.checkpoint import torch_dtype, weight_map
from nbl_dist.config import CalibrationConfig
from nbl_dist.errors import CheckpointError, ConfigError, PlanError
from nbl_dist.linalg import LayerScores
from nbl_dist.linearized import atomic_replace_dir, write_linearized
from nbl_dist.plan import ShardPlan, check_memory, fmt_bytes, parse_bytes
from nbl_dist.progress import Progress
from nbl_dist.report import PLOT_NAME, plot_bounds, write_report

# Direction of each rule: the layers linearized first are those with the lowest key.
RANK_KEYS = {
    "cca": lambda s: s.cca_bound,
    "nmse": lambda s: s.nmse,
    "cosine": lambda s: -s.cosine,  # LLM-Drop: the attention whose output changes the stream least goes first
    "loss": lambda s: s.loss_increase,  # measured: the layer whose linearization costs least loss goes first
}


def select_layers(scores: list[LayerScores], rank_by: str, linearize: int | None,
                  max_bound: float | None) -> list[int]:
    """The layers to linearize: the K best by the rule, or every layer whose CCA bound is at most max_bound."""
    ranked = sorted(scores, key=RANK_KEYS[rank_by])
    if linearize is not None:
        if linearize > len(scores):
            raise ConfigError(f"--linearize {linearize} is more than the model's {len(scores)} layers")
        chosen = ranked[:linearize]
    else:
        chosen = [s for s in ranked if s.cca_bound <= max_bound]
    return sorted(s.layer for s in chosen)


def split_held_back(blocks: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics blocks, held-back blocks): the last `held` blocks never reach the statistics."""
    if held and held >= blocks.shape[0]:
        raise ConfigError(f"--score-samples {held} leaves no blocks for the statistics ({blocks.shape[0]} given)")
    n = blocks.shape[0] - held
    return blocks[:n], blocks[n:]


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
    from transformers import AutoConfig

    from nbl_dist.arch import adapter_for

    weight_map(model_dir)  # the folder exists and holds safetensors, or a clear error
    hf_config = AutoConfig.from_pretrained(model_dir)
    adapter_for(hf_config)
    return hf_config


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


def default_device_memory(cfg: CalibrationConfig, device: str) -> int | None:
    """Per-actor budget when none is given: the GPU's memory, or (local CPU runs) available RAM over the actors."""
    if cfg.device_memory is not None:
        return parse_bytes(cfg.device_memory)
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    if cfg.address is None:
        import psutil

        return psutil.virtual_memory().available // (cfg.stages * cfg.replicas)
    return None  # a remote CPU cluster: its nodes' memory is not known here


def checked_plan(cfg: CalibrationConfig, hf_config, dtype: torch.dtype, device: str, seq_len: int, log) -> ShardPlan:
    """The shard plan, checked against the memory budget before anything is loaded."""
    budget = default_device_memory(cfg, device)
    check = check_memory(hf_config, cfg.stages, budget, parse_bytes(cfg.host_memory), cfg.stats_device,
                         replicas=cfg.replicas, dtype=dtype, batch_size=cfg.batch_size, seq_len=seq_len,
                         max_inflight=cfg.max_inflight, device=device)
    log(check.plan.describe())
    log(f"  memory check: {check.message}")
    if not check.fits:
        raise PlanError(f"the plan {check.message}")
    return check.plan


def run_fingerprint(cfg: CalibrationConfig, blocks: torch.Tensor, dtype: torch.dtype) -> str:
    """Identifies what a checkpoint's statistics depend on: the model, the exact token blocks, and the options
    that change what each actor accumulates."""
    h = hashlib.sha256()
    model = Path(cfg.model)
    h.update((model / "config.json").read_bytes())
    for name, fname in sorted(weight_map(model).items()):
        h.update(f"{name}:{fname}:{(model / fname).stat().st_size};".encode())
    h.update(blocks.numpy().tobytes())
    h.update(json.dumps([list(blocks.shape), cfg.stages, cfg.replicas, cfg.batch_size, str(dtype)]).encode())
    return h.hexdigest()[:32]


def checkpoint_folder(cfg: CalibrationConfig, final: Path, fingerprint: str, log) -> tuple[Path, bool]:
    """(folder, restore): the run's checkpoint folder, and whether it holds a matching run to resume."""
    folder = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else final.parent / f".{final.name}.ckpt"
    manifest = folder / "manifest.json"
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{folder} holds a checkpoint of a different run (model, token blocks, stages, replicas, batch "
                f"size or dtype differ: {saved.get('options')}); delete it, or pass another --checkpoint-dir")
        log(f"Resuming from the checkpoint in {folder}")
        return folder, True
    if cfg.resume:
        raise CheckpointError(f"--resume: there is no checkpoint in {folder} to resume from")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "model": cfg.model, "options": {
        k: getattr(cfg, k) for k in ("data", "samples", "seq_len", "seed", "stages", "replicas", "batch_size",
                                     "dtype")}}, indent=2))
    os.replace(tmp, manifest)
    return folder, False


def make_backend(cfg: CalibrationConfig, plan: ShardPlan, dtype: torch.dtype, device: str,
                 checkpoint: tuple[Path, bool] | None = None, fingerprint: str = ""):
    if cfg.backend == "in-process":
        from nbl_dist.local import InProcessBackend

        return InProcessBackend(cfg.model, dtype, device)
    from nbl_dist.ray_backend import RayBackend

    folder, restore = checkpoint if checkpoint else (None, False)
    return RayBackend(cfg.model, plan, dtype, device=device, address=cfg.address, placement=cfg.placement,
                      cpus_per_actor=cfg.cpus_per_actor, max_inflight=cfg.max_inflight,
                      stats_device=None if plan.stages[0].stats_on_device else "cpu",
                      checkpoint_dir=str(folder) if folder else None, checkpoint_every=cfg.checkpoint_every,
                      restore=restore, fingerprint=fingerprint, max_restarts=cfg.max_restarts)


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
    t_start = time.perf_counter()
    hf_config = load_model_config(cfg.model)
    n_layers = hf_config.num_hidden_layers
    if cfg.linearize is not None and cfg.linearize > n_layers:
        raise ConfigError(f"--linearize {cfg.linearize} is more than the model's {n_layers} layers")
    seq_len = cfg.seq_len if blocks is None else int(blocks.shape[1])
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({max_pos}); lower --seq-len")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, hf_config, device)
    final, tmp = prepare_output(cfg.out, cfg.overwrite)

    if blocks is None:
        if cfg.data is None:
            raise ConfigError("no calibration data: pass --data PATH")
        from transformers import AutoTokenizer

        from nbl_dist.data import load_blocks

        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        held = cfg.score_samples if cfg.rank_by == "loss" else 0
        blocks = load_blocks(cfg.data, tokenizer, cfg.samples + held, cfg.seq_len, cfg.seed, cfg.text_column)
    blocks, score_blocks = split_held_back(blocks, cfg.score_samples if cfg.rank_by == "loss" else 0)
    t_data = time.perf_counter()

    plan = checked_plan(cfg, hf_config, dtype, device, int(blocks.shape[1]), log)
    fingerprint = run_fingerprint(cfg, blocks, dtype)
    ckpt = checkpoint_folder(cfg, final, fingerprint, log) if cfg.backend == "ray" else None
    backend = make_backend(cfg, plan, dtype, device, ckpt, fingerprint)
    try:
        log("Placement:")
        for p in backend.placement:
            log(f"  replica {p['replica']} stage {p['stage']}: layers {p['layers'][0]}-{p['layers'][1] - 1} "
                f"on node {str(p['node'])[:12]} ({p['device']})")
        t_ready = time.perf_counter()
        bar = Progress(int(blocks.numel()))

        def progress(tokens: int) -> None:
            bar(tokens)
            if on_progress:
                on_progress(tokens)

        stream_info = backend.stream(blocks, cfg.batch_size, progress)
        t_stream = time.perf_counter()
        backend.reduce()
        t_reduce = time.perf_counter()
        scores = backend.scores(cfg.ridge)
        t_rank = time.perf_counter()
        if cfg.rank_by == "loss":  # every layer is a candidate: fit all, measure each alone, keep the best
            ridges = backend.fit([s.layer for s in scores], cfg.ridge)
            losses = backend.loss_scores(score_blocks, cfg.batch_size)
            scores = [dataclasses.replace(s, loss_increase=losses[s.layer]) for s in scores]
            selected = select_layers(scores, cfg.rank_by, cfg.linearize, cfg.max_bound)
        else:
            selected = select_layers(scores, cfg.rank_by, cfg.linearize, cfg.max_bound)
            ridges = backend.fit(selected, cfg.ridge)
        t_fit = time.perf_counter()
        nbl_meta = {"rank_by": cfg.rank_by, "tokens": int(blocks.numel()), "tool": "nbl-dist"}
        write_info = write_linearized(cfg.model, tmp, selected, backend.get_fit, nbl_meta=nbl_meta)
        t_write = time.perf_counter()
        workers = backend.worker_reports()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        backend.close()

    report = {
        "model": str(cfg.model),
        "num_layers": n_layers,
        "hidden_size": hf_config.hidden_size,
        "tokens": int(blocks.numel()),
        "score_tokens": int(score_blocks.numel()),
        "selected_layers": selected,
        "rank_by": cfg.rank_by,
        "layers": [{**s.to_dict(), "selected": s.layer in selected, "fit_ridge": ridges.get(s.layer)}
                   for s in scores],
        "timings": {"data": t_data - t_start, "startup": t_ready - t_data, "stream": t_stream - t_ready,
                    "reduce": t_reduce - t_stream, "rank": t_rank - t_reduce, "fit": t_fit - t_rank,
                    "write": t_write - t_fit, "total": t_write - t_start,
                    "tokens_per_s": blocks.numel() / max(t_stream - t_ready, 1e-9), **{
                        k: v for k, v in stream_info.items() if k.endswith("_s")}},
        "recovery": {k: stream_info.get(k, 0) for k in ("restored_batches", "replayed_batches", "actor_restarts")},
        "workers": workers,
        "placement": [{k: v for k, v in p.items() if k != "keys"} for p in backend.placement],
        "plan": plan.to_dict(),
        "backend": backend.name,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "output": write_info,
        "config": dataclasses.asdict(cfg),
    }
    write_report(tmp, report)
    if cfg.plot:
        plot_bounds(report, tmp / PLOT_NAME)
    atomic_replace_dir(tmp, final)
    if ckpt is not None and not cfg.keep_checkpoint:
        shutil.rmtree(ckpt[0], ignore_errors=True)  # the run is complete: nothing left to resume
    log(f"Linearized layers {selected} (by {cfg.rank_by}); wrote {final} "
        f"({fmt_bytes(write_info['removed_bytes'] - write_info['added_bytes'])} smaller) "
        f"in {report['timings']['total']:.1f} s, {report['timings']['tokens_per_s']:,.0f} tok/s streaming")
    return report


def calibrate_api(model: str, out: str, **options) -> dict:
    """nbl_dist.calibrate(model=..., out=..., data=..., linearize=..., ...): the Python entry point."""
    blocks = options.pop("blocks", None)
    log = options.pop("log", lambda *a: print(*a, file=sys.stderr))
    on_progress = options.pop("on_progress", None)
    cfg = CalibrationConfig.from_dict({"model": str(model), "out": str(out), **options})
    return calibrate(cfg, blocks=blocks, log=log, on_progress=on_progress)
