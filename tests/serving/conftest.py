"""Shared by the vLLM serving tests, which run in the vLLM environment (.venv-vllm; `make test` runs them there).

`vllm_engine` runs vLLM's engine inside the test process (no engine-core or worker process: each of those imports
vLLM again, about 5 s apiece here), one engine at a time; the model code is the same. What only the process layout
shows (the plugin reaching spawned processes through its entry point) is tested with `vllm serve` and the refusal
tests, in processes of their own started with a user's environment (`user_env`). KV memory is fixed
(VLLM_CPU_KVCACHE_SPACE) so that KV capacities can be compared with a closed form.
"""

import os
from pathlib import Path

import pytest
import torch

KV_SPACE_GIB = 1
os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(KV_SPACE_GIB)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
os.environ.update(IN_PROCESS)


def user_env(**extra) -> dict:
    """This process's environment as a user's shell would have it: vLLM's own process layout (no in-process
    engine), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in IN_PROCESS}, **extra}

REPO = Path(__file__).resolve().parents[2]
# vLLM's CPU attention takes head sizes 32, 64, 80, ... only: the tiny models have 2 heads of 32. A wider
# initialisation than the default 0.02 makes their next-token distributions peaked, so that greedy tokens are
# decided by margins far above float32 round-off.
TINY = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128, initializer_range=0.2)


def vllm_engine(folder, *, max_model_len: int = 256):
    """vllm.LLM on `folder` in float32, eager, its engine and worker in this process (nbl_dist.runtime.vllm_engine tears
    it down at the end of the block)."""
    from nbl_dist.runtime.vllm_engine import open_llm

    return open_llm(folder, dtype="float32", enforce_eager=True, max_model_len=max_model_len, seed=0,
                    distributed_executor_backend="uni", disable_log_stats=True)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(SmolLM2-135M checkpoint folder, calibration plays, held-out plays), converted and split once into runs/."""
    from nbl_dist.artifact.convert import convert_gguf, smollm2_gguf
    from nbl_dist.data.corpora import shakespeare_split

    cache = REPO / "runs" / "cache"
    return convert_gguf(smollm2_gguf(), cache / "smollm2-135m"), *shakespeare_split(cache / "shakespeare")


def reference(model, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """What vLLM must reproduce, from transformers alone: per prompt, the prompt log-probs (position i >= 1:
    log p(token_i | tokens before i)), the greedy continuation (each token the argmax of the logits given the
    prompt and the tokens before it) and each greedy token's log-prob."""
    out = []
    for ids in prompts:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(new_tokens):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            logp = model(torch.tensor([seq])).logits[0].double().log_softmax(-1)  # (T, V)
        token_logp = logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].tolist()  # token i+1 given <= i
        out.append({"prompt_logprobs": token_logp[:len(ids) - 1], "tokens": seq[len(ids):],
                    "token_logprobs": token_logp[len(ids) - 1:]})
    return out
