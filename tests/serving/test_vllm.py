"""vLLM serves nbl-dist output folders as they are (nbl_dist/serving): prompt log-probs and greedy tokens equal
transformers' on the same folder, a linearized layer holds no KV cache, `vllm serve` answers completion requests,
and vLLM without the plugin refuses the folder rather than serve a wrong model."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from nbl_dist.runtime.vllm_engine import kv_capacity_tokens
from tests.helpers import write_nbl_folder
from tests.serving.conftest import KV_SPACE_GIB, TINY, reference, user_env, vllm_engine

pytestmark = pytest.mark.slow

# Prompt log-probs compared position by position, in nats. Both sides run float32 with different kernels (vLLM's
# fused add + RMSNorm, paged attention and its own GEMM order against transformers' eager layers); measured here:
# tiny models (weights drawn with std 0.2) at most 3e-6, SmolLM2 (30 layers) 4e-5 for the original and 1.9e-4
# for NBL. The bounds leave that room and still fail a real error: a linear map without its bias changes SmolLM2's
# log-probs by 0.3, a transposed W by 12.
TINY_ATOL = 1e-5
SMOLLM2_ATOL = 1e-3
TINY_PROMPTS = ["The quick brown fox jumps", "To be, or not to be, that is", "All the world's a stage, and all",
                "Friends, Romans, countrymen"]
SMOLLM2_PROMPTS = ["To be, or not to be, that is the question:", "Now is the winter of our discontent",
                   "The capital of France is", "def fibonacci(n):"]
NEW_TOKENS = 12


def served(llm, prompts: list[list[int]]) -> list[dict]:
    """vLLM's greedy generation with the log-prob of every prompt token and of every generated token."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    result = []
    for ids, o in zip(prompts, outs):
        c = o.outputs[0]
        result.append({"prompt_logprobs": [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))],
                       "tokens": list(c.token_ids),
                       "token_logprobs": [c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids)]})
    return result


def assert_same(got: list[dict], want: list[dict], atol: float) -> float:
    """Greedy tokens equal; prompt and generated-token log-probs within atol. Returns the largest difference."""
    worst = 0.0
    for g, w in zip(got, want):
        assert g["tokens"] == w["tokens"], (g["tokens"], w["tokens"])
        for key in ("prompt_logprobs", "token_logprobs"):
            diff = max(abs(a - b) for a, b in zip(g[key], w[key]))
            assert diff <= atol, (key, diff)
            worst = max(worst, diff)
    return worst


def closed_form_kv_tokens(config, attention_layers: int, block_size: int) -> int:
    """Tokens of KV cache that KV_SPACE_GIB holds: whole blocks of `block_size` tokens, each token a key and a
    value of num_key_value_heads x head_dim float32 values in every layer that has attention."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * 4 * attention_layers
    return KV_SPACE_GIB * 2**30 // (block_size * per_token) * block_size


def tokenize(folder, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])  # llama: test_vllm_serve_answers_...
def test_tiny_model_served_like_transformers(family, make_model_dir, tmp_path):
    """Layers 0 and 3 of 4 linearized (the first and the last): vLLM's log-probs and greedy tokens equal
    transformers', and its KV cache holds exactly the closed form for the 2 layers that keep attention."""
    from nbl_dist import load_linearized

    src = make_model_dir(family, torch.float32, **TINY)
    blocks = torch.randint(3, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    out = write_nbl_folder(src, tmp_path / "nbl", [0, 3], blocks)
    model = load_linearized(out, dtype=torch.float32)
    prompts = tokenize(out, TINY_PROMPTS)
    want = reference(model, prompts, NEW_TOKENS)
    with vllm_engine(out) as llm:
        got = served(llm, prompts)
        capacity, block = kv_capacity_tokens(llm), llm.llm_engine.vllm_config.cache_config.block_size
    worst = assert_same(got, want, TINY_ATOL)
    print(f"{family}: largest log-prob difference {worst:.2e}; KV cache {capacity:,} tokens")
    assert capacity == closed_form_kv_tokens(model.config, 2, block)


def test_every_layer_linearized_serves(make_model_dir, tmp_path):
    """K = L: no attention anywhere, no KV cache; the plugin turns prefix caching off (it would have no cache
    group to manage) and the model serves like transformers."""
    from nbl_dist import load_linearized

    src = make_model_dir("qwen3", torch.float32, **TINY)
    blocks = torch.randint(3, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    out = write_nbl_folder(src, tmp_path / "nbl", [0, 1, 2, 3], blocks)
    prompts = tokenize(out, TINY_PROMPTS[:2])
    want = reference(load_linearized(out, dtype=torch.float32), prompts, NEW_TOKENS)
    with vllm_engine(out) as llm:
        assert not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        got = served(llm, prompts)
    assert_same(got, want, TINY_ATOL)


def test_smollm2_served_like_transformers_with_more_kv_capacity(smollm2, tmp_path):
    """SmolLM2-135M: the original (as `nbl-dist convert-gguf` writes it) and NBL with layers 0, 10, 20 and 29
    linearized (K = 4 of L = 30), each served by vLLM: log-probs and greedy tokens equal transformers' on the same
    folder, and the KV capacity for the same KV memory grows by L / (L - K) = 30 / 26, up to block rounding (each
    is the closed form for its attention layers)."""
    from transformers import AutoModelForCausalLM

    from nbl_dist import load_linearized
    from nbl_dist.data.blocks import load_blocks

    src, calib, _ = smollm2
    assert json.loads((src / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    prompts = tokenize(src, SMOLLM2_PROMPTS)
    blocks = load_blocks(calib, __import__("transformers").AutoTokenizer.from_pretrained(src), 8, 128)
    out = write_nbl_folder(src, tmp_path / "nbl", [0, 10, 20, 29], blocks)
    capacity = {}
    for name, folder, load in (("original", src, lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32)),
                               ("nbl", out, lambda f: load_linearized(f, dtype=torch.float32))):
        model = load(folder).eval()
        want = reference(model, prompts, NEW_TOKENS)
        with vllm_engine(folder, max_model_len=2048) as llm:
            got = served(llm, prompts)
            capacity[name] = kv_capacity_tokens(llm)
            block = llm.llm_engine.vllm_config.cache_config.block_size
        worst = assert_same(got, want, SMOLLM2_ATOL)
        print(f"SmolLM2 {name}: largest log-prob difference {worst:.2e}; KV cache {capacity[name]:,} tokens")
        assert capacity[name] == closed_form_kv_tokens(model.config, 30 if name == "original" else 26, block)
        del model
    ratio = capacity["nbl"] / capacity["original"]
    print(f"KV capacity NBL / original: {ratio:.4f} (L / (L - K) = {30 / 26:.4f})")
    assert abs(ratio - 30 / 26) <= block / capacity["original"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"vllm serve exited with {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"vllm serve did not answer {url} within {timeout} s")


def test_vllm_serve_answers_a_completion_request(make_model_dir, tmp_path):
    """`vllm serve OUT` as the README types it, in vLLM's own processes with torch.compile on (its defaults; the
    in-process tests run eager), on a tiny Llama with layers 0 and 3 of 4 linearized (a compiled SmolLM2 takes
    minutes here): a completion request on localhost gets transformers' greedy tokens, and the prompt's and the
    tokens' log-probs within TINY_ATOL of transformers'."""
    from transformers import AutoTokenizer

    from nbl_dist import load_linearized

    src = make_model_dir("llama", torch.float32, **TINY)
    blocks = torch.randint(3, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    out = write_nbl_folder(src, tmp_path / "nbl", [0, 3], blocks)
    prompt = TINY_PROMPTS[1]
    want = reference(load_linearized(out, dtype=torch.float32), tokenize(out, [prompt]), NEW_TOKENS)[0]
    port = free_port()
    vllm = Path(sys.executable).parent / "vllm"
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([str(vllm), "serve", str(out), "--dtype", "float32", "--port", str(port),
                                 "--max-model-len", "256"], stdout=sink, stderr=subprocess.STDOUT, env=user_env())
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/health", proc, log, timeout=400)
        answer = post(f"http://127.0.0.1:{port}/v1/completions",
                      {"model": str(out), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                       "ignore_eos": True, "return_token_ids": True, "logprobs": 0, "prompt_logprobs": 0})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    choice = answer["choices"][0]
    prompt_ids = tokenize(out, [prompt])[0]
    got = {"tokens": choice["token_ids"], "token_logprobs": choice["logprobs"]["token_logprobs"],
           "prompt_logprobs": [choice["prompt_logprobs"][i][str(t)]["logprob"] for i, t in enumerate(prompt_ids)
                               if i > 0]}
    assert_same([got], [want], TINY_ATOL)
    assert choice["text"] == AutoTokenizer.from_pretrained(out).decode(want["tokens"])


REFUSE = """
import sys, traceback
from vllm import LLM
if __name__ == "__main__":
    for trust in (False, True):  # both refusals happen while vLLM reads the config, before an engine starts
        try:
            LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
                distributed_executor_backend="uni", trust_remote_code=trust)
            print("SERVED", flush=True)
        except Exception:
            traceback.print_exc(file=sys.stdout)
        print(f"== END trust_remote_code={trust}", flush=True)
"""


def test_vllm_without_the_plugin_refuses_the_folder(make_model_dir, tmp_path):
    """vLLM that does not load nbl-dist's plugin (VLLM_PLUGINS names another; the same as nbl-dist not installed,
    for vLLM) refuses an output folder, with or without trust_remote_code, instead of serving it as a model with
    attention in the linearized layers: without, transformers cannot parse config.json and asks for
    trust_remote_code; with it, no vLLM architecture matches and vLLM's Transformers backend finds no base model
    class for the config (the folder's auto_map names a causal LM only). The engine runs in the script's process
    (the refusal does not depend on the process layout), and one process tries both ways (each vLLM process costs
    seconds to start)."""
    src = make_model_dir("llama", torch.float32, **TINY)
    out = write_nbl_folder(src, tmp_path / "nbl", [0, 3], torch.randint(3, 320, (4, 64)))
    script = tmp_path / "serve.py"
    script.write_text(REFUSE)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VLLM_PLUGINS": "not-nbl-dist"})
    logs = proc.stdout  # vLLM logs to stdout, and so does the script's traceback
    assert proc.returncode == 0 and "SERVED" not in logs, (proc.stdout + proc.stderr)[-3000:]
    default, trusted, rest = logs.split("== END trust_remote_code=")
    assert default.count("Traceback") == 1 and "trust_remote_code=True" in default, default[-3000:]
    assert trusted.startswith("False") and trusted.count("Traceback") == 1, trusted[-3000:]
    assert "Unrecognized configuration class" in trusted, trusted[-3000:]
    assert rest.startswith("True")


def test_plugin_registers_lazily_and_can_run_twice():
    """The entry point is installed; registering twice is harmless; the architectures are registered as
    "module:Class" strings (nothing imported until a folder names them); and in a fresh interpreter it imports
    neither the model classes nor the calibration path (no Ray)."""
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("nbl_dist")]
    assert [ep.value for ep in eps] == ["nbl_dist.serving.vllm_plugin:register"]
    code = ("import sys; from nbl_dist.serving.vllm_plugin import register, ARCHITECTURES; register(); register()\n"
            "from vllm import ModelRegistry\n"
            "from vllm.model_executor.models.registry import _LazyRegisteredModel\n"
            "from transformers import AutoConfig\n"
            "for a in ARCHITECTURES: assert isinstance(ModelRegistry.models[a], _LazyRegisteredModel), a\n"
            "assert AutoConfig.for_model('nbl_qwen3').model_type == 'nbl_qwen3'\n"
            "print(sorted(m for m in sys.modules if m in ('ray', 'nbl_dist.pipeline', 'nbl_dist.serving.vllm_models')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=user_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
