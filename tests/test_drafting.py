"""Drafting (nbl_dist/drafting) in the main environment, without speculators or vLLM: the target's taps against
transformers' own hidden states, the draft vocabulary and its maps, the positions each TTT step trains, and bad
input refused in one line before any weight is read. Training, the draft folder and vLLM serving it are in
tests/serving/test_drafting.py (they need speculators, which lives in .venv-vllm)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from nbl_dist.artifact.loading import load_linearized
from nbl_dist.cli import main
from nbl_dist.drafting.data import Sequences, draft_vocabulary, vocab_maps
from nbl_dist.drafting.model import TargetCache, TargetTaps
from nbl_dist.drafting.trainer import replay_rounds, step_masks
from tests.helpers import CORPUS, write_nbl_folder

LINEARIZED = [0, 2]  # of 4 layers; the default taps are [0, 1, 2]: layer 0 and a tapped layer among them
# TargetTaps runs the same float32 layers as transformers, called one by one: measured 0 to 1e-6 here.
TAPS_ATOL = 1e-5


@pytest.fixture(scope="module")
def folders(make_model_dir, tmp_path_factory):
    src = make_model_dir("llama")
    blocks = torch.randint(3, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    nbl = write_nbl_folder(src, tmp_path_factory.mktemp("draft") / "nbl", LINEARIZED, blocks)
    return src, nbl


def layer_inputs(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """transformers' own forward: the stream entering every decoder layer (pre-hooks, so a linearized layer counts
    like any other) and the logits."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else
                                                                                  kwargs["hidden_states"]),
                                             with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("which", ["original", "linearized"])
def test_taps_equal_transformers_hidden_states(folders, which):
    """The draft's inputs during training: the stream entering each aux layer and the target's logits over the
    draft vocabulary, equal to transformers' forward of the same folder (nbl-dist's modeling for the linearized
    one, whose tapped layers 0 and 2 have no attention)."""
    folder = folders[0] if which == "original" else folders[1]
    model = load_linearized(folder, dtype=torch.float32)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    aux, draft_ids = [0, 1, 2], torch.tensor([2, 5, 7, 100, 319])
    taps, logits = TargetTaps(folder, aux, draft_ids, torch.float32, torch.device("cpu"))(ids)
    want_inputs, want_logits = layer_inputs(model, ids)
    want = torch.cat([want_inputs[i] for i in aux], dim=-1)  # (B, T, 3 d)
    assert taps.shape == want.shape and logits.shape == (2, 24, 5)
    assert torch.allclose(taps, want, atol=TAPS_ATOL, rtol=0), float((taps - want).abs().max())
    assert torch.allclose(logits, want_logits[..., draft_ids], atol=TAPS_ATOL, rtol=0)


def test_target_cache_gives_the_targets_outputs_and_runs_each_kept_row_once(folders):
    """A pass after the first reads the kept features: the taps and logits equal the target's own forward of the same
    rows, no row under the budget runs the target twice, and rows past the budget run it every time they are met."""
    target = TargetTaps(folders[1], [0, 1, 2], torch.tensor([2, 5, 7, 100, 319]), torch.float32, torch.device("cpu"))
    ids = torch.randint(3, 320, (6, 16), generator=torch.Generator().manual_seed(2))
    row_bytes = 16 * 4 * target.shard.config.hidden_size * 4  # T x (3 taps + the normed last state) x d x float32
    cache = TargetCache(target, ids, budget=4 * row_bytes + row_bytes // 2)  # room for rows 0-3
    assert cache.capacity == 4
    for rows in ([1, 4], [0, 1], [3, 2, 5], [1, 0], [4, 5], [2, 3]):  # two passes in different orders
        rows = torch.tensor(rows)
        taps, logits = cache(rows)
        want_taps, want_logits = target(ids[rows])
        assert torch.allclose(taps, want_taps, atol=1e-6, rtol=0) and torch.allclose(logits, want_logits, atol=1e-6,
                                                                                      rtol=0)
    # A batch with a row not yet kept runs whole: 2 + 2 + 3 in the first pass; then only [4, 5], past the budget.
    assert cache.forwards == 2 + 2 + 3 + 0 + 2 + 0
    assert cache.kept.tolist() == [True] * 4 + [False] * 2


def test_draft_dtype_auto_is_bfloat16_where_the_hardware_computes_it(tmp_path, monkeypatch):
    """--draft-dtype auto: bfloat16 on GPUs and on a CPU whose flags name AVX512-BF16 or AMX-BF16, float32 on other
    CPUs and where the flags cannot be read; an explicit choice is kept."""
    from nbl_dist.drafting import pipeline
    from nbl_dist.runtime import resources

    info = tmp_path / "cpuinfo"
    for flags, native in (("fpu avx2 avx512f avx512_vnni", False), ("fpu avx512f avx512_bf16", True),
                          ("fpu amx_bf16 amx_tile", True)):
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert resources.cpu_has_native_bfloat16(str(info)) is native
    assert resources.cpu_has_native_bfloat16(str(tmp_path / "absent")) is False
    monkeypatch.setattr(resources, "cpu_has_native_bfloat16", lambda: False)
    assert pipeline.compute_dtype("auto", "cpu") == "float32" and pipeline.compute_dtype("auto", "cuda") == "bfloat16"
    assert pipeline.compute_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(resources, "cpu_has_native_bfloat16", lambda: True)
    assert pipeline.compute_dtype("auto", "cpu") == "bfloat16"
    assert pipeline.compute_dtype("float32", "cuda") == "float32"


def test_draft_vocabulary_and_maps():
    """The draft vocabulary is the most frequent generated tokens (ties: lower id), never a prompt or padding
    token; d2t maps draft id k to target id k + d2t[k], t2d marks the same ids."""
    ids = torch.tensor([[9, 9, 9, 4, 4, 7, 7, 1, 1],  # prompt 9 9 9, then 4 4 7 7 generated, 1 1 padding
                        [8, 8, 8, 7, 5, 5, 5, 6, 1]])  # prompt 8 8 8, then 7 5 5 5 6 generated, 1 padding
    seqs = Sequences(ids, torch.tensor([7, 8]), prompt_len=3)
    assert seqs.generated_tokens().tolist() == [4, 4, 7, 7, 7, 5, 5, 5, 6]
    keep, coverage = draft_vocabulary(seqs, vocab=10, size=3)
    assert keep.tolist() == [4, 5, 7] and coverage == pytest.approx(8 / 9)  # sorted target ids; 6 left out
    t2d, d2t = vocab_maps(keep, 10)
    assert (torch.arange(3) + d2t).tolist() == [4, 5, 7] and t2d.nonzero().flatten().tolist() == [4, 5, 7]


def test_each_ttt_step_trains_the_generated_positions_only():
    """Step j's entry i predicts token i + 2 + j from the target's distribution at i + 1 + j: trained iff that token
    is one the target generated (not the prompt, not padding after EOS)."""
    seqs = Sequences(torch.zeros(1, 10, dtype=torch.long), torch.tensor([8]), prompt_len=4)
    mask = seqs.loss_mask()
    assert mask[0].nonzero().flatten().tolist() == [3, 4, 5, 6]  # predicting tokens 4..7, the generated ones
    for j, m in enumerate(step_masks(mask, 3)):
        predicted = [i + 2 + j for i in m[0].nonzero().flatten().tolist()]
        assert predicted == list(range(4, 8)), (j, predicted)



def test_replay_counts_rounds_as_vllm_does():
    """A row of prompt 4 and length 12: the target's first token (4) comes from its prefill, the 7 after it from
    rounds. Without a right draft token each round yields one; with the draft right 3 deep at 3 and at 7, the round
    at 3 yields tokens 4..7 (3 accepted + the target's), the round at 7 only 2 accepted (the row ends at token 11)."""
    seqs = Sequences(torch.zeros(1, 14, dtype=torch.long), torch.tensor([12]), prompt_len=4)
    mask = seqs.loss_mask()
    none = torch.zeros(1, 12, dtype=torch.long)
    assert replay_rounds(none, mask, 3) == (7, 7, [0, 0, 0])
    deep = none.clone()
    deep[0, 3] = deep[0, 7] = 3
    deep[0, 4] = 3  # never a round's start: the round at 3 covers it
    assert replay_rounds(deep, mask, 3) == (2, 7, [2, 2, 1])
    one = none.clone()
    one[0, 3] = 1  # 3: accepts 1 (tokens 4, 5); then a round at each of 5..9
    assert replay_rounds(one, mask, 3) == (6, 7, [1, 0, 0])

def one_error_line(argv, capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nbl-dist: error: "), err
    return err[0]


def fake_draft(folder, *, hidden=64, vocab=320, aux=(0, 1, 2), draft_vocab=64):
    """A draft folder in the speculators format whose weights are garbage bytes: a refusal that reads them fails."""
    folder.mkdir(parents=True)
    config = {"speculators_model_type": "eagle3", "draft_vocab_size": draft_vocab, "target_hidden_size": hidden,
              "eagle_aux_hidden_state_layer_ids": list(aux),
              "transformer_layer_config": {"model_type": "llama", "hidden_size": hidden, "vocab_size": vocab}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


def test_bad_input_refused_in_one_line_before_any_weight(folders, make_model_dir, tmp_path, capsys, monkeypatch):
    """Each bad input is one `nbl-dist: error:` line naming the problem and the fix, before a weight is read, Ray
    started or the engine's environment entered (each fails the test if reached)."""
    def reached(*a, **k):
        raise AssertionError("draft went past its input checks")

    for target in ("nbl_dist.model.safetensors_io.load_tensors", "nbl_dist.runtime.cluster.RayCluster.__init__",
                   "nbl_dist.runtime.environments.Engine.run", "nbl_dist.drafting.pipeline.draft"):
        monkeypatch.setattr(target, reached)
    src, nbl = folders
    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text(" ".join(CORPUS * 4))
    wide = make_model_dir("llama", hidden_size=64)  # tiny models are 32 wide
    base = ["draft", "--data", str(data), "--out", str(tmp_path / "d"), "--steps", "2"]

    err = one_error_line(base + ["--target", str(nbl), "--init", str(fake_draft(tmp_path / "w", hidden=64))], capsys)
    assert "hidden size 64" in err and "has 32" in err and "without --init" in err
    err = one_error_line(base + ["--target", str(wide), "--init", str(fake_draft(tmp_path / "v", vocab=1000))],
                         capsys)
    assert "vocabulary of 1000 tokens" in err and "has 320" in err
    err = one_error_line(base + ["--target", str(wide), "--init", str(fake_draft(tmp_path / "a", aux=(1, 2, 7)))],
                         capsys)
    assert "[1, 2, 7]" in err and "4 layers" in err
    err = one_error_line(base + ["--target", str(nbl), "--aux-layers", "0,4"], capsys)
    assert "--aux-layers" in err and "0 to 3" in err
    err = one_error_line(base + ["--target", str(nbl), "--init", str(src)], capsys)
    assert "not an EAGLE-3 draft" in err

    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=2, n_embd=16, n_head=2,
                                                          vocab_size=320)).save_pretrained(gpt2)
    err = one_error_line(base + ["--target", str(gpt2)], capsys)
    assert "'gpt2'" in err and "EAGLE-3" in err and "llama, mistral, qwen2, qwen3" in err
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((src / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "x"}}))
    save_file({"x": torch.zeros(1)}, str(quantized / "model.safetensors"))
    err = one_error_line(base + ["--target", str(quantized)], capsys)
    assert "quantized" in err and "float folder" in err
    err = one_error_line(base + ["--target", str(nbl), "--prompt-len", "400", "--continuation", "200"], capsys)
    assert "context (512)" in err
    assert not list(tmp_path.glob("d*")) and not list(tmp_path.glob(".d*"))  # nothing written


def test_draft_options_refused_like_the_other_workflows(capsys):
    """The options go through the same builder as calibrate's and heal's: a mistyped key names the nearest option,
    options valid alone but not together are refused, each in one line."""
    required = ["draft", "--target", "t", "--data", "d", "--out", "o"]
    assert "does not split evenly" in one_error_line(required + ["--batch-size", "3", "--workers", "2"], capsys)
    assert "distinct layers" in one_error_line(required + ["--aux-layers", "2,2"], capsys)
    assert "--target is required" in one_error_line(["draft", "--data", "d", "--out", "o"], capsys)
    with pytest.raises(SystemExit):
        main(required + ["--tokens", "5", "--steps", "5"])  # argparse: one budget


def test_init_refits_at_a_quarter_of_the_budget_and_a_lower_peak_learning_rate():
    """--init (a draft that already fits) defaults to a quarter of the tokens and to REFIT_LR, below a new draft's
    peak; --lr and --tokens given win either way."""
    from nbl_dist.drafting.config import DEFAULT_LR, REFIT_LR, DraftConfig

    paths = {"target": "t", "data": "d", "out": "o"}
    new, refit = DraftConfig.from_dict(paths), DraftConfig.from_dict({**paths, "init": "i"})
    assert (new.peak_lr, refit.peak_lr) == (DEFAULT_LR, REFIT_LR) and REFIT_LR < DEFAULT_LR
    assert (new.batches_for(), refit.batches_for()) == (192, 48)  # 196,608 and 49,152 tokens in batches of 4 x 256
    given = DraftConfig.from_dict({**paths, "init": "i", "lr": 2e-3, "tokens": 4096})
    assert (given.peak_lr, given.batches_for()) == (2e-3, 4)


def test_a_refit_of_a_refit_skips_every_ancestors_prompts(tokenizer, tmp_path):
    """--init keeps its draft's data record and that draft's own --init records (nbl_draft.json "init_data"), so
    the prompts of a refit of a refit are blocks no draft of the line trained or was scored on."""
    from nbl_dist.data.sources import DataSource
    from nbl_dist.drafting.checks import REPORT_NAME, draft_records
    from nbl_dist.drafting.data import choose_prompts

    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text(" ".join(CORPUS * 40))
    source = DataSource(str(data))

    def drafted(folder, records: list[dict]):
        """A draft folder whose report records prompts chosen as `nbl-dist draft` chooses them after `records`."""
        chosen = choose_prompts(source, tokenizer, 8, records, train=12, heldout=4, seed=0)
        folder.mkdir()
        report = {"data": chosen.record(source, tokenizer, 0), "init_data": records}
        (folder / REPORT_NAME).write_text(json.dumps(report))
        return set(chosen.train_indices) | set(chosen.heldout_indices)

    first = drafted(tmp_path / "first", [])
    second = drafted(tmp_path / "second", draft_records(str(tmp_path / "first")))
    third = drafted(tmp_path / "third", draft_records(str(tmp_path / "second")))
    assert len(first) == len(second) == len(third) == 16
    assert not first & second and not third & (first | second)
    assert [r["draft_prompt_blocks"] for r in draft_records(str(tmp_path / "third"))] == [
        json.loads((tmp_path / name / REPORT_NAME).read_text())["data"]["draft_prompt_blocks"]
        for name in ("third", "second", "first")]
    assert draft_records(str(tmp_path)) == []  # not an nbl-dist draft: nothing to skip
