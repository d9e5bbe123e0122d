"""One vLLM engine after another in the same process: `vllm.LLM` opened as a context manager and torn down when
the block ends, its engine-core and worker processes (or in-process executor) and distributed state included, so
that the next engine can start. The benchmarks and the serving tests compare several folders this way; drafting
generates a target's continuations with it."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def open_llm(folder, **llm_kwargs) -> Iterator:
    """vllm.LLM(model=folder, **llm_kwargs) for the duration of the block."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(model=str(folder), **llm_kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def kv_capacity_tokens(llm) -> int:
    """Tokens of KV cache the engine allocated: its blocks times their size."""
    cache = llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size
