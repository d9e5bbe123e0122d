"""vLLM serves `nbl-dist quantize`'s W4A16 folders with the plugin: in float32 through the plugin's kernel
(nbl_dist/serving/wna16_float32.py; vLLM's CPU build has none), prompt log-probs and greedy tokens equal
transformers' on the same folder for every family with layer 0 linearized, maps quantized or kept; the linearized
layers still hold no KV cache; in bfloat16 vLLM's own CPU kernel serves it and says so in its log.

The folders are the ones the main suite quantized in this `make test` (tests/quantized_tiny.py), built here when
this suite runs alone."""

import logging

import pytest
import torch

from nbl_dist.runtime.vllm_engine import kv_capacity_tokens
from tests import quantized_tiny
from tests.serving.conftest import reference, vllm_engine
from tests.serving.test_vllm import NEW_TOKENS, TINY_ATOL, TINY_PROMPTS, assert_same, closed_form_kv_tokens, served, \
    tokenize

pytestmark = pytest.mark.slow
WNA16_LOGGER = "vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_wNa16"


@pytest.fixture(scope="module")
def quantized():
    return quantized_tiny.cached()


def kernels(model) -> dict[str, str]:
    """Each quantized layer kind (qkv_proj, nbl_linear, ...) -> the kernel or linear method that runs it."""
    found = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None or name.endswith(("embed_tokens", "lm_head", "attn")):  # attn: its KV-cache method
            continue
        kernel = getattr(getattr(module, "scheme", None), "kernel", None)
        found[name.rsplit(".", 1)[-1]] = type(kernel or method).__name__
    return found


# Tolerance: TINY_ATOL (1e-5 nats), the unquantized serving tests' own. Both sides compute in float32 from the same
# dequantized weights ((q - 8) x scale, exact in float32 to one rounding), so what differs is what differs for an
# unquantized folder (kernel order of the sums); measured 1.3e-6 here. vLLM's bfloat16 kernel would miss it by
# three orders of magnitude (0.03 nats measured), so the float32 path really is the plugin's kernel.
@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2", "qwen3", "llama-keep"])
def test_quantized_folder_served_like_transformers(quantized, case):
    from transformers import AutoModelForCausalLM

    import nbl_dist  # noqa: F401  the nbl_<family> classes for transformers

    out = quantized / f"{case}-w4a16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = tokenize(out, TINY_PROMPTS)
    want = reference(model, prompts, NEW_TOKENS)
    with vllm_engine(out) as llm:
        used = llm.apply_model(kernels)[0]
        got = served(llm, prompts)
        capacity, block = kv_capacity_tokens(llm), llm.llm_engine.vllm_config.cache_config.block_size
    worst = assert_same(got, want, TINY_ATOL)
    print(f"{case}: largest log-prob difference {worst:.2e}; kernels {used}; KV cache {capacity:,} tokens")
    maps = "UnquantizedLinearMethod" if case.endswith("keep") else "Float32WNA16LinearKernel"
    assert used == {"qkv_proj": "Float32WNA16LinearKernel", "o_proj": "Float32WNA16LinearKernel",
                    "gate_up_proj": "Float32WNA16LinearKernel", "down_proj": "Float32WNA16LinearKernel",
                    "nbl_linear": maps}
    layers = model.config.num_hidden_layers - len(quantized_tiny.LINEARIZED)
    assert capacity == closed_form_kv_tokens(model.config, layers, block)


def test_bfloat16_uses_vllms_cpu_kernel(quantized):
    """In bfloat16 the plugin's kernel declines and vLLM's CPUWNA16 runs every quantized layer, the map included,
    naming itself in the log; the greedy tokens come out (bfloat16 rounding moves log-probs by ~0.03 nats here, so
    only the float32 path is compared with transformers)."""
    from vllm import SamplingParams

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(WNA16_LOGGER)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        from nbl_dist.runtime.vllm_engine import open_llm

        with open_llm(quantized / "llama-w4a16", dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0,
                      distributed_executor_backend="uni", disable_log_stats=True) as llm:
            used = llm.apply_model(kernels)[0]
            text = llm.generate(TINY_PROMPTS[:1], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert set(used.values()) == {"CPUWNA16LinearKernel"} and "nbl_linear" in used
    assert len(text.token_ids) == 8
    assert any("Using CPUWNA16LinearKernel for CompressedTensorsWNA16" in r.getMessage() for r in records), \
        [r.getMessage() for r in records]


@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize("shape,group", [((1536, 576), 64), ((576, 1536), 128), ((96, 64), 32), ((64, 96), 96)])
def test_float32_kernel_dequantizes_the_packed_words(monkeypatch, shape, group, little_endian):
    """The plugin kernel's weight from words packed by compressed-tensors' own packer equals q x scale from
    the signed values themselves, exactly (one float32 product each), by the byte split (little-endian machines)
    and by the shifts (the other path); its product with an input matches float64's to float32 round-off (1e-6 of
    the output's scale; sums of 64-1536 products)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from nbl_dist.serving import wna16_float32

    monkeypatch.setattr(wna16_float32, "LITTLE_ENDIAN", little_endian)
    out, inputs = shape
    g = torch.Generator().manual_seed(out + inputs + group)
    q = torch.randint(-8, 8, (out, inputs), generator=g, dtype=torch.int8)
    scales = torch.rand(out, inputs // group, generator=g) * 0.02 + 1e-3
    want = (q.float().view(out, -1, group) * scales.unsqueeze(-1)).view(out, inputs)
    got = wna16_float32.dequantize(pack_to_int32(q, 4), scales)  # (out, in / 8) int32, as the checkpoint holds it
    assert torch.equal(got, want)
    x = torch.randn(3, inputs, generator=g)
    ref = x.double() @ want.double().t()
    assert (torch.nn.functional.linear(x, got).double() - ref).abs().max() < 1e-6 * ref.abs().max()
