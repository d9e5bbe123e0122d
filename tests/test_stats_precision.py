"""The statistics precision through the pipeline: what `auto` picks on every device leaves the selection and W of
the tiny parity models as float32 statistics give them; the precision reaches the Ray actors and the resume
fingerprint. (The precision's accuracy against float64 on raw data is in test_stats.py.)"""

import pytest
import torch
from safetensors.torch import load_file

from nbl_dist import calibrate
from nbl_dist.core.stats import AUTO_PRECISION, resolve_precision
from nbl_dist.errors import CheckpointError


def run(src, out, blocks, **kw):
    kw.setdefault("rank_by", "cca")  # the statistics alone choose the layers: no held-back blocks to measure sets on
    rep = calibrate(src, out, blocks=blocks, batch_size=2, linearize=2, plot=False, log=lambda *a: None, **kw)
    return rep, load_file(str(out / "model-nbl.safetensors"))


def max_rel(got: dict, ref: dict) -> float:
    return max(float((got[k] - v).abs().max() / v.abs().max()) for k, v in ref.items())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_auto_choice_of_every_device_keeps_selection_and_w(family, make_model_dir, tmp_path):
    """Each precision `auto` picks on some device (other than fp32), run here: the same layers and W within the
    float32 tolerance of the parity tests (2e-4 relative) as fp32 statistics; `auto` here resolves to this CPU's
    entry and the report records the precision used."""
    src = make_model_dir(family, torch.float32, num_hidden_layers=4)
    blocks = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    ref, ref_t = run(src, tmp_path / "fp32", blocks, backend="in-process", stats_precision="fp32")
    choices = sorted(set(AUTO_PRECISION.values()) - {"fp32"})
    assert choices  # some device's auto differs from fp32 (else this test would compare fp32 with itself)
    for precision in choices:
        rep, got = run(src, tmp_path / precision, blocks, backend="in-process", stats_precision=precision)
        assert rep["stats_precision"] == precision
        assert rep["selected_layers"] == ref["selected_layers"], precision
        assert max_rel(got, ref_t) <= 2e-4, precision
    rep, _ = run(src, tmp_path / "auto", blocks, backend="in-process")
    assert rep["stats_precision"] == AUTO_PRECISION["cpu"] == resolve_precision("auto", "cpu", torch.float32)
    assert resolve_precision("auto", "cuda", torch.float64) == "fp32"  # a float64 model keeps float64 Grams


@pytest.mark.slow
def test_precision_reaches_the_actors_and_the_fingerprint(local_ray, make_model_dir, tmp_path):
    """A float64 model, so stages differ from in-process only by float64 round-off: Ray at bf16 equals in-process
    at bf16 (1e-9) although bf16 moves W far more than that from fp32; a kept checkpoint of the bf16 run is
    refused to a fp32 run."""
    src = make_model_dir("llama", torch.float64, num_hidden_layers=4)
    blocks = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    _, fp32 = run(src, tmp_path / "fp32", blocks, backend="in-process", dtype="float64", stats_precision="fp32")
    _, local = run(src, tmp_path / "local", blocks, backend="in-process", dtype="float64", stats_precision="bf16")
    ckpt = tmp_path / "ckpt"
    rep, ray_t = run(src, tmp_path / "ray", blocks, stages=2, dtype="float64", stats_precision="bf16",
                     checkpoint_dir=str(ckpt), keep_checkpoint=True)
    assert rep["stats_precision"] == "bf16"
    assert max_rel(local, fp32) > 1e-4
    assert max_rel(ray_t, local) <= 1e-9
    with pytest.raises(CheckpointError, match="statistics precision"):
        run(src, tmp_path / "again", blocks, stages=2, dtype="float64", stats_precision="fp32",
            checkpoint_dir=str(ckpt), resume=True)
