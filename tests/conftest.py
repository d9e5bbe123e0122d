import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

from nbl_dist.model import synthetic
from tests.helpers import CORPUS, RayHead  # noqa: E402

# The serving tests run in the vLLM environment (.venv-vllm; `make test` runs them there after the rest).
collect_ignore = [] if importlib.util.find_spec("vllm") else ["serving"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the tests of one module (2 CPUs, no dashboard), shut down after them; a module whose tests
    build their own cluster shuts it down first."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
@pytest.fixture(scope="session")
def tokenizer():
    return synthetic.train_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory, tokenizer):
    """Factory: (family, dtype, seed, **config overrides) -> folder with a saved random tiny model + tokenizer."""
    cache = {}

    def make(family="llama", dtype=torch.float32, seed=0, **overrides):
        key = (family, dtype, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            cfg = synthetic.tiny_config(family, **overrides)
            model = synthetic.random_model(cfg, dtype=dtype, seed=seed)
            path = tmp_path_factory.mktemp(f"{family}-{str(dtype).split('.')[-1]}")
            synthetic.save_model(model, path, tokenizer)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def ray_head():
    """One `ray start --head` cluster for every test that submits a Ray job (each used to start its own: ~15 s)."""
    head = RayHead()
    yield head
    head.close()
