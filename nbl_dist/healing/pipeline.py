"""heal(): check the inputs, plan, choose the blocks, train on Ray Train, write the healed folder.

Every refusal comes before any weight is read (config.json files, safetensors headers, one small tensor of each
folder, the tokenizers and the data): a folder that is not an nbl-dist output, a baseline of another architecture
or tokenizer than the folder was linearized from, too little text once the recorded blocks are excluded, a plan
that does not fit a worker. docs/method.md §12.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nbl_dist.artifact.folder import ModelFolder
from nbl_dist.errors import CheckpointError, ConfigError
from nbl_dist.healing.config import DEFAULT_TOKENS, HealConfig

# config.json fields that must agree between the folder and its baseline: the shapes every kept tensor has.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "tie_word_embeddings")


def check_model_folder(model_dir: str) -> ModelFolder:
    """The folder, if it is an nbl-dist output with linearized layers; else CheckpointError."""
    folder = ModelFolder.open(model_dir, "--model")
    if not folder.is_linearized:
        raise CheckpointError(f"--model {model_dir!r} is not an nbl-dist output with linearized layers (its "
                              "config.json has no nbl_<family> model_type and nbl.linearized_layers): pass the "
                              "folder `nbl-dist calibrate` wrote (its --out); the original goes to --baseline")
    return folder


def check_baseline(model: ModelFolder, baseline_dir: Path):
    """The baseline's transformers config, if it is the checkpoint the folder was linearized from: same family and
    shapes, every kept tensor present with the same shape and dtype, the same final norm and first embedding rows,
    and the same tokenizer. Headers and a few KiB of tensors are read, no weights."""
    from transformers import AutoTokenizer

    from nbl_dist.data.blocks import tokenizer_fingerprint
    from nbl_dist.model.safetensors_io import tensor_specs
    from nbl_dist.model.validate import check_checkpoint

    if not baseline_dir.is_dir():
        raise CheckpointError(f"--baseline {str(baseline_dir)!r} does not exist or is not a folder")
    hf = check_checkpoint(baseline_dir, flag="--baseline")
    raw, adapter = model.config, model.adapter
    mismatch = [f"{k} {raw.get(k)} vs {getattr(hf, k, None)}" for k in SHAPE_FIELDS
                if raw.get(k) != getattr(hf, k, None)]
    if hf.model_type != adapter.model_type or mismatch:
        raise CheckpointError(f"--baseline {str(baseline_dir)!r} is a {hf.model_type} model that differs from the "
                              f"{adapter.model_type} model --model was linearized from "
                              f"({'; '.join(mismatch) or 'another family'}): pass the original checkpoint")
    mine, theirs = tensor_specs(model.path), tensor_specs(baseline_dir)
    maps = {k for keys in model.map_keys().values() for k in keys}
    differ = [k for k, spec in mine.items() if k not in maps and theirs.get(k) != spec]
    if not differ:
        differ = [k for k in (adapter.final_norm_key, adapter.embed_key)
                  if not torch.equal(first_rows(model.path, k), first_rows(baseline_dir, k))]
    if differ:
        raise CheckpointError(f"--baseline {str(baseline_dir)!r} is not the checkpoint --model was linearized from: "
                              f"{differ[0]} differs ({len(differ)} tensor(s) in all); pass the original checkpoint")
    if tokenizer_fingerprint(AutoTokenizer.from_pretrained(model.path)) != \
            tokenizer_fingerprint(AutoTokenizer.from_pretrained(baseline_dir)):
        raise CheckpointError(f"--baseline {str(baseline_dir)!r} has another tokenizer than --model: the KL "
                              "divergence compares next-token distributions over the same vocabulary; pass the "
                              "original checkpoint the folder was linearized from")
    return hf


def first_rows(model_dir: Path, key: str, rows: int = 2) -> torch.Tensor:
    """The first rows of a tensor, read alone from its safetensors file (a few KiB whatever the model's size)."""
    from safetensors import safe_open

    from nbl_dist.model.safetensors_io import weight_map

    with safe_open(str(model_dir / weight_map(model_dir)[key]), framework="pt") as f:
        return f.get_slice(key)[:rows]


def budget_steps(cfg: HealConfig, seq_len: int) -> int:
    """Optimizer steps: --steps, or --tokens (default DEFAULT_TOKENS) in whole global batches."""
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.tokens or DEFAULT_TOKENS) / (cfg.batch_size * seq_len)))


def run_fingerprint(model_dir: Path, baseline_dir: Path, record: dict, cfg: HealConfig, steps: int,
                    seq_len: int) -> str:
    """What the result depends on (folders, blocks, every training option but the workers, which a resumed run may
    change): a run started again with the same fingerprint resumes from its last checkpoint."""
    h = hashlib.sha256()
    for folder in (model_dir, baseline_dir):
        h.update((folder / "config.json").read_bytes())
    options = {k: getattr(cfg, k) for k in ("loss", "lr", "schedule", "warmup", "weight_decay", "batch_size",
                                            "lora_rank", "lora_alpha", "seed", "dtype", "eval_every")}
    h.update(json.dumps([record, options, steps, seq_len], sort_keys=True, default=str).encode())
    return h.hexdigest()


def heal(cfg: HealConfig, log: Callable[..., None] | None = None) -> dict:
    """Heal cfg.model toward cfg.baseline and write cfg.out. Returns the report (nbl_heal_report.json)."""
    from transformers import AutoTokenizer

    from nbl_dist.artifact.publish import check_out
    from nbl_dist.data.sources import DataSource
    from nbl_dist.errors import PlanError
    from nbl_dist.healing.blocks import heal_blocks
    from nbl_dist.healing.loop import LoopConfig, heal_loop
    from nbl_dist.healing.plan import heal_plan
    from nbl_dist.healing.writer import MAPS_NAME, REPORT_NAME, write_healed
    from nbl_dist.runtime.cluster import RayCluster, closed_on_error, run_name
    from nbl_dist.runtime.resources import memory_budget, resolve_device, resolve_dtype
    from nbl_dist.runtime.shared import check_shared
    from nbl_dist.training import ray_train

    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    model = check_model_folder(cfg.model)
    baseline_dir = Path(cfg.baseline)
    hf = check_baseline(model, baseline_dir)
    out = check_out(cfg.out, cfg.overwrite)
    layers = model.linearized_layers
    records = model.data_records
    seq_len = cfg.seq_len or (records[0]["seq_len"] if records else 256)
    if seq_len > getattr(hf, "max_position_embeddings", seq_len):
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({hf.max_position_embeddings})")
    steps = budget_steps(cfg, seq_len)
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    data = DataSource(cfg.data, cfg.text_column, cfg.data_config, cfg.data_split)
    blocks = heal_blocks(data, tokenizer, seq_len, records, cfg.reserve_eval, cfg.kl_samples, steps * cfg.batch_size)
    record = blocks.record(data, tokenizer, seq_len, cfg.seed)
    storage = ray_train.storage_folder(out, cfg.storage, "heal")
    cluster = RayCluster(cfg.address, dashboard=True)
    with closed_on_error(cluster):
        device = resolve_device(cfg.device, cluster, cfg.workers)
        gpu = device == "cuda"
        cpus = cfg.cpus_per_worker or cluster.cpus_per_actor(cfg.workers, gpu=gpu)
        budget = memory_budget(cfg.device_memory, device, cluster, cfg.workers, cpus)
        dtype = resolve_dtype(cfg.dtype, hf, device)
        plan = heal_plan(hf, layers, torch.empty((), dtype=dtype).element_size(), cfg.batch_size // cfg.workers,
                         seq_len, cfg.lora_rank, budget.bytes, budget.source, cfg.workers, cfg.shard_weights)
        log(f"healing layers {layers} of {cfg.model} toward {cfg.baseline}: {steps} steps of {cfg.batch_size} x "
            f"{seq_len} tokens ({steps * cfg.batch_size * seq_len:,} tokens), loss {cfg.loss}, "
            f"{'LoRA rank %d' % cfg.lora_rank if cfg.lora_rank else 'W and b'}, {cfg.workers} worker(s) on {device}"
            f"{', frozen layers sharded over them (FSDP2)' if plan.sharded else ''}")
        log(f"  {plan.describe()}")
        if not plan.fits:
            raise PlanError(plan.refusal())
        log(f"  blocks of --data: {len(blocks.train_indices)} to train, {len(blocks.kl_indices)} for the held-out "
            f"KL, {len(blocks.reserved_indices)} left for `nbl-dist eval`; {blocks.excluded} skipped (used by the "
            "calibration)")
        check_shared(cluster, cluster.worker_nodes(cpus, 1 if gpu else 0), str(storage),
                     {"model folder": str(model.path.resolve()), "baseline folder": str(baseline_dir.resolve())},
                     fix="Put --model, --baseline and --storage (by default beside --out) on a filesystem that the "
                         "driver's node and every worker's node mount at the same path (NFS, a cluster "
                         "filesystem), or pass a --storage there")
        name = run_name("heal", out, run_fingerprint(model.path, baseline_dir, record, cfg, steps, seq_len))
        loop = LoopConfig(
            baseline=str(baseline_dir.resolve()), model=str(model.path.resolve()), layers=layers,
            map_keys=list(model.map_keys().values()),
            dtype=str(dtype).removeprefix("torch."), loss=cfg.loss, lr=cfg.lr, weight_decay=cfg.weight_decay,
            schedule=cfg.schedule, warmup_steps=round(cfg.warmup * steps), steps=steps, batch_size=cfg.batch_size,
            seq_len=seq_len, eval_every=cfg.eval_every or max(1, steps // 10), checkpoint_every=cfg.checkpoint_every,
            lora_rank=cfg.lora_rank, lora_alpha=cfg.alpha, seed=cfg.seed, threads=None if gpu else int(max(1, cpus)),
            shard_weights=plan.sharded,
            blocks=cluster.ray.put({"train": blocks.train, "kl": blocks.kl}))
        result, train_s = ray_train.run(heal_loop, loop, log=log, storage=storage, name=name, workers=cfg.workers,
                                        use_gpu=gpu, cpus_per_worker=cpus, max_failures=cfg.max_failures)
    cluster.close()
    with ray_train.final_checkpoint(result) as folder:
        history = ray_train.saved_history(folder)
        before, after = history["heldout"][0], history["heldout"][-1]
        tokens = steps * cfg.batch_size * seq_len
        healing = {"baseline": str(baseline_dir), "loss": cfg.loss, "lr": cfg.lr, "schedule": cfg.schedule,
                   "warmup_steps": loop.warmup_steps, "steps": steps, "tokens": tokens, "batch_size": cfg.batch_size,
                   "seq_len": seq_len, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.alpha,
                   "weight_decay": cfg.weight_decay, "heldout_kl_before": before["kl"],
                   "heldout_kl_after": after["kl"], "data": record}
        report = {"model": str(model.path), "out": str(out), "layers": layers, **healing, "workers": cfg.workers,
                  "device": device, "dtype": loop.dtype, "curve": history, "run": name,
                  "timings": {"train_s": train_s, "tokens_per_s": tokens / train_s,
                              "total_s": time.perf_counter() - t0}, "plan": plan.__dict__}
        write_healed(model, out, folder / MAPS_NAME, healing, report)
    ray_train.clear_run(storage, name)
    log(f"healed: held-out KL from the original {before['kl']:.4f} -> {after['kl']:.4f} nats/token, cross-entropy "
        f"{before['ce']:.4f} -> {after['ce']:.4f}; wrote {out} ({REPORT_NAME}) in {time.perf_counter() - t0:.0f} s")
    return report


def heal_api(model: str, baseline: str, data: str, out: str, *, log: Callable[..., None] | None = None,
             **options) -> dict:
    """nbl_dist.heal(model=..., baseline=..., data=..., out=..., steps=...): the Python entry point; options by
    their field names, converted and checked like the command line's. Returns the report."""
    cfg = HealConfig.from_dict({"model": model, "baseline": baseline, "data": data, "out": out, **options})
    return heal(cfg, log=log)
