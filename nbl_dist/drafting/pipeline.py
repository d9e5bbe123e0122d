"""draft(): check the inputs, choose the prompts, let the target continue them, train the draft on Ray Train, write
the draft folder (docs/method.md §14).

Every refusal comes before any weight is read (config.json files, safetensors headers, the tokenizer and the
data): a target vLLM cannot tap or nbl-dist cannot load, an --init draft of another width, vocabulary or tokenizer
or with taps the target does not have, aux layers out of range, too little text once the recorded blocks are
skipped. The continuations are generated once per run and kept beside its checkpoints, so a run started again
after a stop neither generates them again nor trains from the start.

`nbl-dist draft` needs speculators (the draft's format) and, for the continuations, vLLM: `run_draft` checks what
it can in the interpreter the user typed the command in and runs `draft` where speculators is installed
(runtime/environments.py: this process, $NBL_DRAFT_PYTHON, or the repository's .venv-vllm).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nbl_dist.drafting.checks import (
    REPORT_NAME,
    Target,
    check_aux_layers,
    check_draft_fits,
    check_target,
    check_tokenizer,
    draft_records,
    read_draft,
)
from nbl_dist.drafting.config import DEFAULT_DRAFT_VOCAB, DraftConfig, aux_layer_list
from nbl_dist.errors import ConfigError
from nbl_dist.runtime.environments import Engine

ENGINE = Engine(name="draft", modules=("speculators",), venv=".venv-vllm", install="make venv-vllm")
# The options a run's result depends on (with the target, the --init draft, the data record and the budget): a run
# started again with the same ones resumes. Not the workers, which a resumed run may change.
FINGERPRINT_OPTIONS = ("prompt_len", "continuation", "draft_vocab", "aux_layers", "speculative_tokens", "ttt_steps",
                       "epochs", "batch_size", "lr", "schedule", "warmup", "heldout_samples", "eval_every", "generator",
                       "seed", "dtype", "draft_dtype")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the checks decided, before any weight is read."""

    target: Target
    aux_layers: list[int]
    init: dict | None  # the --init draft's config.json
    draft_vocab: int


def plan_draft(cfg: DraftConfig) -> Plan:
    """The checks that need neither speculators nor a tensor: the target, the --init draft against it, the taps,
    the draft vocabulary's size and the sequence length against the target's context."""
    target = check_target(cfg.target)
    init = read_draft(cfg.init) if cfg.init else None
    if init is not None:
        aux = check_draft_fits(init, target)
        if cfg.aux_layers is not None and aux_layer_list(cfg.aux_layers) != aux:
            raise ConfigError(f"--aux-layers {cfg.aux_layers} differs from the --init draft's taps {aux}: a refit "
                              "keeps the draft's taps (drop --aux-layers, or train a new draft without --init)")
        size = int(init["draft_vocab_size"])
        if cfg.draft_vocab is not None and cfg.draft_vocab != size:
            raise ConfigError(f"--draft-vocab {cfg.draft_vocab} differs from the --init draft's {size}: a refit keeps "
                              "the draft's vocabulary (drop --draft-vocab, or train a new draft without --init)")
    else:
        ids = aux_layer_list(cfg.aux_layers) if cfg.aux_layers else target.default_aux_layers()
        aux = check_aux_layers(ids, target.layers, "--aux-layers")
        size = min(cfg.draft_vocab or DEFAULT_DRAFT_VOCAB, target.vocab)
        if cfg.draft_vocab is not None and cfg.draft_vocab > target.vocab:
            raise ConfigError(f"--draft-vocab {cfg.draft_vocab} exceeds the target's vocabulary ({target.vocab})")
    context = target.folder.config.get("max_position_embeddings")
    if context and cfg.seq_len > context:
        raise ConfigError(f"--prompt-len {cfg.prompt_len} + --continuation {cfg.continuation} exceeds the target's "
                          f"context ({context})")
    return Plan(target=target, aux_layers=aux, init=init, draft_vocab=size)


def run_draft(cfg: DraftConfig, log: Callable[[str], None] | None = None) -> dict:
    """`nbl-dist draft`: `draft(cfg)` in this process when it has speculators, else the same in the interpreter that
    has it, after the checks that need neither. Returns the report (nbl_draft.json)."""
    from nbl_dist.artifact.publish import check_out

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    plan_draft(cfg)
    check_out(cfg.out, cfg.overwrite)
    if ENGINE.interpreter() is None:
        return draft(cfg, log)
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    ENGINE.run("nbl_dist.drafting", [json.dumps(options)], log)
    return json.loads((Path(cfg.out) / REPORT_NAME).read_text())


def draft_api(target: str, data: str, out: str, *, log: Callable[[str], None] | None = None, **options) -> dict:
    """nbl_dist.draft(target=..., data=..., out=..., tokens=...): the Python entry point; options by their field
    names, converted and checked like the command line's. Returns the report (nbl_draft.json)."""
    cfg = DraftConfig.from_dict({"target": target, "data": data, "out": out, **options})
    return run_draft(cfg, log)


def run_fingerprint(plan: Plan, record: dict, cfg: DraftConfig, steps: int) -> str:
    """What the result depends on: a run started again with the same fingerprint resumes from its checkpoints."""
    h = hashlib.sha256()
    h.update((plan.target.path / "config.json").read_bytes())
    if cfg.init:
        for name in ("config.json", REPORT_NAME):
            if (Path(cfg.init) / name).is_file():
                h.update((Path(cfg.init) / name).read_bytes())
    options = {k: getattr(cfg, k) for k in FINGERPRINT_OPTIONS}
    h.update(json.dumps([record, options, steps, str(cfg.init)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def draft(cfg: DraftConfig, log: Callable[[str], None] | None = None) -> dict:
    """Train a draft for cfg.target and write cfg.out. Returns the report (nbl_draft.json). Needs speculators."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from nbl_dist.artifact.publish import check_out
    from nbl_dist.data.blocks import tokenizer_fingerprint
    from nbl_dist.data.sources import DataSource
    from nbl_dist.drafting.data import choose_prompts, resolve_generator
    from nbl_dist.drafting.loop import DRAFT_NAME, LoopConfig, draft_loop
    from nbl_dist.drafting.model import config_from_dict, load_draft
    from nbl_dist.drafting.writer import write_draft
    from nbl_dist.runtime.cluster import RayCluster, closed_on_error, run_name
    from nbl_dist.runtime.resources import resolve_device, resolve_dtype
    from nbl_dist.runtime.shared import check_shared
    from nbl_dist.training import ray_train

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    plan = plan_draft(cfg)
    target = plan.target
    out = check_out(cfg.out, cfg.overwrite)
    tokenizer = AutoTokenizer.from_pretrained(target.path)
    init_records = draft_records(cfg.init) if cfg.init else []
    check_tokenizer(init_records[0] if init_records else None, tokenizer_fingerprint(tokenizer))
    steps, batches = cfg.steps_for(), cfg.batches_for()
    source = DataSource(cfg.data, cfg.text_column, cfg.data_config, cfg.data_split)
    records = target.folder.data_records + init_records
    prompts = choose_prompts(source, tokenizer, cfg.prompt_len, records, batches * cfg.batch_size,
                             cfg.heldout_samples, cfg.seed)
    record = prompts.record(source, tokenizer, cfg.seed)
    storage = ray_train.storage_folder(out, cfg.storage, "draft")
    name = run_name("draft", out, run_fingerprint(plan, record, cfg, steps))
    tokens = batches * cfg.batch_size * cfg.seq_len
    log(f"drafting for {cfg.target} ({target.family}, {target.layers} layers, d={target.hidden}): "
        f"{'refitting ' + cfg.init if cfg.init else 'a new draft'}, taps {plan.aux_layers}, draft vocabulary "
        f"{plan.draft_vocab} of {target.vocab}; {batches * cfg.batch_size} sequences of {cfg.prompt_len} + "
        f"{cfg.continuation} tokens ({tokens:,} tokens), {steps} steps of {cfg.batch_size} ({steps / batches:g} "
        f"passes), {cfg.workers} worker(s)")
    log(f"  prompts: {len(prompts.train_indices)} to train, {len(prompts.heldout_indices)} held out; "
        f"{prompts.excluded} blocks of --data skipped (used by recorded runs)")
    storage.mkdir(parents=True, exist_ok=True)
    t_gen = time.perf_counter()
    sequences = continuations(cfg, target, prompts, storage / f"{name}.sequences.pt", resolve_generator(cfg.generator),
                              tokenizer.eos_token_id, log)
    generate_s = time.perf_counter() - t_gen
    train_seq, held_seq = sequences.split(len(prompts.train_indices))
    initial, coverage = initial_draft(cfg, plan, train_seq, storage / f"{name}.initial.safetensors", log)
    cluster = RayCluster(cfg.address, dashboard=True)
    with closed_on_error(cluster):
        device = resolve_device(cfg.device, cluster, cfg.workers)
        gpu = device == "cuda"
        cpus = cfg.cpus_per_worker or cluster.cpus_per_actor(cfg.workers, gpu=gpu)
        dtype = resolve_dtype(cfg.dtype, AutoConfig.from_pretrained(target.path), device)
        check_shared(cluster, cluster.worker_nodes(cpus, 1 if gpu else 0), str(storage),
                     {"target folder": str(target.path.resolve())},
                     fix="Put --target and --storage (by default beside --out) on a filesystem that the driver's node "
                         "and every worker's node mount at the same path (NFS, a cluster filesystem), or pass a "
                         "--storage there")
        loop = LoopConfig(
            target=str(target.path.resolve()), draft_config=initial["config"], initial=initial["file"],
            aux_layers=plan.aux_layers, dtype=str(dtype).removeprefix("torch."),
            compute_dtype=compute_dtype(cfg.draft_dtype, device), ttt_steps=cfg.ttt_steps,
            lr=cfg.peak_lr, schedule=cfg.schedule, warmup_steps=round(cfg.warmup * steps), steps=steps,
            batch_size=cfg.batch_size,
            eval_every=cfg.eval_every or max(1, steps // 10), checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
            threads=None if gpu else int(max(1, cpus)), target_cache=int(cfg.target_cache * 2**30),
            data=cluster.ray.put({"train": train_seq.to_dict(), "heldout": held_seq.to_dict()}))
        result, train_s = ray_train.run(draft_loop, loop, log=log, storage=storage, name=name, workers=cfg.workers,
                                        use_gpu=gpu, cpus_per_worker=cpus, max_failures=cfg.max_failures)
    cluster.close()
    with ray_train.final_checkpoint(result) as folder:
        history = ray_train.saved_history(folder)
        trained = load_draft(config_from_dict(initial["config"]), load_file(str(folder / DRAFT_NAME)))
    before, after = history["heldout"][0], history["heldout"][-1]
    report = {"target": str(target.path), "init": cfg.init, "out": str(out), "aux_layers": plan.aux_layers,
              "draft_vocab": plan.draft_vocab, "vocab_coverage": coverage, "steps": steps, "lr": loop.lr,
              "tokens": tokens, "trained_tokens": steps * cfg.batch_size * cfg.seq_len,
              "trained_positions": int(train_seq.loss_mask().sum()), "sequences": len(prompts.train_indices),
              "generator": resolve_generator(cfg.generator), "workers": cfg.workers, "device": device,
              "dtype": loop.dtype, "draft_dtype": loop.compute_dtype, "heldout_before": before, "heldout_after": after,
              "curve": history, "data": record, "init_data": init_records, "run": name,
              "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
              "timings": {"generate_s": generate_s, "train_s": train_s, "total_s": time.perf_counter() - t0}}
    write_draft(out, trained, report)
    ray_train.clear_run(storage, name)
    for leftover in (f"{name}.sequences.pt", f"{name}.initial.safetensors"):
        (storage / leftover).unlink(missing_ok=True)
    if storage.is_dir() and not any(storage.iterdir()):
        storage.rmdir()
    log(f"draft written to {out}: held-out acceptance length {before['acceptance']:.2f} -> "
        f"{after['acceptance']:.2f} tokens per target step at {cfg.ttt_steps} speculative tokens (vLLM's count "
        f"replayed), accepted per position {' '.join(f'{a:.2f}' for a in after['per_position'])}; "
        f"{time.perf_counter() - t0:.0f} s")
    return report


def compute_dtype(choice: str, device: str) -> str:
    """--draft-dtype resolved on the driver: auto is bfloat16 on GPUs and on a CPU with native bfloat16 (its workers
    are taken to be of the driver's kind), else float32."""
    from nbl_dist.runtime.resources import cpu_has_native_bfloat16

    if choice != "auto":
        return choice
    return "bfloat16" if device == "cuda" or cpu_has_native_bfloat16() else "float32"


def continuations(cfg: DraftConfig, target: Target, prompts, cache: Path, generator: str, eos: int,
                  log: Callable[[str], None]):
    """The target's continuations of the training and held-out prompts (data.Sequences), generated once per run:
    kept in `cache` beside the run's checkpoints, read from there by a run started again."""
    from nbl_dist.drafting.data import Sequences, generate

    if cache.is_file():
        log(f"  continuations: read from {cache} (generated by an earlier start of this run)")
        return Sequences.from_dict(torch.load(cache))
    dtype = cfg.dtype if cfg.dtype != "auto" else ("auto" if torch.cuda.is_available() else "float32")
    sequences = generate(target.path, torch.cat([prompts.train, prompts.heldout]), cfg.continuation, eos, generator,
                         dtype)
    torch.save(sequences.to_dict(), cache)
    return sequences


def initial_draft(cfg: DraftConfig, plan: Plan, train, path: Path, log: Callable[[str], None]) -> tuple[dict, float]:
    """The draft training starts from, written to `path` for the workers: the --init draft's tensors (its verifier
    now the target), or a fresh draft whose vocabulary is the target's most frequent generated tokens. Returns
    ({"config": its config.json, "file": path}, the share of the generated tokens its vocabulary covers)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from nbl_dist.drafting.data import draft_vocabulary
    from nbl_dist.drafting.loop import save_draft
    from nbl_dist.drafting.model import draft_config, draft_target_ids, load_draft, new_draft
    from nbl_dist.model.safetensors_io import load_tensors

    target = plan.target
    adapter = target.folder.adapter
    head_key = adapter.head_key(AutoConfig.from_pretrained(target.path))
    weights, _ = load_tensors(target.path, sorted({adapter.embed_key, head_key}), dtype=torch.float32)
    embed, head = weights[adapter.embed_key], weights[head_key]
    config = draft_config(target.path, plan.aux_layers, plan.draft_vocab, cfg.speculative_tokens)
    if plan.init is not None:
        tensors = load_file(str(Path(cfg.init) / "model.safetensors"))
        tensors.setdefault("embed_tokens.weight", embed)
        draft = load_draft(config, tensors)
        draft_ids = draft_target_ids(draft)
    else:
        draft_ids, _ = draft_vocabulary(train, target.vocab, plan.draft_vocab)
        draft = new_draft(config, embed, head[draft_ids], draft_ids, cfg.seed)
    tokens = train.generated_tokens()
    coverage = float(torch.isin(tokens, draft_ids).float().mean()) if tokens.numel() else 0.0
    whose = " (the --init draft's)" if plan.init else ""
    log(f"  draft vocabulary: {plan.draft_vocab} tokens{whose}, covering "
        f"{coverage:.1%} of the tokens the target generated")
    save_draft(draft, path)
    return {"config": config.to_dict(), "file": str(path)}, coverage
