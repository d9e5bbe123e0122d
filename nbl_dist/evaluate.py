"""Held-out perplexity, and prefill / decode speed of an original vs a linearized model (same run)."""

from __future__ import annotations

import math
import time

import torch


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, predicted tokens) of logits (B, T, V) against token ids (B, T).

    Position t predicts token t + 1; the logits go up to float32 at least (bf16 up, float64 kept)."""
    logits = logits[:, :-1]  # (B, T-1, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = ids[:, 1:].to(logits.device, torch.long)  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             reduction="sum")
    return float(loss.double()), int(target.numel())


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


@torch.no_grad()
def speed(model, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Prefill tokens/s (batch 1, the whole prompt) and decode tokens/s (greedy, KV cache); best of `repeats`."""
    prefill, decode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        t1 = time.perf_counter()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t3 = time.perf_counter()
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


def harness_eval(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                 num_fewshot: int | None = None, batch_size: int = 4) -> dict:
    """Run lm-evaluation-harness tasks on an already-loaded model (the model object is passed in, so a
    linearized model needs no trust_remote_code). include_path: a folder of extra task YAMLs (local data).

    Returns:
        task -> {metric: value}.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    return {task: {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, res in out["results"].items()}
