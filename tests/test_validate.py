"""check_checkpoint: every way a --model folder can be damaged or unsuitable is one typed error, in seconds."""

import json
import re
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from nbl_dist.artifact.write import write_linearized
from nbl_dist.errors import CheckpointError, UnsupportedArchitectureError
from nbl_dist.model import synthetic
from nbl_dist.model.arch import meta_model
from nbl_dist.model.safetensors_io import INDEX_NAME, SINGLE_NAME, tensor_specs
from nbl_dist.model.validate import check_checkpoint

Q1 = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture
def model(make_model_dir, tmp_path):
    """A private copy of the tiny llama checkpoint (the fixture's folders are shared by the whole session)."""
    return copy_model(make_model_dir("llama"), tmp_path / "model")


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def check_fast(path):
    t0 = time.perf_counter()
    try:
        return check_checkpoint(path)
    finally:
        assert time.perf_counter() - t0 < 5


def fails(path, error, pattern):
    """check_checkpoint(path) raises `error` whose message matches `pattern`, within 5 s."""
    with pytest.raises(error, match=pattern) as info:
        check_fast(path)
    return str(info.value)


def rewrite(path, change):
    """Rewrite the safetensors file `path` with change(tensors) applied."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, **fields):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def shard(folder):
    """Split the single-file checkpoint in two shards with an index, as save_pretrained does for big models."""
    tensors = load_file(folder / SINGLE_NAME)
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, folder / fname, metadata={"format": "pt"})
    wmap = {k: fname for fname, keys in parts.items() for k in keys}
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (folder / SINGLE_NAME).unlink()
    return wmap


def test_good_checkpoint_passes(model, make_model_dir, tmp_path):
    cfg = check_fast(model)
    assert cfg.hidden_size == 32 and cfg.num_hidden_layers == 4 and cfg.model_type == "llama"
    shard(model)
    assert check_fast(model).hidden_size == 32
    # Tied embeddings: lm_head.weight is not stored, and the meta model's rotary inv_freq never is.
    tied = copy_model(make_model_dir("qwen3", tie_word_embeddings=True), tmp_path / "tied")
    assert "lm_head.weight" not in tensor_specs(tied)
    assert check_fast(tied).tie_word_embeddings


def test_extra_tensors_are_allowed(model):
    # Older checkpoints store the rotary inverse frequencies; other tools add their own tensors.
    rewrite(model / SINGLE_NAME, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
                                                     "extra.step": torch.zeros(1, dtype=torch.int64)}))
    assert check_fast(model).hidden_size == 32


def test_truncated_file(model):
    path = model / SINGLE_NAME
    full = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(full // 2)
    fails(model, CheckpointError, rf"'{re.escape(str(path))}' is truncated: it is {full // 2:,} bytes, but its "
                                  rf"header implies {full:,} bytes.*Re-download or re-copy it")
    with open(path, "r+b") as fh:
        fh.truncate(100)  # the header itself is cut
    fails(model, CheckpointError, r"is truncated: it is 100 bytes")


def test_not_a_safetensors_file(model):
    (model / SINGLE_NAME).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12345\n")
    fails(model, CheckpointError, rf"'{re.escape(str(model / SINGLE_NAME))}' is not a safetensors file.*Git LFS")


def test_corrupt_header(model):
    path = model / SINGLE_NAME
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"{" + b"\x00" * (n - 1) + raw[8 + n:])
    fails(model, CheckpointError, rf"'{re.escape(str(path))}' has a corrupt header")


def test_sharded_index_names_a_missing_shard(model):
    shard(model)
    (model / "model-00002-of-00002.safetensors").unlink()
    fails(model, CheckpointError, rf"'{re.escape(str(model / INDEX_NAME))}' names the shard "
                                  r"'model-00002-of-00002.safetensors' \(\d+ tensors, .*does not exist.*re-download")


def test_index_and_shard_disagree(model):
    wmap = shard(model)
    moved = next(k for k, f in wmap.items() if f == "model-00001-of-00002.safetensors")
    wmap[moved] = "model-00002-of-00002.safetensors"
    (model / INDEX_NAME).write_text(json.dumps({"weight_map": wmap}))
    fails(model, CheckpointError, rf"says tensor '{re.escape(moved)}' is in 'model-00002-of-00002.safetensors', "
                                  "but that file's header does not hold it")


def test_broken_index(model):
    shard(model)
    index = model / INDEX_NAME
    index.write_text('{"weight_map": {"a": "b",}}')
    fails(model, CheckpointError, rf"'{re.escape(str(index))}' is not valid JSON \(line 1, column \d+\)")
    index.write_text('{"metadata": {}}')
    fails(model, CheckpointError, rf"'{re.escape(str(index))}' has no \"weight_map\" object")


def test_no_weights_or_no_config(model, tmp_path):
    (model / "config.json").unlink()
    fails(model, CheckpointError, rf"'{re.escape(str(model))}' has no config\.json")
    (model / SINGLE_NAME).unlink()  # the weights are looked for first: without them nothing else matters
    fails(model, CheckpointError, r"has no model\.safetensors or model\.safetensors\.index\.json")
    fails(tmp_path / "nowhere", CheckpointError, "does not exist")


def test_broken_config_json(model):
    text = (model / "config.json").read_text()
    (model / "config.json").write_text(text.replace('"hidden_size": 32,', '"hidden_size": 32,,'))
    line = next(i for i, s in enumerate(text.splitlines(), 1) if '"hidden_size"' in s)
    fails(model, CheckpointError, rf"config\.json' is not valid JSON \(Expecting property name enclosed in double "
                                  rf"quotes at line {line}, column \d+\)")


def test_unsupported_model_type(model):
    edit_config(model, model_type="gpt2")
    fails(model, UnsupportedArchitectureError,
          rf"'{re.escape(str(model / 'config.json'))}': model_type 'gpt2' is not supported; nbl-dist supports llama")


def test_config_transformers_rejects(model):
    edit_config(model, num_attention_heads=5)  # 32 is not a multiple of 5: transformers' own validation fails
    fails(model, CheckpointError, r"config\.json' is not a valid model config: .*multiple of the number of attention "
                                  r"heads \(5\)\. Fix it")


def test_quantized_config(model):
    edit_config(model, quantization_config={"quant_method": "gptq", "bits": 4})
    fails(model, CheckpointError, r"config\.json' has a quantization_config \(method 'gptq'\).*[Dd]equantise")


def test_missing_attention_tensor(model):
    rewrite(model / SINGLE_NAME, lambda t: t.pop(Q1))
    fails(model, CheckpointError, rf"tensor '{re.escape(Q1)}' \(layer 1\) is missing from the checkpoint in "
                                  rf"'{re.escape(str(model))}': the checkpoint is partial or pruned\. Re-download it")
    rewrite(model / SINGLE_NAME, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.")])
    fails(model, CheckpointError, r"needed tensors are missing in all, in layers \[1, 3\]")


def test_wrong_shape(model):
    name = "model.layers.2.mlp.up_proj.weight"
    rewrite(model / SINGLE_NAME, lambda t: t.update({name: torch.zeros(65, 32)}))
    fails(model, CheckpointError, rf"tensor '{re.escape(name)}' in '.*model\.safetensors' has shape \[65, 32\], but "
                                  r"config\.json implies \[64, 32\]: config\.json and the weights disagree")


def test_more_layers_than_config(model):
    edit_config(model, num_hidden_layers=3)
    fails(model, CheckpointError, r"hold tensors of layer 3, but config\.json says num_hidden_layers = 3: "
                                  "config.json and the weights disagree")


def test_int8_and_unknown_dtypes(model):
    rewrite(model / SINGLE_NAME, lambda t: t.update({Q1: torch.zeros(32, 32, dtype=torch.int8)}))
    fails(model, CheckpointError, rf"tensor '{re.escape(Q1)}' in '.*model\.safetensors' is stored as I8; nbl-dist "
                                  r"reads float checkpoints \(F32, F16, BF16, F64\): dequantise")
    rewrite(model / SINGLE_NAME, lambda t: t.update({Q1: torch.zeros(32, 32, dtype=torch.float8_e4m3fn)}))
    fails(model, CheckpointError, rf"tensor '{re.escape(Q1)}' .* is stored as F8_E4M3.*dequantise")
    # The header reader used everywhere else names the tensor too (it used to raise a bare KeyError).
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(Q1)}' in .* has dtype 'F8_E4M3'"):
        tensor_specs(model)


def test_extra_tensor_of_unknown_dtype(model):
    # Extra tensors are copied into the output, so they too must be of a dtype nbl-dist can write.
    rewrite(model / SINGLE_NAME, lambda t: t.update({"scales.fp8": torch.zeros(4, dtype=torch.float8_e4m3fn)}))
    fails(model, CheckpointError, r"tensor 'scales\.fp8' .* has dtype 'F8_E4M3', which nbl-dist cannot read or copy")


def test_nbl_output_folder_is_refused(model, tmp_path):
    original = (model / "config.json").read_text()
    edit_config(model, nbl={"linearized_layers": [1, 2]})
    fails(model, CheckpointError, r"config\.json' has an \"nbl\" section: the folder is an nbl-dist output, already "
                                  r"linearized \(layers \[1, 2\].*pass the original checkpoint as --model")
    (model / "config.json").write_text(original)
    out = tmp_path / "out"
    write_linearized(model, out, [2], lambda i: (torch.zeros(32, 32), torch.zeros(32)))
    fails(out, CheckpointError, r"has an \"nbl\" section.*already linearized \(layers \[2\]")
    # Without its "nbl" section the folder still gives itself away by its nbl_linear tensors.
    cfg = json.loads((out / "config.json").read_text())
    del cfg["nbl"]
    (out / "config.json").write_text(json.dumps(cfg))
    fails(out, CheckpointError, rf"'{re.escape(str(out))}' holds nbl_linear tensors: the folder is an nbl-dist "
                                r"output.*layers \[2\]")


def test_70b_checkpoint_checked_in_seconds(tmp_path):
    """Llama-3-70B shapes in sparse files: the full size on paper, no data on disk. Reading any tensor data
    would take minutes; the check reads only headers."""
    cfg = synthetic.tiny_config("llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    folder = tmp_path / "llama70b"
    folder.mkdir()
    cfg.save_pretrained(folder)
    shapes = {k: list(t.shape) for k, t in meta_model(cfg).state_dict().items()}
    names = sorted(shapes)
    n_files = 30
    wmap = {}
    for j in range(n_files):
        fname = f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"
        header, offset = {}, 0
        for k in names[j::n_files]:
            size = 2 * int(torch.tensor(shapes[k]).prod())
            header[k] = {"dtype": "BF16", "shape": shapes[k], "data_offsets": [offset, offset + size]}
            offset += size
            wmap[k] = fname
        raw = json.dumps(header).encode()
        with open(folder / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)  # sparse: no blocks written
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": wmap}))
    total = sum((folder / f).stat().st_size for f in set(wmap.values()))
    assert total > 130e9
    assert check_fast(folder).num_hidden_layers == 80


@pytest.mark.parametrize("damage", ["half_length", "attention_tensor_removed", "broken_config"])
def test_calibrate_refuses_before_any_actor_or_data(model, tmp_path, damage):
    """Through the user's entry points (the Python API and the CLI, Ray backend): the damaged checkpoint is named
    in seconds, before Ray starts, before the data is read (there is none here), and nothing is written."""
    import ray

    from nbl_dist import calibrate
    from nbl_dist.cli import main

    weights = model / SINGLE_NAME
    if damage == "half_length":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        named = "is truncated"
    elif damage == "attention_tensor_removed":
        rewrite(str(weights), lambda t: t.pop(Q1))
        named = re.escape(Q1)
    else:
        (model / "config.json").write_text("{not json")
        named = r"config\.json' is not valid JSON"
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=named):
        calibrate(model, tmp_path / "out", data=str(tmp_path / "no-data"), linearize=1, log=lambda *a: None)
    assert main(["calibrate", "--model", str(model), "--data", str(tmp_path / "no-data"), "--out",
                 str(tmp_path / "out"), "--linearize", "1"]) == 2
    assert time.perf_counter() - t0 < 10
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
