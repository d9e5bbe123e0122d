"""ShardWorker: one contiguous range of decoder layers, loaded alone from the checkpoint, run on micro-batches
that stream through, accumulating each layer's statistics in place.

An ordinary class: unit tests drive it directly, the in-process chain calls it in a loop, and the Ray backend wraps
it as an actor. It never imports Ray. Activations enter and leave as numpy arrays (zero-copy through Ray's object
store); bf16 travels as its raw 16-bit pattern, since numpy has no bfloat16.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from nbl_dist.arch import adapter_for, build_rotary, meta_model
from nbl_dist.capture import capture_stats
from nbl_dist.checkpoint import load_tensors, torch_dtype, weight_map
from nbl_dist.errors import CheckpointError
from nbl_dist.linalg import LinearFit, layer_scores, lmmse_fit
from nbl_dist.linearized import linearize_layer
from nbl_dist.stats import LayerStats

Wire = dict  # {"data": np.ndarray, "dtype": str}: activations between stages


def to_wire(t: torch.Tensor) -> Wire:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return {"data": t.view(torch.int16).numpy(), "dtype": "bfloat16"}
    return {"data": t.numpy(), "dtype": str(t.dtype).removeprefix("torch.")}


def readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a numpy array without copying. Ray hands out zero-copy, read-only arrays; nothing here
    writes into its inputs (every op makes a new tensor), so torch's warning about them does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(a))


def from_wire(w: Wire, device: torch.device) -> torch.Tensor:
    t = readonly_tensor(w["data"])
    if w["dtype"] == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device)


class ShardWorker:
    """Holds decoder layers [start, end) of one pipeline replica.

    Args:
        model_dir: checkpoint folder (safetensors); every node must see it at this path.
        start, end: the layer range.
        embed: whether this stage also embeds token ids (the first stage).
        dtype: forward dtype name ("float32", "bfloat16", ...).
        device: "cpu" or "cuda" (the GPU Ray assigned, on a cluster).
        stats_device: where the float64 statistics live (default: device).
        replica, stage: this worker's coordinates, for the report.
        num_threads: torch intra-op threads (match the CPUs reserved for the actor).
        checkpoint_dir: where this worker saves its statistics and the ids of the micro-batches they hold.
        checkpoint_every: save after this many newly accumulated micro-batches (0: only when asked).
        restore: start from this worker's checkpoint in checkpoint_dir, if there is one.
        fingerprint: written into the checkpoint and checked on restore (model, data, options).
    """

    def __init__(self, model_dir: str, start: int, end: int, *, embed: bool, dtype: str = "float32",
                 device: str = "cpu", stats_device: str | None = None, replica: int = 0, stage: int = 0,
                 num_threads: int | None = None, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 restore: bool = False, fingerprint: str = ""):
        t0 = time.perf_counter()
        from transformers import AutoConfig

        if num_threads:
            torch.set_num_threads(num_threads)
        self.replica, self.stage, self.start, self.end, self.embed = replica, stage, start, end, embed
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        config = AutoConfig.from_pretrained(model_dir)
        config._attn_implementation = "sdpa"  # causal masking from is_causal: no (T, T) mask to build or ship
        self.config, self.adapter = config, adapter_for(config)

        meta = meta_model(config)
        mine = range(start, end)
        keys = [k for k in weight_map(model_dir) if self.adapter.layer_of_key(k) in mine]
        if embed:
            keys.append(self.adapter.embed_key)
        t_read = time.perf_counter()
        tensors, self.bytes_read = load_tensors(model_dir, keys, device=self.device, dtype=self.dtype)
        t_read = time.perf_counter() - t_read
        self.loaded_keys = sorted(keys)

        self.layers: dict[int, torch.nn.Module] = {}
        all_layers = self.adapter.layers(meta)
        for i in mine:
            prefix = self.adapter.layer_key_prefix(i)
            layer = all_layers[i]
            layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                  strict=True, assign=True)
            self.layers[i] = layer.eval()
        decoder = self.adapter.decoder(meta)
        self.embed_tokens = None
        if embed:
            self.embed_tokens = decoder.embed_tokens
            self.embed_tokens.load_state_dict({"weight": tensors[self.adapter.embed_key]}, assign=True)
        self.rotary = build_rotary(type(decoder.rotary_emb), config, self.device)
        del tensors, meta

        d = config.hidden_size
        self.stats_device = torch.device(stats_device or device)
        self.stats = {i: LayerStats.empty(d, self.stats_device) for i in mine}
        self.fits: dict[int, LinearFit] = {}
        self.candidates: dict[int, torch.nn.Module] = {}  # layer -> that layer linearized (loss rule)
        self.score_cache: dict[int, torch.Tensor] = {}  # held-back block -> this stage's input
        self.final_norm = self.lm_head = None
        # load: the whole constructor; read: the weights alone (the rest is mostly transformers' module imports)
        self.timings = {"load": time.perf_counter() - t0, "read": t_read, "forward": 0.0, "statistics": 0.0,
                        "wait": 0.0, "checkpoint": 0.0, "calls": 0}
        self.bytes_out = 0
        self.batches_done = 0
        self._last_return = None
        # Micro-batch ids whose activations are in self.stats: a replayed id is forwarded, not counted again.
        self.done: set[int] = set()
        self.replayed_forward = 0
        self.fingerprint = fingerprint
        self.checkpoint_every = checkpoint_every
        self._since_checkpoint = 0
        self.checkpoint_path = (Path(checkpoint_dir) / f"replica{replica:03d}_stage{stage:03d}.safetensors"
                                if checkpoint_dir else None)
        self.restored_batches = self._restore() if restore else 0

    # ------------------------------------------------------------------ phases
    def info(self) -> dict:
        """Where this worker runs and what it loaded (for the plan printout and the report)."""
        return {"replica": self.replica, "stage": self.stage, "layers": [self.start, self.end],
                "embed": self.embed, "host": socket.gethostname(), "pid": os.getpid(), "node": "local",
                "device": str(self.device), "bytes_read": self.bytes_read, "keys": self.loaded_keys}

    @torch.no_grad()
    def run_batch(self, inp, last: bool = False, batch_id: int = -1):
        """Run this shard's layers on one micro-batch.

        Args:
            inp: (B, T) int64 token ids (numpy) on the first stage, else a Wire of (B, T, d) hidden states.
            last: return only a receipt instead of the activations (nothing downstream needs them).
        Returns:
            Wire of (B, T, d) hidden states, or {"tokens": B*T, "batch": batch_id} when last.
        """
        now = time.perf_counter()
        if self._last_return is not None:
            self.timings["wait"] += now - self._last_return
        h = self._input(inp)  # (B, T, d)
        bsz, t = h.shape[:2]
        timer = {"statistics": 0.0}
        fresh = batch_id < 0 or batch_id not in self.done
        capture = capture_stats(self.layers, self.stats, self.adapter, tag=f" (micro-batch {batch_id})",
                                timer=timer) if fresh else contextlib.nullcontext()
        with capture:
            h = self._run_layers(h)
        if fresh and batch_id >= 0:
            self.done.add(batch_id)
            self._since_checkpoint += 1
        else:
            self.replayed_forward += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        spent = time.perf_counter() - now
        self.timings["statistics"] += timer["statistics"]
        self.timings["forward"] += spent - timer["statistics"]
        self.timings["calls"] += 1
        self.batches_done += 1
        if last:
            out = {"tokens": bsz * t, "batch": batch_id}
        else:
            out = to_wire(h)
            self.bytes_out += out["data"].nbytes
        if self.checkpoint_every and self._since_checkpoint >= self.checkpoint_every:
            self.checkpoint()
        self._last_return = time.perf_counter()
        return out

    def _input(self, inp) -> torch.Tensor:
        """(B, T, d) hidden states: embedded token ids on the first stage, the upstream output elsewhere."""
        if self.embed:
            ids = readonly_tensor(inp).to(self.device, torch.long)  # (B, T)
            return self.embed_tokens(ids)
        return from_wire(inp, self.device)

    def _run_layers(self, h: torch.Tensor, replace: int | None = None) -> torch.Tensor:
        """Run this shard's layers on h (B, T, d); layer `replace` uses its fitted map instead of attention."""
        pos = torch.arange(h.shape[1], device=self.device).unsqueeze(0)  # (1, T)
        cos_sin = self.rotary(h, pos)
        for i in range(self.start, self.end):
            if i == replace:
                h = self.candidates[i](h)  # the NBLDecoderLayer a linearized checkpoint would hold
            else:
                h = self.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin,
                                   use_cache=False)
        return h

    # ------------------------------------------------------------------ the measured rule (loss)
    def load_head(self, model_dir: str) -> int:
        """Read the final norm and lm_head (the last stage, only when the loss rule is asked for)."""
        from torch import nn

        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        head_key = self.adapter.embed_key if tied else self.adapter.lm_head_key
        t, nbytes = load_tensors(model_dir, [self.adapter.final_norm_key, head_key], self.device, self.dtype)
        self.final_norm = type(self.layers[self.start].post_attention_layernorm)(
            self.config.hidden_size, eps=self.config.rms_norm_eps).to(self.device, self.dtype)
        self.final_norm.weight.data = t[self.adapter.final_norm_key]
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(t[head_key], requires_grad=False)
        self.bytes_read += nbytes
        return nbytes

    def _loss(self, h: torch.Tensor, ids) -> dict:
        """Summed next-token cross-entropy (float64) of hidden states h (B, T, d) against ids (B, T)."""
        ids = readonly_tensor(ids).to(self.device, torch.long)
        logits = self.lm_head(self.final_norm(h))[:, :-1]  # (B, T-1, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        return {"loss_sum": float(loss.double()), "tokens": int(ids[:, 1:].numel())}

    @torch.no_grad()
    def score_batch(self, key: int, inp=None, layer: int | None = None, ids=None, cache: bool = False):
        """Forward of a held-back block for the loss rule; no statistics are touched.

        Without inp, the input cached under `key` is used (a candidate restarting at this stage). With inp, that
        input is used, and kept under `key` only when `cache` (the baseline pass): a candidate's modified
        activations flowing downstream must never replace the baseline a later candidate restarts from.
        `layer` (one of this shard's) runs with its fitted map. The last stage (given ids) returns the summed
        loss; others return their output.
        """
        h = self.score_cache[key] if inp is None else self._input(inp)
        if cache:
            self.score_cache[key] = h
        h = self._run_layers(h, replace=layer)
        return self._loss(h, ids) if ids is not None else to_wire(h)

    def prepare_candidates(self, layers: list[int]) -> int:
        """Build each of `layers` linearized with its fitted map (forward dtype, on the device), sharing the
        layer's MLP block, for candidate passes."""
        for i in layers:
            self._set_candidate(i, self.fits[i].weight, self.fits[i].bias)
        return len(layers)

    @torch.no_grad()
    def _set_candidate(self, i: int, w: torch.Tensor, b: torch.Tensor) -> None:
        cand = linearize_layer(self.layers[i], i, self.config.hidden_size)
        cand.nbl_linear.weight.copy_(w)
        cand.nbl_linear.bias.copy_(b)
        self.candidates[i] = cand

    def candidate_map(self, layer: int) -> tuple[Wire, Wire]:
        lin = self.candidates[layer].nbl_linear
        return to_wire(lin.weight), to_wire(lin.bias)

    def set_candidate(self, layer: int, wb: tuple) -> None:
        """Receive a candidate map fitted on another replica's actor (same layer range)."""
        self._set_candidate(layer, from_wire(wb[0], self.device), from_wire(wb[1], self.device))

    def clear_scoring(self) -> None:
        self.score_cache.clear()
        self.candidates.clear()

    def done_batches(self) -> list[int]:
        return sorted(self.done)

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> str | None:
        """Save statistics and done ids in one file, atomically (temp file, fsync, rename)."""
        if self.checkpoint_path is None:
            return None
        from safetensors.numpy import save_file

        t0 = time.perf_counter()
        arrays = {f"layer{i}.{k}": np.ascontiguousarray(v) for i, s in self.stats.items()
                  for k, v in s.to_numpy().items()}
        meta = {"done": json.dumps(sorted(self.done)), "layers": f"{self.start},{self.end}",
                "fingerprint": self.fingerprint}
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        save_file(arrays, str(tmp), metadata=meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.checkpoint_path)
        self._since_checkpoint = 0
        self.timings["checkpoint"] += time.perf_counter() - t0
        return str(self.checkpoint_path)

    def _restore(self) -> int:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return 0
        from safetensors import safe_open

        with safe_open(str(self.checkpoint_path), framework="numpy") as f:
            meta = f.metadata()
            if meta.get("fingerprint") != self.fingerprint or meta.get("layers") != f"{self.start},{self.end}":
                raise CheckpointError(
                    f"{self.checkpoint_path} was saved by a different run (model, data, options or shard "
                    "layout differ); delete the checkpoint folder or use another --checkpoint-dir")
            for i in self.stats:
                prefix = f"layer{i}."
                arrays = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
                self.stats[i] = LayerStats.from_numpy(arrays, device=self.stats_device)
        self.done = set(json.loads(meta["done"]))
        return len(self.done)

    def export_layer(self, layer: int) -> dict[str, np.ndarray]:
        """One layer's statistics as numpy, for a merge on another actor through the object store."""
        return self.stats[layer].to_numpy()

    def merge_layer(self, layer: int, arrays: dict[str, np.ndarray]) -> int:
        """Chan-merge another replica's statistics of `layer` into this shard's. Returns the merged token count.

        The incoming arrays are read where Ray mapped them (no copy on the host; one copy onto a GPU), so a call
        holds one layer's extra statistics; RayBackend.reduce keeps two in flight, within the planner's
        score/fit workspace."""
        self.stats[layer].merge_(LayerStats.from_numpy(arrays, self.stats_device, copy=False))
        return self.stats[layer].n

    def scores(self, ridge: float | None = None) -> list[dict]:
        """Every ranking score of every layer held here: scalars only."""
        return [layer_scores(i, self.stats[i], ridge).to_dict() for i in range(self.start, self.end)]

    def fit(self, layers: list[int], ridge: float | None = None) -> dict[int, float]:
        """Fit the LMMSE maps of `layers` (a subset of this shard's); the maps stay here until fetched."""
        for i in layers:
            self.fits[i] = lmmse_fit(self.stats[i], ridge)
        return {i: self.fits[i].ridge for i in layers}

    def get_fit(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        f = self.fits.pop(layer)
        return f.weight.cpu().numpy(), f.bias.cpu().numpy()

    def report(self) -> dict:
        """Timings, bytes and peak memory of this worker."""
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        out = {"replica": self.replica, "stage": self.stage, "timings": dict(self.timings),
               "bytes_out": self.bytes_out, "batches": self.batches_done, "peak_rss_bytes": peak_rss,
               "restored_batches": self.restored_batches, "replayed_forward": self.replayed_forward}
        if self.device.type == "cuda":
            out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out
