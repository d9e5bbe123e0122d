"""Held-out perplexity on blocks no calibration used, lm-evaluation-harness tasks, and prefill / decode speed of
an original vs a linearized model (same run)."""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from nbl_dist.data import BlockStream, DataSource, tokenizer_fingerprint
from nbl_dist.errors import DataError, MissingExtraError

# How --data at evaluation relates to the run's calibration data.
SAME_DATA, OTHER_DATA, UNRECORDED = "calibration data", "other data", "unrecorded"


@dataclasses.dataclass(frozen=True)
class HeldOutBlocks:
    """Evaluation blocks: blocks[k] is block indices[k] of --data's block stream (seq_len tokens each).

    Attributes:
        relation: SAME_DATA (the run's --data: the blocks it used were skipped), OTHER_DATA (nothing to skip) or
            UNRECORDED (the model folder records no calibration blocks: nothing could be skipped).
        excluded: blocks of this stream skipped because they overlap a block the run used.
    """

    blocks: torch.Tensor  # (N, seq_len) int64
    indices: list[int]
    relation: str
    excluded: int

    def describe(self) -> str:
        if self.relation == SAME_DATA:
            return (f"--data is the calibration data: skipped the {self.excluded} blocks that overlap a block the "
                    "run used (statistics or held back)")
        if self.relation == OTHER_DATA:
            return "--data is not the calibration data (another fingerprint): no block needs to be skipped"
        return ("the model folder records no calibration blocks (a plain checkpoint, or calibrated from blocks "
                "given in memory): no block skipped")


# The keys of a data record (data.block_record, healing's record) that list blocks a run used.
USED_BLOCK_KEYS = ("statistics_blocks", "held_back_blocks", "training_blocks", "kl_blocks")


def heldout_blocks(source: DataSource, tokenizer, seq_len: int, samples: int, run: dict | list[dict] | None,
                   advice: str | None = None) -> HeldOutBlocks:
    """The first `samples` blocks of `source` that share no token with a block the run used.

    Reads --data lazily, only as far as those blocks need. The run's blocks are compared as token ranges, so
    another --seq-len than the run's still skips every block that overlaps one it used.

    Args:
        source: --data and how to read it.
        tokenizer: the tokenizer of the evaluated models.
        seq_len: tokens per evaluation block.
        samples: blocks wanted.
        run: the data record of the run (the "nbl" section's "data", data.block_record), a list of records (a
            healed folder has its calibration's and its healing's: data_records), or None.
        advice: the fix a too-short --data message names (default: calibrate's and eval's options).
    Returns:
        The blocks, their stream indices, how --data relates to the run's, and how many blocks were skipped.
    Raises:
        DataError: --data is the run's data read by another tokenizer, or has too few unused blocks.
    """
    records = [] if not run else [run] if isinstance(run, dict) else list(run)
    relation, used = _run_blocks(source, tokenizer, records)  # used: (the record's seq_len, its block indices)
    stream = BlockStream(source.documents(), tokenizer, seq_len)
    chosen, indices, excluded = [], [], 0
    for j, block in enumerate(stream):
        # Block j is tokens [j * seq_len, (j + 1) * seq_len): the blocks of each record it touches, at their length.
        if any(any(i in blocks for i in range(j * seq_len // n, ((j + 1) * seq_len - 1) // n + 1))
               for n, blocks in used):
            excluded += 1
            continue
        chosen.append(block)
        indices.append(j)
        if len(chosen) == samples:
            return HeldOutBlocks(torch.stack(chosen), indices, relation, excluded)
    raise stream.too_few(len(chosen), samples, f"--data {source.path!r}",
                         f" besides the {excluded} the run used" if excluded else "", *([advice] if advice else []))


def data_records(nbl_section: dict) -> list[dict]:
    """Every data record of an output folder's "nbl" section: its calibration's, and its healing's if healed."""
    healing = nbl_section.get("healing") or {}
    return [r for r in (nbl_section.get("data"), healing.get("data")) if r]


def _run_blocks(source: DataSource, tokenizer, records: list[dict]) -> tuple[str, list[tuple[int, set[int]]]]:
    """(how --data relates to the runs' data, [(seq_len, block indices used)] of each record of this data)."""
    if not records:
        return UNRECORDED, []
    mine = [r for r in records if r["fingerprint"] == source.fingerprint()]
    if not mine:
        return OTHER_DATA, []
    if any(r["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer) for r in mine):
        raise DataError(f"--data {source.path!r} is the calibration data, but the model's tokenizer is not the one "
                        "that cut it into the run's blocks, so those blocks cannot be found and skipped; evaluate "
                        "with the tokenizer of the calibrated model (the output folder holds a copy)")
    return SAME_DATA, [(int(r["seq_len"]), {i for k in USED_BLOCK_KEYS for i in r.get(k, [])}) for r in mine]


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) of logits (B, T, V) against token ids (B, T).

    Position t predicts token t + 1; the logits go up to float32 at least (bf16 up, float64 kept)."""
    sums = next_token_sums(lambda x: x, logits, ids)  # logits are their own head's output
    return sums["loss_sum"], sums["tokens"]


HEAD_ROWS = 2048  # token positions per vocabulary projection in next_token_sums


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary, in float32 at least (bf16 up, float64 kept)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


@torch.no_grad()
def next_token_sums(head, h: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    """Summed next-token cross-entropy of hidden states h (B, T, d) against token ids (B, T), and, given the
    original model's hidden states `reference` (B, T, d) at the same point, the summed KL divergence
    KL(original || this) of the two next-token distributions (None without a reference). Float64 sums over
    positions; `tokens` is the number of predicted positions. head: hidden (n, d) -> logits (n, V).

    The vocabulary projection runs HEAD_ROWS positions at a time: whole, a 128k vocabulary at 8 x 2048 tokens
    would be an 8 GiB float32 logits tensor, twice over with the reference."""
    d = h.shape[-1]
    h = h[:, :-1].reshape(-1, d)  # (n, d): position t predicts token t + 1
    target = ids[:, 1:].reshape(-1).to(h.device, torch.long)  # (n,)
    ref = None if reference is None else reference[:, :-1].reshape(-1, d)
    loss = kl = 0.0
    for r in range(0, h.shape[0], HEAD_ROWS):
        logp = log_probs(head(h[r:r + HEAD_ROWS]))  # (rows, V)
        loss += float(torch.nn.functional.nll_loss(logp, target[r:r + HEAD_ROWS], reduction="none").double().sum())
        if ref is not None:
            ref_logp = log_probs(head(ref[r:r + HEAD_ROWS]))
            per_row = torch.nn.functional.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)
            kl += float(per_row.double().sum())
    return {"loss_sum": loss, "kl_sum": None if ref is None else kl, "tokens": int(target.numel())}


@torch.no_grad()
def loss_sum(model, blocks: torch.Tensor, batch_size: int = 4) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) over (N, T) token blocks."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)  # (B, T)
        loss, n = next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
        total += loss
        count += n
    return total, count


def perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over (N, T) token blocks (every position but the first predicted)."""
    total, count = loss_sum(model, blocks, batch_size)
    return math.exp(total / count)


def synchronized_clock(device: torch.device):
    """time.perf_counter after waiting for the device's queued work (CUDA runs kernels asynchronously: without
    the wait a timer measures only the launches)."""
    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


@torch.no_grad()
def speed(model, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Prefill tokens/s (batch 1, the whole prompt) and decode tokens/s (greedy, KV cache); best of `repeats`.
    The prompt goes to the model's device; every timer waits for the device's work first."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    clock = synchronized_clock(device)
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = clock()
        out = model(input_ids=prompt, use_cache=True)
        t1 = clock()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = clock()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t3 = clock()
        prefill.append(prompt.shape[1] / (t1 - t0))
        decode.append(new_tokens / (t3 - t2))
    return {"prefill_tok_s": max(prefill), "decode_tok_s": max(decode)}


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def compare_speed(models: dict, prompt: torch.Tensor, new_tokens: int = 32, rounds: int = 5) -> dict:
    """speed() of several models, alternating between them each round (the machine is shared and its speed
    drifts), best round of each. Returns name -> {"prefill_tok_s", "decode_tok_s"}."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, model in models.items():
            s = speed(model, prompt, new_tokens, repeats=1)
            best[name] = {k: max(v, best.get(name, {}).get(k, 0.0)) for k, v in s.items()}
    return best


def require_harness() -> None:
    """Refuse, naming the extra to install, when lm-evaluation-harness is missing (before any model is loaded)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"--tasks needs lm-evaluation-harness, which is not installed ({e}); install the "
                                "eval extra: pip install 'nbl-dist[eval]'") from None


def harness_eval(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: float | None = None,
                 num_fewshot: int | None = None, batch_size: int = 4, output_path: str | None = None,
                 model_name: str | None = None) -> dict:
    """Run lm-evaluation-harness tasks on an already-loaded model (the model object is passed in, so a
    linearized model needs no trust_remote_code).

    Args:
        model, tokenizer: the loaded model (on its device) and its tokenizer.
        tasks: harness task names.
        include_path: a folder of extra task YAMLs (local data).
        limit, num_fewshot, batch_size: the harness's options of those names.
        output_path: where the harness writes its results file, as `lm_eval --output_path` does
            (OUTPUT/<model name>/results_<time>.json, or OUTPUT_<time>.json for a .json OUTPUT).
        model_name: the model's name in that file and folder (default: a random id).
    Returns:
        task -> {metric: value}.
    Raises:
        MissingExtraError: lm-evaluation-harness is not installed (the `eval` extra).
    """
    require_harness()
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    out = lm_eval.simple_evaluate(model=lm, model_args={"pretrained": model_name} if model_name else None,
                                  tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, bootstrap_iters=0, evaluation_tracker=tracker)
    if tracker is not None:
        tracker.save_results_aggregated(results=out, samples=None)
    return {task: {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, res in out["results"].items()}
