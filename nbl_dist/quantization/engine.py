"""What runs inside the llm-compressor environment: `python -m nbl_dist.quantization.engine SPEC.json`, or
`run(spec)` in a process that has llm-compressor (a Ray task on a GPU node).

It loads --model from its folder (`import nbl_dist` registers the nbl_<family> classes; never a model linearized in
memory: save_pretrained would then write the original's config, losing the nbl section), builds the calibration
dataset from the blocks the driver chose, runs llm-compressor's `oneshot` with the recipe (recipe.py), writes the
compressed-tensors checkpoint and the tokenizer into the staging folder, and checks that config.json still names
the nbl_<family> architecture, its auto_map and the nbl section. Progress goes to stdout line by line (the driver
passes it through); an expected failure is one `nbl-dist: error:` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULT_NAME = "result.json"
# Files of an nbl-dist folder that say how it was made: copied into the quantized folder as they are.
PROVENANCE = ("nbl_report.json", "nbl_bounds.png", "nbl_heal_report.json")


def allow_awq_on_cpu() -> None:
    """llm-compressor 0.14.0.1's AWQ pins its cached activations (IntermediatesCache: `value.pin_memory()`)
    unconditionally, and torch raises "Cannot access accelerator device when none is available" for pinned memory
    on a machine without an accelerator. Pinning only speeds host-to-device copies, so on such a machine it is
    skipped (the cache keeps ordinary CPU tensors); with an accelerator nothing changes."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def calibration_dataset(blocks_file: str | Path):
    """The blocks as a datasets.Dataset of input_ids and attention_mask: oneshot then skips its own tokenization."""
    from datasets import Dataset
    from safetensors.torch import load_file

    ids = load_file(str(blocks_file))["input_ids"]  # (N, T) int64
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}


def check_saved_config(source: dict, saved: dict) -> None:
    """The quantized folder's config.json keeps the source's model type, architectures, auto_map and nbl section."""
    from nbl_dist.errors import CheckpointError

    lost = [k for k in ("model_type", "architectures", "auto_map", "nbl") if source.get(k) != saved.get(k)]
    if lost or "quantization_config" not in saved:
        raise CheckpointError(f"the quantized config.json lost {lost or ['quantization_config']} of the source's: "
                              "this llm-compressor or transformers version saves it differently; report it")


def run(spec: dict, log=print) -> dict:
    """Quantize spec["model"] into spec["staging"]; returns what happened (also written to spec["result"]).

    Args:
        spec: model, staging, blocks (safetensors file of "input_ids" (N, T)), scheme, method, group_size, ignore,
            dtype ("float32", ...), seed, result (a JSON file to write the result to, or None).
    """
    os.environ.setdefault("TQDM_DISABLE", "1")  # the per-batch bars are one line per update through a pipe
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import nbl_dist  # noqa: F401  registers nbl_<family> with the Auto classes
    from nbl_dist.quantization.recipe import build_recipe

    from llmcompressor import oneshot

    t0 = time.perf_counter()
    model_dir, staging = Path(spec["model"]), Path(spec["staging"])
    if spec["method"] == "awq":
        allow_awq_on_cpu()
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, spec["dtype"]))
    dataset = calibration_dataset(spec["blocks"])
    n, seq_len = dataset.num_rows, len(dataset[0]["input_ids"])
    device = "an accelerator" if torch.accelerator.is_available() else "CPU"
    log(f"quantize: {spec['scheme']} by {spec['method']} (group size {spec['group_size']}, ignore "
        f"{spec['ignore']}) on {n} x {seq_len} tokens, {spec['dtype']}, on {device}")
    t1 = time.perf_counter()
    recipe = build_recipe(spec["scheme"], spec["method"], spec["group_size"], spec["ignore"])
    model = oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=n, max_seq_length=seq_len,
                    shuffle_calibration_samples=False)
    oneshot_s = time.perf_counter() - t1
    quantized = sorted(name for name, m in model.named_modules() if getattr(m, "quantization_scheme", None))
    log(f"quantize: oneshot done in {oneshot_s:.0f} s, {len(quantized)} linear layers quantized; saving")
    model.save_pretrained(staging, save_compressed=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(staging)
    for name in PROVENANCE:
        if (model_dir / name).is_file() and not (staging / name).exists():
            (staging / name).write_bytes((model_dir / name).read_bytes())
    source = json.loads((model_dir / "config.json").read_text())
    saved = json.loads((staging / "config.json").read_text())
    check_saved_config(source, saved)
    result = {"quantized_layers": quantized, "ignore": saved["quantization_config"].get("ignore", []),
              "format": saved["quantization_config"].get("format"), "samples": n, "seq_len": seq_len,
              "device": device, "timings": {"load_s": t1 - t0, "oneshot_s": oneshot_s,
                                            "total_s": time.perf_counter() - t0}, "versions": versions()}
    if spec.get("result"):
        Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str]) -> int:
    from nbl_dist.errors import NBLError

    spec = json.loads(Path(argv[0]).read_text())
    try:
        run(spec)
    except NBLError as e:
        print(f"nbl-dist: error: {' '.join(str(e).split())}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
