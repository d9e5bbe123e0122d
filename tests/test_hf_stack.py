"""The output folder in the standard Hugging Face stack: transformers' Auto classes after `import nbl_dist`,
`trust_remote_code=True` in an interpreter where nbl_dist cannot be imported, a refusal without either, and
lm-evaluation-harness's CLI. References are built independently: the source model loaded by transformers, with
the W, b read from the output's safetensors file swapped in by apply_linearization."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import nbl_dist
from nbl_dist.artifact.loading import load_linearized
from nbl_dist.errors import CheckpointError
from nbl_dist.model import modeling_nbl
from nbl_dist.model.arch import SUPPORTED_MODEL_TYPES
from nbl_dist.model.modeling_nbl import NBLDecoderLayer
from nbl_dist.model.surgery import apply_linearization
from tests.helpers import write_task

FAMILIES = ("llama", "qwen2")
NEW_TOKENS = 8

# Prepended to every child script: the editable install makes nbl_dist importable from the venv's site-packages
# even with -I, so any attempt to import it fails, and is recorded for the final check.
BLOCK_NBL_DIST = '''
import importlib.abc, sys

class _BlockNblDist(importlib.abc.MetaPathFinder):
    tried = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "nbl_dist":
            self.tried.append(name)
            raise ImportError("nbl_dist is blocked in this process")
        return None

_block = _BlockNblDist()
sys.meta_path.insert(0, _block)

def assert_no_nbl_dist():
    assert not _block.tried and not [m for m in sys.modules if m.split(".")[0] == "nbl_dist"], _block.tried
'''

REMOTE_CODE_CHILD = BLOCK_NBL_DIST + '''
import torch
from transformers import AutoConfig, AutoModelForCausalLM

out, ref = sys.argv[1], torch.load(sys.argv[2])
assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__name__ == ref["config_class"]
model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                   device_map="cpu", output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], rtol=0, atol=1e-5)
    for use_cache in (True, False):
        gen = model.generate(ref["prompt"], attention_mask=torch.ones_like(ref["prompt"]), max_new_tokens=%d,
                             do_sample=False, use_cache=use_cache)
        assert torch.equal(gen, ref["generated"]), (use_cache, gen, ref["generated"])
assert_no_nbl_dist()
print("REMOTE CODE OK")
''' % NEW_TOKENS

REFUSAL_CHILD = BLOCK_NBL_DIST + '''
from transformers import AutoConfig, AutoModelForCausalLM

out, no_auto_map = sys.argv[1], sys.argv[2]
for name, loader, folder in [("AutoConfig", AutoConfig, out), ("no_auto_map", AutoModelForCausalLM, no_auto_map)]:
    try:
        loader.from_pretrained(folder)
    except Exception as e:
        print("REFUSED", name, type(e).__name__, " ".join(str(e).split()))
    else:
        print("LOADED", name)
assert_no_nbl_dist()
model = AutoModelForCausalLM.from_pretrained(out)  # must raise: the exit status says whether it did
print("LOADED AutoModelForCausalLM", type(model).__name__)
'''


def read_fits(out: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (W (d, d), b (d,)) as stored in the output's model-nbl.safetensors, read with safetensors alone."""
    with safe_open(str(out / "model-nbl.safetensors"), framework="pt") as f:
        layers = sorted({int(k.split(".")[2]) for k in f.keys()})
        return {i: (f.get_tensor(f"model.layers.{i}.nbl_linear.weight"),
                    f.get_tensor(f"model.layers.{i}.nbl_linear.bias")) for i in layers}


def greedy(model, prompt: torch.Tensor, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                              do_sample=False, use_cache=use_cache)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, make_model_dir, tmp_path_factory):
    """A tiny model of the family, calibrated in-process with 2 layers linearized, and the reference outputs of
    the source model with the stored fits applied in memory."""
    src = make_model_dir(request.param)
    out = tmp_path_factory.mktemp(f"hf-{request.param}") / "out"
    blocks = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(0))
    nbl_dist.calibrate(src, out, blocks=blocks, linearize=2, backend="in-process", dtype="float32",
                       rank_by="cca", log=lambda *a: None)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    apply_linearization(ref, read_fits(out))
    ids = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(6))  # (B, T)
    prompt = ids[:1, :6]
    with torch.no_grad():
        logits = ref(ids).logits  # (B, T, vocab)
    generated = greedy(ref, prompt, use_cache=True)
    assert torch.equal(greedy(ref, prompt, use_cache=False), generated)
    assert generated.shape == (1, 6 + NEW_TOKENS)
    return SimpleNamespace(family=request.param, src=src, out=out, ids=ids, prompt=prompt, logits=logits,
                           generated=generated)


def child_env(tmp_path: Path) -> dict:
    """Environment of a child interpreter: offline, no PYTHONPATH to this repository, a private module cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    return env


def run_child(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh isolated interpreter (-I: no PYTHONPATH, no script folder on sys.path), stdin
    closed so that transformers' remote-code prompt gets no answer."""
    return subprocess.run([sys.executable, "-I", "-c", script, *map(str, args)], cwd=tmp_path,
                          env=child_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600)


def test_config_names_the_linearized_model(run):
    cfg = json.loads((run.out / "config.json").read_text())
    config_cls, model_cls = modeling_nbl.NBL_FAMILIES[run.family]
    assert cfg["model_type"] == f"nbl_{run.family}" == config_cls.model_type
    assert cfg["architectures"] == [model_cls.__name__]
    assert cfg["auto_map"] == {"AutoConfig": f"modeling_nbl.{config_cls.__name__}",
                               "AutoModelForCausalLM": f"modeling_nbl.{model_cls.__name__}"}
    assert cfg["nbl"]["base_model_type"] == run.family and cfg["nbl"]["format_version"] == 2
    assert cfg["nbl"]["linearized_layers"] == sorted(read_fits(run.out)) and len(read_fits(run.out)) == 2
    # transformers reads model.safetensors alone when it exists: the output must only be reachable by its index.
    assert not (run.out / "model.safetensors").exists() and (run.out / "model.safetensors.index.json").exists()
    # One source of truth: the folder's modeling file is the package's module, byte for byte.
    assert (run.out / "modeling_nbl.py").read_bytes() == Path(modeling_nbl.__file__).read_bytes()


def test_modeling_file_needs_only_torch_and_transformers():
    tree = ast.parse(Path(modeling_nbl.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "torch", "transformers"}, imported
    assert set(modeling_nbl.NBL_FAMILIES) == set(SUPPORTED_MODEL_TYPES)


def test_auto_classes_load_the_linearized_model(run):
    config = AutoConfig.from_pretrained(run.out)
    assert type(config) is modeling_nbl.NBL_FAMILIES[run.family][0]
    model, info = AutoModelForCausalLM.from_pretrained(run.out, dtype=torch.float32, device_map="cpu",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(model) is modeling_nbl.NBL_FAMILIES[run.family][1]
    linearized = config.nbl["linearized_layers"]
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer, NBLDecoderLayer) == (i in linearized)
    names = [n for n, _ in model.named_parameters()]
    for i in linearized:
        assert not [n for n in names if n.startswith((f"model.layers.{i}.self_attn.",
                                                      f"model.layers.{i}.input_layernorm."))]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(run.ids).logits, run.logits, rtol=0, atol=1e-5)
    assert torch.equal(greedy(model, run.prompt, use_cache=True), run.generated)
    assert torch.equal(greedy(model, run.prompt, use_cache=False), run.generated)


def test_remote_code_loads_without_nbl_dist(run, tmp_path):
    ref = tmp_path / "ref.pt"
    torch.save({"ids": run.ids, "logits": run.logits, "prompt": run.prompt, "generated": run.generated,
                "config_class": modeling_nbl.NBL_FAMILIES[run.family][0].__name__}, ref)
    res = run_child(REMOTE_CODE_CHILD, [run.out, ref], tmp_path)
    assert res.returncode == 0 and "REMOTE CODE OK" in res.stdout, res.stdout + res.stderr[-3000:]
    # The module transformers ran is the folder's file, copied into its module cache.
    assert list((tmp_path / "hf_modules").rglob("modeling_nbl.py"))


def test_plain_transformers_refuses(run, tmp_path):
    no_auto_map = tmp_path / "no_auto_map"
    shutil.copytree(run.out, no_auto_map)
    cfg = json.loads((no_auto_map / "config.json").read_text())
    del cfg["auto_map"]
    (no_auto_map / "config.json").write_text(json.dumps(cfg))
    res = run_child(REFUSAL_CHILD, [run.out, no_auto_map], tmp_path)
    assert res.returncode != 0 and "LOADED" not in res.stdout, res.stdout + res.stderr[-3000:]
    # transformers' unanswered [y/N] prompt may precede a REFUSED on the same line.
    lines = dict(line.split("REFUSED ", 1)[1].split(" ", 1) for line in res.stdout.splitlines() if "REFUSED " in line)
    assert "trust_remote_code=True" in lines["AutoConfig"] and "custom code" in lines["AutoConfig"]
    assert f"nbl_{run.family}" in lines["no_auto_map"]  # transformers' unknown model type error names it
    assert "custom code" in res.stderr and "trust_remote_code=True" in res.stderr


def test_load_linearized_is_the_auto_path(run):
    auto = AutoModelForCausalLM.from_pretrained(run.out).eval()
    loaded = load_linearized(run.out)
    assert type(loaded) is type(auto) and loaded.config.nbl == auto.config.nbl
    assert next(loaded.parameters()).dtype == torch.float32  # the stored dtype by default
    with torch.no_grad():
        assert torch.equal(loaded(run.ids).logits, auto(run.ids).logits)
    assert torch.equal(greedy(loaded, run.prompt, use_cache=True), run.generated)
    half = load_linearized(run.out, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_load_linearized_still_loads_a_plain_checkpoint(run):
    plain = load_linearized(run.src)
    ref = AutoModelForCausalLM.from_pretrained(run.src, dtype=torch.float32).eval()
    assert type(plain) is type(ref) and plain.config.nbl is None
    assert not any(isinstance(layer, NBLDecoderLayer) for layer in plain.model.layers)
    with torch.no_grad():
        assert torch.equal(plain(run.ids).logits, ref(run.ids).logits)


def test_format_1_folder_refused(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run.out, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["model_type"], cfg["nbl"]["format_version"] = run.family, 1
    for key in ("auto_map", "architectures"):
        del cfg[key]
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"older nbl-dist .*model_type is still '{run.family}'.*calibrate "
                                              "again"):
        load_linearized(old)


def test_save_pretrained_keeps_the_format(run, tmp_path):
    model = load_linearized(run.out)
    model.save_pretrained(tmp_path / "resaved")
    cfg = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert cfg["auto_map"] == json.loads((run.out / "config.json").read_text())["auto_map"]
    assert (tmp_path / "resaved" / "modeling_nbl.py").read_bytes() == Path(modeling_nbl.__file__).read_bytes()
    again = load_linearized(tmp_path / "resaved")
    with torch.no_grad():
        assert torch.equal(again(run.ids).logits, model(run.ids).logits)


@pytest.mark.slow
def test_lm_eval_cli_with_remote_code(make_model_dir, tmp_path):
    """`lm_eval --model hf` with trust_remote_code=True in its own process (which never imports nbl_dist) scores
    the same accuracy as `nbl-dist eval --tasks` on the model load_linearized gives, with the same harness
    options (limit, few-shot, batch size), and both write the harness's results file."""
    from nbl_dist.cli import main

    src = make_model_dir("llama")
    out = tmp_path / "out"
    blocks = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(0))
    nbl_dist.calibrate(src, out, blocks=blocks, linearize=2, backend="in-process", dtype="float32",
                       rank_by="cca", log=lambda *a: None)
    tasks = write_task(tmp_path / "tasks")
    cli = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
           f"pretrained={out},trust_remote_code=True,dtype=float32", "--tasks", "nbl_tiny_mc",
           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4", "--limit", "6", "--num_fewshot", "1",
           "--output_path", str(tmp_path / "results")]
    res = subprocess.run(cli, cwd=tmp_path, env=child_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert list((tmp_path / "hf_modules").rglob("modeling_nbl.py"))  # it loaded through the folder's file
    (results,) = (tmp_path / "results").rglob("results_*.json")
    theirs = json.loads(results.read_text())
    assert main(["eval", "--model", str(out), "--tasks", "nbl_tiny_mc", "--include-path", str(tasks), "--device",
                 "cpu", "--dtype", "float32", "--batch_size", "4", "--limit", "6", "--num_fewshot", "1",
                 "--output-path", str(tmp_path / "ours")]) == 0
    (ours,) = (tmp_path / "ours").rglob("results_*.json")
    ours = json.loads(ours.read_text())
    assert theirs["n-samples"]["nbl_tiny_mc"]["effective"] == ours["n-samples"]["nbl_tiny_mc"]["effective"] == 6
    assert theirs["n-shot"]["nbl_tiny_mc"] == ours["n-shot"]["nbl_tiny_mc"] == 1
    assert ours["results"]["nbl_tiny_mc"]["acc,none"] == pytest.approx(theirs["results"]["nbl_tiny_mc"]["acc,none"])
