"""ShardWorker without Ray, and the shard plan from the config alone."""

import itertools

import numpy as np
import pytest
import torch

from nbl_dist.calibration.local import InProcessBackend
from nbl_dist.calibration.plan import balance, make_plan
from nbl_dist.calibration.worker import ShardWorker, from_wire, to_wire
from nbl_dist.errors import PlanError
from nbl_dist.model import synthetic
from nbl_dist.model.arch import meta_model
from nbl_dist.model.safetensors_io import tensor_specs, weight_map


def test_shard_loads_only_its_own_tensors(make_model_dir):
    src = make_model_dir("llama", torch.float32, num_hidden_layers=4)
    specs = tensor_specs(src)
    w0 = ShardWorker(str(src), 0, 2, embed=True)
    w1 = ShardWorker(str(src), 2, 4, embed=False)
    k0, k1 = set(w0.info().keys), set(w1.info().keys)
    assert k0 == {k for k in weight_map(src) if k.startswith(("model.layers.0.", "model.layers.1."))} | {
        "model.embed_tokens.weight"}
    assert k1 == {k for k in weight_map(src) if k.startswith(("model.layers.2.", "model.layers.3."))}
    assert not (k0 | k1) & {"model.norm.weight", "lm_head.weight"}  # nobody needs the head
    for w, keys in ((w0, k0), (w1, k1)):
        want = sum(int(np.prod(specs[k][1])) * 4 for k in keys)
        assert w.bytes_read == want


def test_shard_chain_equals_whole_model(make_model_dir):
    src = make_model_dir("qwen2", torch.float64, num_hidden_layers=5)
    blocks = torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0))
    ref = InProcessBackend(src, torch.float64)
    ref.stream(blocks, batch_size=2)
    chain = [ShardWorker(str(src), 0, 1, embed=True, dtype="float64"),
             ShardWorker(str(src), 1, 3, embed=False, dtype="float64"),
             ShardWorker(str(src), 3, 5, embed=False, dtype="float64")]
    for k in range(0, 6, 2):
        x = blocks[k:k + 2].numpy()
        for s, w in enumerate(chain):
            x = w.run_batch(x, last=(s == 2), batch_id=k)
    assert x == {"tokens": 48, "batch": 4}
    got = {d.layer: d for w in chain for d in w.scores()}
    for s in ref.scores():
        assert got[s.layer].cca_bound == pytest.approx(s.cca_bound, rel=1e-9)
        assert got[s.layer].tokens == 6 * 24


def test_replica_merge_layer_by_layer_equals_one_worker(make_model_dir):
    """Two replicas' statistics merged one layer at a time from read-only arrays (as Ray hands them over) equal
    one worker that saw every micro-batch, and the exporting replica's statistics are left untouched."""
    src = make_model_dir("llama", torch.float64, num_hidden_layers=3)
    blocks = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(3)).numpy()
    whole, r0, r1 = (ShardWorker(str(src), 0, 3, embed=True, dtype="float64") for _ in range(3))
    for k in range(6):
        whole.run_batch(blocks[k:k + 1], last=True, batch_id=k)
        (r0 if k in (0, 3, 4) else r1).run_batch(blocks[k:k + 1], last=True, batch_id=k)
    before = {i: r1.stats[i].m_aa.clone() for i in range(3)}
    for i in range(3):
        arrays = r1.export_layer(i)
        for v in arrays.values():
            v.flags.writeable = False
        assert r0.merge_layer(i, arrays) == 6 * 16
    for i in range(3):
        for f in ("mu_x", "mu_a", "m_xx", "m_ax", "m_aa"):
            torch.testing.assert_close(getattr(r0.stats[i], f), getattr(whole.stats[i], f), rtol=1e-10, atol=1e-10)
        assert r0.stats[i].cos_sum == pytest.approx(whole.stats[i].cos_sum, rel=1e-12)
        assert torch.equal(r1.stats[i].m_aa, before[i])


def test_cached_random_checkpoint_reuses_only_the_same_shapes(tmp_path):
    cfg = synthetic.tiny_config("llama", num_hidden_layers=2)
    path, wrote = synthetic.cached_random_checkpoint(cfg, tmp_path / "m")
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert wrote and synthetic.cached_random_checkpoint(cfg, path) == (path, False)
    assert weights.stat().st_mtime_ns == stamp
    wider = synthetic.tiny_config("llama", num_hidden_layers=2, intermediate_size=96)
    assert synthetic.cached_random_checkpoint(wider, path) == (path, True)
    assert tensor_specs(path)["model.layers.0.mlp.up_proj.weight"][1] == (96, 32)


def test_wire_roundtrip_bf16():
    t = torch.randn(2, 3, 4).to(torch.bfloat16)
    w = to_wire(t)
    assert w["data"].dtype == np.int16
    assert torch.equal(from_wire(w, torch.device("cpu")), t)


def brute_force_balance(costs, parts, first_extra):
    best = None
    n = len(costs)
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(costs[i:j]) + (first_extra if i == 0 else 0) for i, j in zip(bounds, bounds[1:]))
        if best is None or worst < best:
            best = worst
    return best


@pytest.mark.parametrize("seed", range(5))
def test_balance_is_optimal(seed):
    rng = np.random.default_rng(seed)
    costs = [int(c) for c in rng.integers(1, 100, 9)]
    for parts in (1, 2, 3, 4):
        ranges = balance(costs, parts, first_extra=50)
        assert ranges[0][0] == 0 and ranges[-1][1] == 9
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
        worst = max(sum(costs[i:j]) + (50 if i == 0 else 0) for i, j in ranges)
        assert worst == brute_force_balance(costs, parts, 50)


def test_plan_counts_and_errors():
    cfg = synthetic.tiny_config("llama", num_hidden_layers=6, hidden_size=64, intermediate_size=128)
    plan = make_plan(cfg, stages=3, replicas=2, dtype=torch.bfloat16, batch_size=2, seq_len=16)
    model = meta_model(cfg)
    assert plan.total_params == sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    embed = cfg.vocab_size * 64
    for s in plan.stages:
        assert s.params == layer_params * (s.end - s.start) + (embed if s.embed else 0)
    assert all(s.weight_bytes == s.params * 2 for s in plan.stages)
    assert all(s.stats_bytes == (s.end - s.start) * (3 * 64 * 64 * 8 + 2 * 64 * 8) for s in plan.stages)
    assert plan.num_actors == 6 and sum(s.end - s.start for s in plan.stages) == 6
    with pytest.raises(PlanError, match="between 1 and the number of layers"):
        make_plan(cfg, stages=7)
