"""Healing (nbl_dist/healing): the losses against float64 written out by hand, a step's gradient against autograd
of the unchunked loss, the healed folder (only the maps changed, every frozen tensor bit for bit, loads the three
ways), the blocks it trains on, and bad input refused before anything loads. The Ray Train runs are in
test_healing_ray.py."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from nbl_dist.artifact.folder import ModelFolder
from nbl_dist.artifact.loading import load_linearized
from nbl_dist.cli import main
from nbl_dist.core import losses
from nbl_dist.core.losses import head_loss_backward, position_losses
from nbl_dist.healing.model import HealModel
from nbl_dist.healing.trainer import Healer
from nbl_dist.healing.writer import MAPS_NAME, write_healed
from nbl_dist.model.safetensors_io import tensor_specs
from nbl_dist.model.surgery import apply_linearization
from nbl_dist.training.schedule import lr_factor
from tests.helpers import CORPUS, write_nbl_folder

LAYERS = [1, 2]


def softmax64(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_losses_equal_float64_by_hand():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 11, generator=g) * 3, torch.randn(7, 11, generator=g) * 3
    y = torch.randint(0, 11, (7,), generator=g)
    got = position_losses(student, teacher, y)
    p, q = softmax64(teacher.double().numpy()), softmax64(student.double().numpy())
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    ce = -np.log(q[np.arange(7), y.numpy()])
    np.testing.assert_allclose(got["kl"].numpy(), kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["ce"].numpy(), ce, rtol=1e-5, atol=1e-6)
    assert (got["kl"] >= -1e-6).all()
    same = position_losses(teacher, teacher, y)["kl"]
    assert same.abs().max() < 1e-6  # zero only for the same distribution


@pytest.mark.parametrize("loss", ["kl", "ce", "kl+ce"])
def test_chunked_backward_is_the_gradient_of_the_mean_loss(loss, monkeypatch):
    """head_loss_backward, 3 positions per chunk, leaves in the hidden states the float64 gradient of
    sum(loss over positions) / denominator, and returns the sums."""
    monkeypatch.setattr(losses, "HEAD_ROWS", 3)
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(6, 13, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(13, 6, generator=g))
    hs = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    ht = torch.randn(2, 5, 6, generator=g)
    ids = torch.randint(0, 13, (2, 5), generator=g)
    sums = head_loss_backward(head, hs, ht, ids, loss, denominator=20)

    h64 = hs.detach().double().requires_grad_()
    logq = torch.log_softmax(h64[:, :-1] @ head.weight.double().T, -1)
    logp = torch.log_softmax(ht[:, :-1].double() @ head.weight.double().T, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    ce = -logq.gather(-1, ids[:, 1:, None]).squeeze(-1)
    total = sum({"kl": kl, "ce": ce}[part] for part in loss.split("+")).sum()
    (total / 20).backward()
    torch.testing.assert_close(hs.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    assert sums["loss"] == pytest.approx(float(total.detach()), rel=1e-5)
    assert sums["kl"] == pytest.approx(float(kl.sum().detach()), rel=1e-5)


def test_schedule():
    f = lr_factor("cosine", warmup_steps=2, total_steps=10)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert lr_factor("linear", 0, 10)(5) == 0.5 and lr_factor("constant", 0, 10)(9) == 1.0


@pytest.fixture(scope="module")
def folders(make_model_dir, tmp_path_factory):
    src = make_model_dir("llama")
    blocks = torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0))
    out = write_nbl_folder(src, tmp_path_factory.mktemp("heal") / "nbl", LAYERS, blocks)
    return src, out


def train_in_process(src, out, steps=4, loss="kl", lora_rank=None):
    model = HealModel(src, out, LAYERS, torch.float32, torch.device("cpu"), lora_rank, 2.0 * (lora_rank or 0), seed=0)
    healer = Healer(model, loss=loss, lr=3e-3, weight_decay=0.0, schedule="constant", warmup_steps=0,
                    total_steps=steps)
    g = torch.Generator().manual_seed(3)
    held = torch.randint(3, 320, (2, 16), generator=g)
    before = healer.heldout(held, 2)
    for _ in range(steps):
        healer.train_step(torch.randint(3, 320, (4, 16), generator=g), 4 * 15)
    return model, healer, before, healer.heldout(held, 2)


def test_training_moves_only_the_maps_and_lowers_the_kl(folders):
    """A few steps: the held-out KL from the original falls, the maps moved, and nothing else did: every frozen
    parameter of HealModel still equals the baseline's tensor bit for bit."""
    src, out = folders
    model, healer, before, after = train_in_process(src, out)
    assert after["kl"] < before["kl"] and before["kl"] > 0
    fresh = HealModel(src, out, LAYERS, torch.float32, torch.device("cpu"))
    for i in LAYERS:
        assert not torch.equal(model.maps[i].weight, fresh.maps[i].weight)
    for i, layer in model.shard.layers.items():
        for (name, p), (_, q) in zip(layer.state_dict().items(), fresh.shard.layers[i].state_dict().items()):
            assert torch.equal(p, q), (i, name)
    assert [p.numel() for p in healer.params] == [32 * 32, 32] * 2  # W and b of two layers, nothing else


def test_lora_trains_a_low_rank_update_merged_into_w(folders):
    src, out = folders
    model, healer, before, after = train_in_process(src, out, lora_rank=4)
    fresh = HealModel(src, out, LAYERS, torch.float32, torch.device("cpu"))
    assert [tuple(p.shape) for p in healer.params] == [(4, 32), (32, 4)] * 2
    for i in LAYERS:
        w, b = model.merged_maps()[i]
        m = model.maps[i]
        delta = w - fresh.maps[i].weight
        assert torch.linalg.matrix_rank(delta) <= 4 and delta.abs().max() > 0
        torch.testing.assert_close(delta, m.scale * (m.lora_b @ m.lora_a).detach(), rtol=1e-5, atol=1e-7)
        assert torch.equal(b, fresh.maps[i].bias)  # LoRA leaves the bias as fitted
    assert after["kl"] < before["kl"]


def test_healed_folder_changes_only_the_maps_and_loads_three_ways(folders, tmp_path):
    """write_healed: every tensor but the maps equal the healed folder's bit for bit, the maps are the trained
    ones; the folder loads with transformers after `import nbl_dist`, with load_linearized and with
    trust_remote_code where nbl_dist cannot be imported, each giving the logits of the baseline with the trained
    maps swapped in (apply_linearization: built without the healed folder)."""
    from safetensors.torch import save_file

    from tests.test_hf_stack import REMOTE_CODE_CHILD, greedy, run_child

    src, out = folders
    model, _, _, _ = train_in_process(src, out)
    maps = model.merged_maps()
    keys = {i: model.shard.adapter.nbl_keys(i) for i in LAYERS}
    save_file({k: t.contiguous() for i in LAYERS for k, t in zip(keys[i], maps[i])}, str(tmp_path / MAPS_NAME))
    healed = write_healed(ModelFolder.open(out), tmp_path / "healed", tmp_path / MAPS_NAME, {"loss": "kl"},
                          {"steps": 4})
    assert tensor_specs(healed) == tensor_specs(out)
    with safe_open(str(healed / "model-kept.safetensors"), "pt") as a, safe_open(str(out / "model-kept.safetensors"),
                                                                                  "pt") as b:
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    assert json.loads((healed / "config.json").read_text())["nbl"]["healing"] == {"loss": "kl"}
    ref = apply_linearization(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), maps)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
        for loaded in (AutoModelForCausalLM.from_pretrained(healed).eval(), load_linearized(healed)):
            torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-5)
    prompt = ids[:1, :6]
    torch.save({"ids": ids, "logits": want, "prompt": prompt, "generated": greedy(ref, prompt, use_cache=True),
                "config_class": "NBLLlamaConfig"}, tmp_path / "ref.pt")
    res = run_child(REMOTE_CODE_CHILD, [healed, tmp_path / "ref.pt"], tmp_path)
    assert res.returncode == 0 and "REMOTE CODE OK" in res.stdout, res.stdout + res.stderr[-3000:]


@pytest.fixture(scope="module")
def calibrated(make_model_dir, tmp_path_factory):
    """A tiny llama calibrated from a text folder (its data record lists the 4 statistics blocks)."""
    import nbl_dist

    src = make_model_dir("llama")
    root = tmp_path_factory.mktemp("heal-cal")
    data = root / "texts"
    data.mkdir()
    (data / "a.txt").write_text(" ".join(CORPUS * 2))
    out = root / "nbl"
    nbl_dist.calibrate(src, out, data=str(data), samples=4, seq_len=16, linearize=2, backend="in-process",
                       dtype="float32", rank_by="cca", log=lambda *a: None)
    return src, out, data


def test_blocks_skip_the_calibration_and_leave_evals_blocks(calibrated):
    from transformers import AutoTokenizer

    from nbl_dist.artifact.folder import ModelFolder
    from nbl_dist.data.ledger import data_records, heldout_blocks
    from nbl_dist.data.sources import DataSource
    from nbl_dist.healing.blocks import heal_blocks

    src, out, data = calibrated
    tok, source = AutoTokenizer.from_pretrained(out), DataSource(str(data))
    run = ModelFolder.open(out).nbl["data"]
    b = heal_blocks(source, tok, 16, [run], reserve=3, kl=2, train=8)
    used = set(run["statistics_blocks"]) | set(run["held_back_blocks"])
    chosen = b.reserved_indices + b.kl_indices + b.train_indices
    assert len(set(chosen)) == 13 and not used & set(chosen) and b.excluded == len(used)
    # eval's default on the unhealed folder scores exactly the reserved blocks ...
    assert heldout_blocks(source, tok, 16, 3, run).indices == b.reserved_indices
    # ... and so it does on the healed one, whose record adds the blocks healing used
    record = b.record(source, tok, 16, seed=0)
    healed = data_records({"data": run, "healing": {"data": record}})
    assert heldout_blocks(source, tok, 16, 3, healed).indices == b.reserved_indices
    assert heldout_blocks(source, tok, 16, 4, healed).indices[3] > max(chosen)


def one_error_line(argv, capsys):
    capsys.readouterr()  # what came before (a fixture's progress bars)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("nbl-dist: error: "), err
    return err[0]


def test_bad_input_refused_before_anything_loads(calibrated, make_model_dir, tmp_path, capsys, monkeypatch):
    """Each bad input is one `nbl-dist: error:` line naming the problem and the fix; no model is built and no Ray
    started (both fail the test if reached)."""
    import shutil

    from nbl_dist.model import synthetic

    def reached(*a, **k):
        raise AssertionError("heal went past its input checks")

    monkeypatch.setattr("nbl_dist.runtime.cluster.RayCluster.__init__", reached)
    monkeypatch.setattr("nbl_dist.healing.model.HealModel.__init__", reached)
    src, out, data = calibrated
    base = ["heal", "--data", str(data), "--out", str(tmp_path / "healed"), "--steps", "2", "--seq-len", "16"]
    err = one_error_line(base + ["--model", str(src), "--baseline", str(src)], capsys)
    assert "not an nbl-dist output" in err and "--baseline" in err
    other = make_model_dir("qwen2")
    err = one_error_line(base + ["--model", str(out), "--baseline", str(other)], capsys)
    assert "differs from the llama model" in err
    other_tok = tmp_path / "other-tokenizer"
    shutil.copytree(src, other_tok)
    synthetic.train_tokenizer([t[::-1] for t in CORPUS], vocab_size=320).save_pretrained(other_tok)
    err = one_error_line(base + ["--model", str(out), "--baseline", str(other_tok)], capsys)
    assert "another tokenizer" in err
    other_weights = tmp_path / "other-weights"
    from transformers import AutoTokenizer

    synthetic.save_model(synthetic.random_model(synthetic.tiny_config("llama"), seed=9), other_weights,
                         AutoTokenizer.from_pretrained(src))
    err = one_error_line(base + ["--model", str(out), "--baseline", str(other_weights)], capsys)
    assert "not the checkpoint --model was linearized from" in err
    err = one_error_line(["heal", "--data", str(data), "--out", str(tmp_path / "h"), "--model", str(out),
                          "--baseline", str(src), "--steps", "500", "--seq-len", "16"], capsys)
    assert "besides the" in err and "lower the budget" in err
    err = one_error_line(base + ["--model", str(out), "--baseline", str(out)], capsys)
    assert "already linearized" in err and "pass the original checkpoint as --baseline" in err
    assert not list(tmp_path.glob("*healed*")) and not list(tmp_path.glob(".h*"))  # nothing written


def test_heal_options_refused_like_calibrates(tmp_path, capsys):
    """Options go through the same builder as calibrate's: a mistyped YAML key names the nearest option, and
    options valid alone but not together are refused, each in one line."""
    config = tmp_path / "heal.yaml"
    config.write_text("model: m\nbaseline: b\ndata: d\nout: o\nlora_rnak: 4\n")
    assert "did you mean 'lora_rank'?" in one_error_line(["heal", "--config", str(config)], capsys)
    with pytest.raises(SystemExit):
        main(["heal", "--model", "m", "--tokens", "5", "--steps", "5"])  # argparse: one budget
    capsys.readouterr()
    required = ["heal", "--model", "m", "--baseline", "b", "--data", "d", "--out", "o"]
    assert "does not split evenly" in one_error_line(required + ["--batch-size", "3", "--workers", "2"], capsys)
    assert "--lora-rank" in one_error_line(required + ["--lora-alpha", "8"], capsys)
    assert "--baseline is required" in one_error_line(["heal", "--model", "m", "--data", "d", "--out", "o"], capsys)


def test_memory_plan_holds_the_model_once_or_its_shard(make_model_dir):
    """The plan's model bytes against the checkpoint's own tensors: once (teacher and student share them), or,
    sharded over W workers, the embedding, head and norms whole, 1/W of every layer's attention and MLP, and two
    whole layers' gathered; the trained maps with gradient and AdamW's moments; auto shards only what does not
    fit, and a refusal names the knobs."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from nbl_dist.healing.plan import heal_plan

    # 8 layers: over 2 workers a share of 4 plus 2 gathered is less than the whole (4 layers would be the same)
    for src in (make_model_dir("llama", num_hidden_layers=8), make_model_dir("qwen3", num_hidden_layers=8)):
        config = AutoConfig.from_pretrained(src)
        tensors = load_file(str(src / "model.safetensors"))
        total = sum(t.numel() for t in tensors.values())
        per_layer = [sum(t.numel() for k, t in tensors.items() if k.startswith(f"model.layers.{i}.self_attn.")
                         or k.startswith(f"model.layers.{i}.mlp.")) for i in range(config.num_hidden_layers)]
        d = config.hidden_size
        whole = heal_plan(config, LAYERS, 4, 2, 16, None, None)
        assert whole.weights == 4 * total and not whole.sharded
        assert whole.maps == len(LAYERS) * 4 * 4 * (d * d + d)  # W, b; their gradients; AdamW's two moments
        budget = whole.total - 1  # the whole model does not fit
        sharded = heal_plan(config, LAYERS, 4, 2, 16, None, 10 * budget, "test", workers=2, shard="auto")
        assert not sharded.sharded  # it fits whole: nothing sharded
        sharded = heal_plan(config, LAYERS, 4, 2, 16, None, budget, "test", workers=2, shard="auto")
        want = total - sum(per_layer) + -(-sum(per_layer) // 2) + 2 * max(per_layer)
        assert sharded.sharded and sharded.weights == 4 * want and sharded.fits
        refused = heal_plan(config, LAYERS, 4, 2, 16, None, budget, "test", workers=2, shard="off")
        assert not refused.fits and "--shard-weights on" in refused.refusal() and "--batch-size" in refused.refusal()
        alone = heal_plan(config, LAYERS, 4, 2, 16, None, budget, "test", workers=1, shard="auto")
        assert not alone.sharded and "raise --workers" in alone.refusal()
