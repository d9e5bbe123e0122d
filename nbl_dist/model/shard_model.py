"""ShardModel: decoder layers [start, end) of a checkpoint, read alone from its safetensors files, with what a
forward through them needs (the embedding on the first stage, the rotary embedding, the head on the last)."""

from __future__ import annotations

import time

import torch
from torch import nn

from nbl_dist.core.losses import next_token_sums
from nbl_dist.model.arch import adapter_for, meta_model
from nbl_dist.model.safetensors_io import load_tensors, weight_map


class ShardModel:
    """The shard's modules, in the forward dtype on the device.

    Args:
        model_dir: checkpoint folder (safetensors); every node must see it at this path.
        start, end: the layer range.
        embed: whether this shard also embeds token ids (the first stage).
        dtype, device: forward dtype and device.
    """

    def __init__(self, model_dir: str, start: int, end: int, *, embed: bool, dtype: torch.dtype,
                 device: torch.device):
        from transformers import AutoConfig

        self.start, self.end, self.dtype, self.device = start, end, dtype, device
        config = AutoConfig.from_pretrained(model_dir)
        config._attn_implementation = "sdpa"  # causal masking from is_causal: no (T, T) mask to build or ship
        self.config, self.adapter = config, adapter_for(config)
        meta = meta_model(config)
        keys = [k for k in weight_map(model_dir) if self.adapter.layer_of_key(k) in range(start, end)]
        keys += [self.adapter.embed_key] if embed else []
        t0 = time.perf_counter()
        tensors, self.bytes_read = load_tensors(model_dir, keys, device=device, dtype=dtype)
        self.read_s = time.perf_counter() - t0
        self.loaded_keys = sorted(keys)
        self.layers: dict[int, nn.Module] = self._assign_layers(meta, tensors)
        decoder = self.adapter.decoder(meta)
        self.embed_tokens = None
        if embed:
            self.embed_tokens = self.adapter.embed_tokens(decoder)
            self.embed_tokens.load_state_dict({"weight": tensors[self.adapter.embed_key]}, assign=True)
        self.rotary = self.adapter.rebuild_rotary(decoder, config, device)
        self.final_norm: nn.Module | None = None
        self.lm_head: nn.Module | None = None

    def _assign_layers(self, meta: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[int, nn.Module]:
        """The meta model's layers [start, end) with the checkpoint's tensors assigned (nothing initialised)."""
        out, all_layers = {}, self.adapter.layers(meta)
        for i in range(self.start, self.end):
            prefix = self.adapter.layer_key_prefix(i)
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            all_layers[i].load_state_dict(own, strict=True, assign=True)
            out[i] = all_layers[i].eval()
        return out

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) hidden states (first stage only)."""
        return self.embed_tokens(ids.to(self.device, torch.long))

    def forward(self, h: torch.Tensor, replace: dict[int, nn.Module] | None = None,
                layers: range | None = None) -> torch.Tensor:
        """Run the shard's layers on h (B, T, d); a layer in `replace` runs that module instead. Only `layers`
        when given (a sub-range of the shard's: h is then the input of its first), else all of them."""
        pos = torch.arange(h.shape[1], device=self.device).unsqueeze(0)  # (1, T)
        cos_sin = self.rotary(h, pos)
        for i in layers if layers is not None else range(self.start, self.end):
            if replace and i in replace:
                h = replace[i](h)
            else:
                h = self.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin,
                                   use_cache=False)
        return h

    def load_head(self, model_dir: str) -> int:
        """Read the final norm and the output head (the last stage, when a measured rule needs the loss).
        Returns the bytes read (none when they are loaded already)."""
        if self.lm_head is not None:
            return 0
        a = self.adapter
        head_key = a.head_key(self.config)
        t, nbytes = load_tensors(model_dir, [a.final_norm_key, head_key], self.device, self.dtype)
        norm_cls = type(a.kept_blocks(self.layers[self.start])[0])
        self.final_norm = norm_cls(self.config.hidden_size, eps=self.config.rms_norm_eps).to(self.device, self.dtype)
        self.final_norm.weight.data = t[a.final_norm_key]
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(t[head_key], requires_grad=False)
        self.bytes_read += nbytes
        return nbytes

    def head_sums(self, h: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
        """The last stage's output h (B, T, d) through the final norm and the head: summed next-token loss against
        ids (B, T), and KL divergence from the original's output `reference` (evaluate.next_token_sums)."""
        return next_token_sums(lambda x: self.lm_head(self.final_norm(x)), h, ids, reference)
