"""The Ray pipeline on a real local Ray: every (stages, replicas) split gives the in-process backend's result."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from nbl_dist import calibrate, load_linearized
from nbl_dist.calibration.report import PLOT_NAME, REPORT_NAME
from nbl_dist.errors import ConfigError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def nbl_tensors(out):
    return load_file(str(out / "model-nbl.safetensors"))


def run(src, out, blocks, **kw):
    # A statistic rule unless a test names one: every block goes into the statistics these tests check.
    return calibrate(src, out, blocks=blocks, batch_size=2, log=lambda *a: None, **{"rank_by": "cca", **kw})


ALL_SPLITS = [(1, 1), (2, 1), (3, 1), (2, 2)]


# Every split on one family in float64; the other family's splits and float32's are family- and dtype-independent
# code, so one split each (the one with the most merges and hops) keeps the suite's time (each Ray calibration
# starts its actors anew: some 5 s here).
@pytest.mark.parametrize("family,dtype,tol,splits", [("llama", "float64", 1e-9, ALL_SPLITS),
                                                     ("qwen2", "float64", 1e-9, [(2, 2)]),
                                                     ("llama", "float32", 2e-4, [(2, 2)])])
def test_split_invariance(family, dtype, tol, splits, make_model_dir, tmp_path):
    """(P, R) in `splits`: same bounds, selection, W and b as the in-process backend.

    float64 models agree to round-off of the merge order (1e-9 relative). float32 forwards differ between a
    batched whole-model pass and per-stage passes only by float32 round-off, amplified by the d x d solve;
    2e-4 relative on W is the float32 tolerance (the bounds agree to 1e-5).
    """
    src = make_model_dir(family, getattr(torch, dtype), num_hidden_layers=4)
    blocks = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    ref = run(src, tmp_path / "ref", blocks, linearize=2, backend="in-process", dtype=dtype)
    ref_t = nbl_tensors(tmp_path / "ref")
    for stages, replicas in splits:
        out = tmp_path / f"p{stages}r{replicas}"
        rep = run(src, out, blocks, linearize=2, stages=stages, replicas=replicas, dtype=dtype)
        assert rep["selected_layers"] == ref["selected_layers"]
        assert rep["tokens"] == ref["tokens"] and all(r["tokens"] == 256 for r in rep["layers"])
        for a, b in zip(rep["layers"], ref["layers"]):
            assert a["cca_bound"] == pytest.approx(b["cca_bound"], rel=tol if dtype == "float64" else 1e-5)
            assert a["nmse"] == pytest.approx(b["nmse"], rel=tol if dtype == "float64" else 1e-4)
        got = nbl_tensors(out)
        for k, v in ref_t.items():
            scale = v.abs().max()
            assert (got[k] - v).abs().max() <= tol * scale, (stages, replicas, k)
        assert len(rep["placement"]) == stages * replicas
        assert sorted((p["replica"], p["stage"]) for p in rep["placement"]) == [
            (r, s) for r in range(replicas) for s in range(stages)]


def test_output_folder_and_report(make_model_dir, tmp_path):
    src = make_model_dir("llama", torch.float32)
    blocks = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(2))
    out = tmp_path / "out"
    rep = run(src, out, blocks, linearize=1, stages=2)
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["selected_layers"] == rep["selected_layers"] and len(saved["layers"]) == 4
    for key in ("model", "num_layers", "hidden_size", "tokens", "timings", "config", "placement", "workers"):
        assert key in saved
    assert saved["tokens"] == 6 * 32 and saved["config"]["stages"] == 2
    for w in saved["workers"]:
        assert w["peak_rss_bytes"] > 0 and w["batches"] == 3 and w["timings"]["forward"] > 0
    stage0 = [w for w in saved["workers"] if w["stage"] == 0][0]
    assert stage0["bytes_out"] == 6 * 32 * 32 * 4  # every hidden state crossed once to stage 1
    assert (out / PLOT_NAME).stat().st_size > 1000
    assert not (tmp_path / ".out.writing").exists() and not (tmp_path / ".out.old").exists()
    model = load_linearized(out)
    assert model.generate(blocks[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    with pytest.raises(ConfigError, match="not empty"):
        run(src, out, blocks, linearize=1)
    run(src, out, blocks, linearize=2, overwrite=True)
    assert len(json.loads((out / REPORT_NAME).read_text())["selected_layers"]) == 2


def test_cuda_on_a_cluster_without_gpus_is_refused_before_loading(make_model_dir, tmp_path):
    """This Ray has no GPUs: --device cuda is refused from its resources before the data (a path that does not
    exist) or any weight is read."""
    src = make_model_dir("llama", torch.float32)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="--device cuda but the Ray cluster has no GPUs.*--device cpu"):
        calibrate(src, tmp_path / "o", data=str(tmp_path / "no-such-data"), samples=4, seq_len=32, linearize=1,
                  device="cuda", log=lambda *a: None)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "o").exists()
