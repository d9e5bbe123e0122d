"""A float32 W4A16 linear kernel for vLLM on CPU, which has none (docs/method.md §13).

vLLM's CPU build runs compressed-tensors W4A16 checkpoints with CPUWNA16LinearKernel, whose `cpu_gemm_wna16` op is
compiled for bfloat16 and float16 activations only: in float32 the engine starts and then fails at the first
request (`NotImplementedError: "cpu_gemm_wna16" not implemented for 'Float'`). This kernel takes exactly that case
(CPU, float32 activations, 4-bit symmetric weights, uint4b8) and nothing else: it keeps the packed int4 weight
(eight 4-bit values per int32 word, along the input, as compressed-tensors writes it) and its float32 scales in
memory, so the served weights stay about an eighth of float32's, and on every call unpacks them, subtracts the
offset 8 and multiplies by each group's scale, then runs F.linear. The dequantized weight exists only during the
call. That is the same arithmetic as transformers' compressed-tensors decompression (which keeps the float32
weights it decompresses), so vLLM in float32 serves a quantized folder as transformers computes it; bfloat16 and
float16 keep vLLM's own kernel. Decode is slower than the float32 original's (every call rebuilds every weight);
torch's own CPU int4 matmul (`aten._weight_int4pack_mm_for_cpu`), which never builds the weight, was measured here
and is slower still beyond one row of input (6 ms against 2.5 for a 1536 x 576 layer at 8 rows, 1.5 s against
26 ms at 2048). `register()` puts it in front of vLLM's CPU mixed-precision kernels
(vllm_plugin.register calls it in every vLLM process).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from vllm.model_executor.kernels.linear import MPLinearKernel, MPLinearLayerConfig
from vllm.platforms import current_platform
from vllm.scalar_type import scalar_types

BITS = 4
PER_WORD = 32 // BITS  # values per int32 word
OFFSET = 8  # uint4b8: the stored value is q + 8, q in [-8, 7]
LITTLE_ENDIAN = sys.byteorder == "little"  # the bytes of an int32 word in memory, low first


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 8) int32 words -> (out, in) uint8 stored values in [0, 15]: value j of a word is its bits
    4j..4j+3. On a little-endian machine byte i of a row's words holds values 2i (low nibble) and 2i + 1 (high), so
    the bytes are split rather than the words shifted eight times: half the time of the shifts, the same values."""
    if LITTLE_ENDIAN:
        b = packed.contiguous().view(torch.uint8)  # (out, in / 2)
        return torch.stack([b & 0xF, b >> 4], dim=-1).view(packed.shape[0], -1)
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=packed.device)  # (8,)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).reshape(packed.shape[0], -1).to(torch.uint8)


def dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight (out, in): (stored value - 8) times its group's scale; scales (out, groups), one group for
    a channel-wise scheme."""
    u = unpack_int4(packed)
    groups = scales.shape[1]
    w = u.view(u.shape[0], groups, -1).to(scales.dtype).sub_(OFFSET).mul_(scales.unsqueeze(-1))
    return w.view(u.shape[0], -1)


class Float32WNA16LinearKernel(MPLinearKernel):
    """W4A16 with float32 activations on CPU: packed int4 weights in memory, dequantized per call."""

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not current_platform.is_cpu():
            return False, "Float32WNA16 runs on CPU only"
        if c.act_type != torch.float32:
            return False, "Float32WNA16 takes float32 activations only (CPUWNA16 runs bfloat16 and float16)"
        if c.weight_type != scalar_types.uint4b8 or c.zero_points:
            return False, f"Float32WNA16 takes symmetric 4-bit weights (uint4b8), not {c.weight_type}"
        inputs = c.partition_weight_shape[0]
        if inputs % PER_WORD or (c.group_size != -1 and inputs % c.group_size):
            return False, f"input size {inputs} is not a whole number of words and groups ({c.group_size})"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Plain parameters (vLLM's loader classes are only needed while loading), packed weight as stored:
        # (out, in / 8) int32 words packed along the input, scales (out, groups) in the layer's dtype.
        self._transform_param(layer, self.w_q_name, lambda p: p.data.contiguous())
        self._transform_param(layer, self.w_s_name, lambda p: p.data.to(torch.float32).contiguous())

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed, scales, _ = self._get_weight_params(layer)
        return F.linear(x, dequantize(packed, scales), bias)


def register() -> None:
    """Put the kernel first in vLLM's CPU mixed-precision list (once): it declines every case but float32, which
    vLLM's own CPU kernels do not implement, so their choice for bfloat16 and float16 is unchanged."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.platforms import PlatformEnum

    kernels = _POSSIBLE_KERNELS.setdefault(PlatformEnum.CPU, [])
    if Float32WNA16LinearKernel not in kernels:
        kernels.insert(0, Float32WNA16LinearKernel)
