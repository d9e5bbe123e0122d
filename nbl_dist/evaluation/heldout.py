"""`nbl-dist eval --data`: the perplexity of a model folder and its baseline on the same held-out blocks of --data,
none of which a recorded run used (data/ledger.py), written as JSON beside the model (or where asked)."""

from __future__ import annotations

import json
from pathlib import Path

from nbl_dist.artifact.folder import ModelFolder
from nbl_dist.artifact.loading import load_model
from nbl_dist.data.sources import DataSource
from nbl_dist.errors import NBLError

EVAL_NAME = "nbl_eval.json"
DEFAULT_SEQ_LEN = 256  # for folders that record no run


def heldout_perplexity(model: str, baseline: str | None, source: DataSource, samples: int, seq_len: int | None,
                       device: str, dtype: str, batch_size: int, json_out: str | None = None) -> dict:
    """Perplexity of `model` (and `baseline`) on the first `samples` blocks of --data that no recorded run used.

    Args:
        model, baseline: model folders (baseline None: the model alone).
        source: --data and how to read it.
        samples: blocks to evaluate.
        seq_len: tokens per block (default: the recorded run's, else DEFAULT_SEQ_LEN).
        device, dtype: where and in what each model runs (auto as in artifact.loading.load_model).
        batch_size: blocks per forward.
        json_out: the result file (default: EVAL_NAME inside --model when it is an nbl-dist output, else in the
            current folder).
    Returns:
        The result as written, plus "json_out" (where) and "describe" (what was skipped and why).
    Raises:
        NBLError: the two folders tokenize differently (their perplexities would not compare).
    """
    from transformers import AutoTokenizer

    from nbl_dist.data.blocks import tokenizer_fingerprint
    from nbl_dist.data.ledger import heldout_blocks

    paths = {"model": model, **({"baseline": baseline} if baseline else {})}
    tokenizers = {name: AutoTokenizer.from_pretrained(path) for name, path in paths.items()}
    if len({tokenizer_fingerprint(t) for t in tokenizers.values()}) > 1:
        raise NBLError(f"--model {model!r} and --baseline {baseline!r} have different tokenizers, so "
                       "their perplexities on the same text do not compare; pass the baseline the model came from")
    folders = {name: ModelFolder.open(path, f"--{name}") for name, path in paths.items()}
    runs = next((f.data_records for f in folders.values() if f.data_records), [])
    seq_len = seq_len or (runs[0]["seq_len"] if runs else DEFAULT_SEQ_LEN)
    held = heldout_blocks(source, tokenizers["model"], seq_len, samples, runs)
    ppl, (ran_on, ran_in) = perplexities(paths, held.blocks, device, dtype, batch_size)
    result = {"model": model, "baseline": baseline, "perplexity": ppl,
              "ratio": ppl["model"] / ppl["baseline"] if baseline else None,
              "data": source.to_record(), "relation": held.relation, "seq_len": seq_len,
              "blocks": held.indices, "excluded_blocks": held.excluded, "device": ran_on, "dtype": ran_in}
    default = Path(model) / EVAL_NAME if folders["model"].nbl else Path(EVAL_NAME)
    out = Path(json_out) if json_out else default
    out.write_text(json.dumps(result, indent=2))
    return {**result, "json_out": str(out), "describe": held.describe()}


def perplexities(paths: dict[str, str], blocks, device: str, dtype: str,
                 batch_size: int) -> tuple[dict[str, float], tuple[str, str]]:
    """(name -> perplexity on the (N, T) blocks, (device, dtype) they ran in), one model in memory at a time."""
    from nbl_dist.evaluation.perplexity import perplexity

    ppl, where = {}, ("", "")
    for name, path in paths.items():
        loaded = load_model(path, device, dtype)
        ppl[name] = perplexity(loaded, blocks, batch_size)
        where = (str(loaded.device), str(loaded.dtype).removeprefix("torch."))
        del loaded
    return ppl, where
