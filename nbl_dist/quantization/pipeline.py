"""quantize(): check the inputs, choose the calibration blocks, run llm-compressor's step where it is installed,
record the quantization and publish the folder (docs/method.md §13).

The step itself (engine.py) needs llm-compressor, whose pins share an environment neither with nbl-dist's main one
nor with vLLM's (README "Environments"): the command the user typed checks every input and chooses the blocks in
its own process, then runs the step through runtime.environments.Engine (this interpreter when it imports
llmcompressor, else $NBL_QUANTIZE_PYTHON, else the repository's .venv-quant), or, on a Ray cluster (--address, or
inside a Ray job), as one Ray task holding one GPU when the cluster has GPUs, in the worker's own process.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nbl_dist.errors import ConfigError
from nbl_dist.quantization.config import QuantizeConfig
from nbl_dist.runtime.environments import Engine

ENGINE = Engine(name="quantize", modules=("llmcompressor",), venv=".venv-quant", install="make venv-quant")
ENGINE_MODULE = "nbl_dist.quantization.engine"
WORK = ".quantize"  # inside the staging folder: the engine's spec, blocks and result, removed before publishing


def run_here(spec: dict, work: Path, device: str, log: Callable[..., None]) -> dict:
    """The engine step in the interpreter that has llm-compressor, on this machine; its result."""
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    hidden = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}  # llm-compressor takes any accelerator it sees
    ENGINE.run(ENGINE_MODULE, [str(spec_file)], log=log, env={**hidden, "TQDM_DISABLE": "1"})  # bars: a line each
    return json.loads(Path(spec["result"]).read_text())


def run_on_cluster(cluster, spec: dict, device: str, model_dir: Path, out: Path) -> dict:
    """The engine step as one Ray task (one GPU when `device` is cuda), in the worker's own process."""
    from nbl_dist.quantization.engine import run
    from nbl_dist.runtime.shared import check_shared

    gpus = 1 if device == "cuda" else 0
    cpus = 1.0 if gpus else cluster.cpus_per_actor(1)
    check_shared(cluster, cluster.worker_nodes(cpus, gpus), str(out.parent), {"model folder": str(model_dir)},
                 fix="Put --model and --out on a filesystem that the driver's node and every worker's node mount at "
                     "the same path (NFS, a cluster filesystem)")
    return cluster.run_task(run, ({**spec, "result": None},), num_cpus=cpus, num_gpus=gpus, name="nbl-quantize")


def resolve_target(cfg: QuantizeConfig):
    """(the Ray cluster or None, the device the quantized model is made on and checked for)."""
    from nbl_dist.runtime.cluster import RayCluster, cluster_address
    from nbl_dist.runtime.resources import resolve_actor_device, resolve_local_device

    if cluster_address(cfg.address)[0] is None:
        return None, resolve_local_device(cfg.device)
    cluster = RayCluster(cfg.address)
    return cluster, resolve_actor_device(cfg.device, cluster.gpus(), 1)


def quantize(cfg: QuantizeConfig, log: Callable[..., None] | None = None) -> dict:
    """Quantize cfg.model into cfg.out. Returns the report (nbl_quantize_report.json)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from nbl_dist.artifact.publish import check_out, staging_for
    from nbl_dist.data.sources import DataSource
    from nbl_dist.quantization.blocks import quantize_blocks
    from nbl_dist.quantization.checks import check_inputs
    from nbl_dist.quantization.writer import REPORT_NAME, write_quantized
    from nbl_dist.runtime.cluster import closed_on_error
    from nbl_dist.runtime.resources import resolve_dtype

    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    cluster, device = resolve_target(cfg)
    with closed_on_error(cluster):
        plan = check_inputs(cfg.model, cfg.scheme, cfg.group_size, cfg.maps, device)
        out = check_out(cfg.out, cfg.overwrite)
        if cluster is None:
            ENGINE.interpreter()  # MissingExtraError naming `make venv-quant`, before the data is read
        folder, records = plan.folder, plan.folder.data_records
        seq_len = cfg.seq_len or (records[0]["seq_len"] if records else 256)
        context = getattr(plan.hf_config, "max_position_embeddings", seq_len)
        if seq_len > context:
            raise ConfigError(f"--seq-len {seq_len} exceeds the model's context ({context})")
        tokenizer = AutoTokenizer.from_pretrained(folder.path)
        data = DataSource(cfg.data, cfg.text_column, cfg.data_config, cfg.data_split)
        blocks = quantize_blocks(data, tokenizer, seq_len, records, cfg.reserve_eval, cfg.samples)
        record = blocks.record(data, tokenizer, seq_len, cfg.seed)
        dtype = str(resolve_dtype(cfg.dtype, plan.hf_config, device)).removeprefix("torch.")
        kind = f"nbl-dist output, layers {folder.linearized_layers} linearized" if folder.is_linearized else "original"
        log(f"quantizing {cfg.model} ({kind}) to {cfg.scheme} by {cfg.method}, group size {plan.group_size}, maps "
            f"{cfg.maps if folder.is_linearized else '-'}, on {device}: {len(blocks.indices)} blocks of {seq_len} "
            f"tokens of --data ({len(blocks.reserved_indices)} left for `nbl-dist eval`, {blocks.excluded} skipped: "
            "used by a recorded run)")
        staging = staging_for(out)
        work = staging / WORK
        work.mkdir()
        save_file({"input_ids": blocks.blocks.contiguous()}, str(work / "blocks.safetensors"))
        spec = {"model": str(folder.path.resolve()), "staging": str(staging.resolve()),
                "blocks": str((work / "blocks.safetensors").resolve()), "scheme": cfg.scheme, "method": cfg.method,
                "group_size": plan.group_size, "ignore": plan.ignore, "dtype": dtype, "seed": cfg.seed,
                "result": str((work / "result.json").resolve())}
        if cluster is None:
            result = run_here(spec, work, device, log)
        else:
            result = run_on_cluster(cluster, spec, device, folder.path.resolve(), out.resolve())
    if cluster is not None:
        cluster.close()
    shutil.rmtree(work)
    section = {"scheme": cfg.scheme, "method": cfg.method, "group_size": plan.group_size, "maps": cfg.maps,
               "ignore": result["ignore"], "source": str(folder.path), "data": record}
    report = {**section, "model": str(folder.path), "out": str(out), "linearized_layers": folder.linearized_layers,
              "quantized_layers": len(result["quantized_layers"]), "format": result["format"], "device": device,
              "dtype": dtype, "engine_device": result["device"], "versions": result["versions"],
              "timings": {**result["timings"], "total_s": time.perf_counter() - t0}}
    write_quantized(staging, out, section if folder.is_linearized else None, report)
    log(f"quantized: {len(result['quantized_layers'])} linear layers to {cfg.scheme} in "
        f"{result['timings']['oneshot_s']:.0f} s; wrote {out} ({REPORT_NAME}) in {time.perf_counter() - t0:.0f} s")
    return report


def quantize_api(model: str, data: str, out: str, *, log: Callable[..., None] | None = None, **options) -> dict:
    """nbl_dist.quantize(model=..., data=..., out=..., scheme=...): the Python entry point; options by their field
    names, converted and checked like the command line's. Returns the report."""
    cfg = QuantizeConfig.from_dict({"model": model, "data": data, "out": out, **options})
    return quantize(cfg, log=log)
