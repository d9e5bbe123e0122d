"""lm-evaluation-harness on a linearized model, offline, with a small local multiple-choice task."""


import pytest

from tests.helpers import HERE, write_task

pytestmark = pytest.mark.slow


def test_harness_task_on_linearized_model(make_model_dir, tmp_path):
    import json

    import torch
    from transformers import AutoTokenizer

    from nbl_dist import calibrate, load_linearized
    from nbl_dist.evaluation.harness import harness_eval

    src = make_model_dir("llama", torch.float32)
    blocks = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(0))
    calibrate(src, tmp_path / "lin", blocks=blocks, linearize=2, backend="in-process", rank_by="cca",
              log=lambda *a: None)
    model = load_linearized(tmp_path / "lin")
    tok = AutoTokenizer.from_pretrained(tmp_path / "lin")
    res = harness_eval(model, tok, ["nbl_tiny_mc"], include_path=str(write_task(tmp_path / "tasks")))
    acc = res["nbl_tiny_mc"]["acc,none"]
    # Independent reference: score each choice's summed log-probability ourselves and take the argmax.
    rows = [json.loads(line) for line in (HERE / "harness" / "nbl_tiny_mc.jsonl").read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for r in rows:
            ctx = tok(r["question"], add_special_tokens=False).input_ids
            scores = []
            for choice in r["choices"]:
                full = tok(r["question"] + choice, add_special_tokens=False).input_ids
                logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
                scores.append(sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full))))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    assert acc == pytest.approx(correct / len(rows))
