"""The target held frozen and the EAGLE-3 draft beside it (docs/method.md §14). Plain torch, no Ray.

TargetTaps runs the target (an original or an nbl-dist output) through model/shard_model.py's forward loop over
every layer and keeps what the draft reads: the residual stream ENTERING each aux layer i (id 0 is the embedding),
which is what vLLM's EAGLE-3 interface hands the draft (EagleModelMixin: hidden + residual before layer i), and
the target's next-token logits over the draft vocabulary (its final norm and the lm_head rows the draft can
propose). The loop runs the linearized layers of an nbl-dist output as they are; transformers' output_hidden_states
would not (it records LlamaDecoderLayer outputs only and skips a linearized layer).

The draft is speculators' Eagle3DraftModel (its modules, config and save_pretrained: the format vLLM loads), with
sdpa attention. Its training forward is `ttt_logits` below rather than the model's own `forward`: the same
computation (tests/serving/test_drafting.py checks the two agree) over a batch of rows instead of one packed row
with document ids, which (a) returns the logits, so the loss of a global batch split over workers can be divided
by the global batch's positions (speculators' forward returns each call's mean), and (b) attends within a row only
(a packed row of B sequences builds a dense (BT, 3BT) mask and does B times the attention work on CPU).

One TTT (training-time test) unroll, per position t of a row (after speculators' shift: taps g_t, token x_{t+1}):
step 0 reads [embed(x_{t+1}), fc(norm(g_t))] and predicts token t+2; step j reads the token the data has there
(teacher forcing) and the hidden state step j - 1 produced at t, attends to step 0's keys up to t and to its own
earlier steps' keys at t only, and predicts token t+2+j, at rotary position t+1+j.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

# The layer config fields a draft copies from its target (the rest take LlamaConfig's defaults).
LAYER_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters",
                "rope_scaling", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


class TargetTaps:
    """The target, frozen, in the forward dtype on the device.

    Args:
        target_dir: the target folder (safetensors; an nbl-dist output's linearized layers included).
        aux_layers: the sorted layer ids whose input the draft reads.
        draft_ids: (Vd,) the target ids of the draft vocabulary, in draft order.
        dtype, device: the target's forward dtype and device.
    """

    def __init__(self, target_dir: str | Path, aux_layers: list[int], draft_ids: torch.Tensor, dtype: torch.dtype,
                 device: torch.device):
        from transformers import AutoConfig

        from nbl_dist.model.shard_model import ShardModel

        self.n_layers = AutoConfig.from_pretrained(target_dir).num_hidden_layers
        self.shard = ShardModel(str(target_dir), 0, self.n_layers, embed=True, dtype=dtype, device=device)
        self.shard.load_head(str(target_dir))
        for module in (*self.shard.layers.values(), self.shard.embed_tokens, self.shard.final_norm,
                       self.shard.lm_head):
            module.requires_grad_(False)
        self.aux = sorted(aux_layers)
        self.head_rows = self.shard.lm_head.weight[draft_ids.to(device)]  # (Vd, d)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) -> (taps (B, T, n_aux d), logits over the draft vocabulary (B, T, Vd)), float32."""
        return self.outputs(self.features(ids))

    @property
    def width(self) -> int:
        """Features per token: the taps and the final-normed last hidden state, (n_aux + 1) d."""
        return (len(self.aux) + 1) * self.shard.config.hidden_size

    @torch.no_grad()
    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> (B, T, (n_aux + 1) d) in the forward dtype: the taps, then the last layer's output
        through the final norm. Everything the draft's training reads of the target, and d per tap instead of the
        draft vocabulary's Vd logits (8192 against 576 for SmolLM2): what TargetCache keeps."""
        sh = self.shard
        h, start, taps = sh.embed(ids), 0, []
        for i in self.aux:
            h = sh.forward(h, layers=range(start, i))  # (B, T, d): the stream entering layer i
            taps.append(h)
            start = i
        h = sh.forward(h, layers=range(start, self.n_layers))
        return torch.cat([*taps, sh.final_norm(h)], dim=-1)

    @torch.no_grad()
    def outputs(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, (n_aux + 1) d) -> (taps (B, T, n_aux d), logits over the draft vocabulary (B, T, Vd)),
        float32; the head runs here, so kept features give the logits the target's forward would."""
        d = self.shard.config.hidden_size
        taps, normed = features.to(self.shard.device).split([self.width - d, d], dim=-1)
        return taps.float(), F.linear(normed, self.head_rows).float()


class TargetCache:
    """The target's features (TargetTaps.features) on a fixed set of sequences, computed when a sequence is first
    met and kept in host memory for the passes after, so that a pass after the first runs the draft alone (SmolLM2 on
    2 CPUs: a training step of 4 sequences takes 2.6 s of which 1.45 s is the target's forward; docs/method.md §14).
    Sequences past `budget` bytes are run through the target each time they are met.

    Args:
        target: TargetTaps.
        ids: (N, T) the sequences, indexed by row.
        budget: bytes this cache may hold (the first rows that fit are kept).
    """

    def __init__(self, target: TargetTaps, ids: torch.Tensor, budget: int):
        self.target, self.ids = target, ids
        n, t = ids.shape
        dtype = target.shard.dtype
        self.row_bytes = t * target.width * dtype.itemsize
        self.capacity = min(n, max(0, int(budget)) // self.row_bytes)  # rows 0 .. capacity - 1 are kept
        self.store = torch.empty(self.capacity, t, target.width, dtype=dtype)  # untouched pages cost nothing
        self.kept = torch.zeros(n, dtype=torch.bool)
        self.forwards = 0  # rows run through the target (tests count them)

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices (b,) -> the target's (taps, logits) of ids[rows], as TargetTaps would return them."""
        if bool(self.kept[rows].all()):
            return self.target.outputs(self.store[rows])
        features = self.target.features(self.ids[rows].to(self.target.shard.device))
        self.forwards += len(rows)
        keep = rows < self.capacity
        self.store[rows[keep]] = features[keep.to(features.device)].cpu()
        self.kept[rows[keep]] = True
        return self.target.outputs(features)


def layer_config(target_config: dict):
    """The draft's decoder layer: a LlamaConfig of one layer with the target's sizes, whatever the target's family
    (vLLM loads EAGLE-3 drafts of model_type llama or qwen3 only; the draft's layer is its own, not the target's)."""
    from transformers import LlamaConfig

    fields = {k: target_config[k] for k in LAYER_FIELDS if target_config.get(k) is not None}
    if "head_dim" not in fields:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    return LlamaConfig(**fields, num_hidden_layers=1, attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=False)


def draft_config(target_dir: str | Path, aux_layers: list[int], draft_vocab: int, speculative_tokens: int):
    """The draft's Eagle3SpeculatorConfig: one llama layer of the target's width, the aux layer ids written out
    (vLLM's own default collapses on small models), speculators' CLI defaults for the norms, and the verifier named
    by its absolute path (vLLM reads it from there when the draft is served alone)."""
    from speculators import SpeculatorsConfig, VerifierConfig
    from speculators.models.eagle3 import Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    target_dir = Path(target_dir).resolve()
    target = json.loads((target_dir / "config.json").read_text())
    layer = layer_config(target)
    layer._attn_implementation = "sdpa"  # flex attention (speculators' default) has no CPU backward
    return Eagle3SpeculatorConfig(
        transformer_layer_config=layer, draft_vocab_size=draft_vocab, norm_before_residual=True,
        norm_before_fc=True, norm_output=True, target_hidden_size=target["hidden_size"],
        eagle_aux_hidden_state_layer_ids=sorted(aux_layers),
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3", default_proposal_method="greedy",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=speculative_tokens)],
            verifier=VerifierConfig(name_or_path=str(target_dir), architectures=target.get("architectures", []))))


def config_from_dict(raw: dict):
    """An Eagle3SpeculatorConfig from a draft's config.json (sdpa attention for training)."""
    from speculators.models.eagle3 import Eagle3SpeculatorConfig

    config = Eagle3SpeculatorConfig.model_validate({k: v for k, v in raw.items() if k != "nbl_draft"})
    config.transformer_layer_config._attn_implementation = "sdpa"
    return config


def new_draft(config, embed: torch.Tensor, head_rows: torch.Tensor, draft_ids: torch.Tensor, seed: int):
    """A fresh Eagle3DraftModel: its own initialisation (seeded), the target's embedding (frozen) and the target's
    lm_head rows of the draft vocabulary as its head (speculators' load_verifier_weights does the same)."""
    from speculators.models.eagle3 import Eagle3DraftModel

    from nbl_dist.drafting.data import vocab_maps

    torch.manual_seed(seed)
    draft = Eagle3DraftModel(config)
    draft.load_vocab_mappings(*vocab_maps(draft_ids, embed.shape[0]))
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(embed)
        draft.lm_head.weight.copy_(head_rows)
    return draft


def load_draft(config, tensors: dict[str, torch.Tensor]):
    """An Eagle3DraftModel from its config and its saved tensors (a draft folder's model.safetensors, or the state a
    training checkpoint holds); the embedding, when the tensors leave it out, stays to be filled by the caller."""
    from speculators.models.eagle3 import Eagle3DraftModel

    draft = Eagle3DraftModel(config)
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    allowed = {"embed_tokens.weight", "verifier_norm.weight", "verifier_lm_head.weight"}
    if unexpected or set(missing) - allowed:
        raise ValueError(f"draft tensors do not match its config: missing {sorted(set(missing) - allowed)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    return draft


def draft_target_ids(draft) -> torch.Tensor:
    """(Vd,) the target id of each draft token: k + d2t[k] (k itself when the draft keeps the whole vocabulary,
    which speculators stores without d2t)."""
    if draft.d2t is None:
        return torch.arange(draft.draft_vocab_size)
    return torch.arange(draft.d2t.shape[0]) + draft.d2t.cpu()


def trainable_parameters(draft) -> list[torch.nn.Parameter]:
    """What training changes, in a fixed order (the same on every worker): the fc, the decoder layer and the norms.
    The embedding and the head stay the target's (speculators freezes them too: the head is the target's lm_head
    rows of the draft vocabulary), and the verifier's norm and head are unused (TargetTaps gives the targets)."""
    frozen = ("embed_tokens.", "lm_head.", "verifier_norm.", "verifier_lm_head.")
    params = []
    for name, p in draft.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
        if p.requires_grad:
            params.append(p)
    return params


def ttt_logits(draft, taps: torch.Tensor, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The draft's logits at each TTT step, teacher-forced (see the module docstring).

    Args:
        draft: an Eagle3DraftModel.
        taps: (B, T, n_aux d) the target's taps at positions 0..T-1.
        ids: (B, T) the tokens.
        steps: TTT steps.
    Returns:
        logits[j] (B, T - 1, Vd): at index i, the draft's prediction of token i + 2 + j (valid for i < T - 1 - j).
    """
    from transformers import DynamicCache

    b, t = ids.shape
    s = t - 1
    device = taps.device
    hidden = taps[:, :-1]  # (B, S, n d): g_i
    if draft.input_norm is not None:
        hidden = draft.input_norm(hidden)
    hidden = draft.fc(hidden)  # (B, S, d)
    tokens = ids[:, 1:]  # (B, S): x_{i+1}
    positions = torch.arange(1, t, device=device).unsqueeze(0).expand(b, s)  # (B, S)
    mask = torch.ones(s, s, dtype=torch.bool, device=device).tril().view(1, 1, s, s)  # step 0: causal
    diagonal = torch.eye(s, dtype=torch.bool, device=device).view(1, 1, s, s)
    cache = DynamicCache()
    out = []
    for j in range(steps):
        with torch.no_grad():
            embeds = draft.embed_tokens(tokens)  # (B, S, d)
        x = torch.cat([embeds, hidden], dim=-1)  # (B, S, 2d)
        rotary = draft.rotary_emb(x, positions)
        for layer in draft.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      cache_position=torch.arange(j * s, (j + 1) * s, device=device), position_embeddings=rotary)
        if draft.config.norm_output:
            x = draft.norm(x)
            logits = draft.lm_head(x)
        else:
            logits = draft.lm_head(draft.norm(x))
        out.append(logits)  # (B, S, Vd)
        hidden = x
        tokens = torch.cat([ids[:, 2 + j:], ids.new_zeros(b, 1 + j)], dim=1)  # (B, S): x_{i+2+j}, 0 past the end
        mask = torch.cat([mask, diagonal], dim=-1)
        positions = positions + 1
    return out
