"""Prefill and decode speed of loaded models, measured side by side (the machine's speed drifts)."""

from __future__ import annotations

import time

import torch


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
