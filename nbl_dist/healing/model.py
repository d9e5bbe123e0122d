"""HealModel: the original model held once, with the K linearized layers' maps beside it (docs/method.md §12).

The teacher (the original) and the student (the linearized model) differ only in K layers: the student's layer i
is an NBLDecoderLayer sharing layer i's post-attention norm and MLP (linearize_layer), so every frozen weight is
in memory once. Both are the same up to the first linearized layer, so that prefix runs once per batch, without
a graph; from there the teacher runs the original layers (no graph) and the student the linearized ones (a graph
through the trained maps only: every other parameter is frozen). The model is the baseline's ShardModel over every
layer, read from its safetensors files; the maps start from the output folder's fit. Plain torch, no Ray.

Sharded (a device mesh given: Ray Train's workers, when one cannot hold the model), each layer's attention and MLP
are split over the workers by FSDP2 (fully_shard) as soon as that layer is read, so no worker ever holds more than
its share and one whole layer; a module's call gathers it (teacher and student alike) and frees it after, and the
backward pass gathers it again. Every worker then has to make the same calls in the same order (Healer.heldout).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nbl_dist.model.safetensors_io import load_tensors
from nbl_dist.model.shard_model import ShardModel
from nbl_dist.model.surgery import linearize_layer


class TrainableMap(nn.Module):
    """A linearized layer's map x -> W x + b as healing trains it, in float32 whatever the frozen weights' dtype.

    Without LoRA, W and b are the trained parameters. With rank r, W and b are frozen and a rank-r update
    (alpha / r) B A is trained (A (r, d) Kaiming-uniform, B (d, r) zero, so training starts from the fit; the
    research recipe's LoRA of the linear replacements), merged into W on save.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, lora_rank: int | None = None,
                 lora_alpha: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        weight, bias = weight.detach().float().clone(), bias.detach().float().clone()
        if lora_rank is None:
            self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
            self.scale = 0.0
            return
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        d = weight.shape[1]
        a = torch.empty(lora_rank, d)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_a = nn.Parameter(a.to(weight.device))  # (r, d)
        self.lora_b = nn.Parameter(torch.zeros(weight.shape[0], lora_rank, device=weight.device))  # (d, r)
        self.scale = lora_alpha / lora_rank

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (d, d), b (d,)) as the layer applies them: with LoRA, W + (alpha / r) B A."""
        if not self.scale:
            return self.weight, self.bias
        return self.weight + self.scale * (self.lora_b @ self.lora_a), self.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        w, b = self.merged()
        return F.linear(h.to(w.dtype), w, b).to(h.dtype)


def sharded_shard_model(baseline_dir: str, n_layers: int, dtype: torch.dtype, device: torch.device,
                        mesh) -> ShardModel:
    """A ShardModel over every layer whose attention and MLP modules are FSDP2-sharded over `mesh`, read one layer
    at a time (each sharded before the next is read): the embedding and norms stay whole."""
    from torch.distributed.fsdp import fully_shard

    model = ShardModel(baseline_dir, 0, 0, embed=True, dtype=dtype, device=device)
    for i in range(n_layers):
        layer = ShardModel(baseline_dir, i, i + 1, embed=False, dtype=dtype, device=device).layers[i]
        for module in (model.adapter.attention(layer), model.adapter.kept_blocks(layer)[1]):
            module.requires_grad_(False)
            fully_shard(module, mesh=mesh)
        model.layers[i] = layer
    model.end = n_layers
    return model


class HealModel:
    """The baseline's layers (teacher), the K maps (student), the shared embedding, final norm and head.

    Args:
        baseline_dir: the original checkpoint (safetensors).
        model_dir: the nbl-dist output folder whose maps start the training.
        layers: the linearized layers (config.json's nbl.linearized_layers).
        dtype, device: the frozen weights' dtype and the device.
        lora_rank, lora_alpha: train a rank-r update of each W instead of W and b.
        seed: LoRA's initialisation (the same on every worker).
        mesh: a 1-D torch DeviceMesh over the workers to shard the frozen layers over (FSDP2), or None.
    """

    def __init__(self, baseline_dir: str | Path, model_dir: str | Path, layers: list[int], dtype: torch.dtype,
                 device: torch.device, lora_rank: int | None = None, lora_alpha: float | None = None, seed: int = 0,
                 mesh=None):
        from transformers import AutoConfig

        n_layers = AutoConfig.from_pretrained(baseline_dir).num_hidden_layers
        self.sharded = mesh is not None
        if mesh is None:
            self.shard = ShardModel(str(baseline_dir), 0, n_layers, embed=True, dtype=dtype, device=device)
        else:
            self.shard = sharded_shard_model(str(baseline_dir), n_layers, dtype, device, mesh)
        self.shard.load_head(str(baseline_dir))
        for module in (*self.shard.layers.values(), self.shard.embed_tokens, self.shard.final_norm,
                       self.shard.lm_head):
            module.requires_grad_(False)
        adapter, d = self.shard.adapter, self.shard.config.hidden_size
        keys = [k for i in layers for k in adapter.nbl_keys(i)]
        fits, _ = load_tensors(str(model_dir), keys, device=device, dtype=torch.float32)
        self.layers = sorted(layers)
        self.student: dict[int, nn.Module] = {}
        for i in self.layers:
            layer = linearize_layer(self.shard.layers[i], i, adapter, d)
            w_key, b_key = adapter.nbl_keys(i)
            generator = torch.Generator().manual_seed(seed * 100_003 + i)
            layer.nbl_linear = TrainableMap(fits[w_key], fits[b_key], lora_rank, lora_alpha, generator)
            self.student[i] = layer
        self.maps: dict[int, TrainableMap] = {i: m.nbl_linear for i, m in self.student.items()}
        self.n_layers = n_layers

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The trained tensors, in a fixed order (layer, then W/b or A/B): the same on every worker."""
        return [p for i in self.layers for p in self.maps[i].parameters() if p.requires_grad]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (n, d), already normed -> logits (n, V)."""
        return self.shard.lm_head(h)

    def forward(self, ids: torch.Tensor, teacher: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(student, teacher) final hidden states (B, T, d), final norm applied, of token ids (B, T); the teacher's
        only when asked (the ce loss alone needs none). The student's carries the graph of the trained maps."""
        sh, first = self.shard, self.layers[0]
        with torch.no_grad():
            prefix = sh.forward(sh.embed(ids), layers=range(0, first))  # (B, T, d): the same in both models
            t = sh.final_norm(sh.forward(prefix, layers=range(first, self.n_layers))) if teacher else None
        s = sh.final_norm(sh.forward(prefix, replace=self.student, layers=range(first, self.n_layers)))
        return s, t

    def merged_maps(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> (W, b) as trained (LoRA merged), float32 on the CPU."""
        with torch.no_grad():
            return {i: tuple(t.detach().float().cpu().clone() for t in self.maps[i].merged()) for i in self.layers}
