"""Which rule picks the layers that cost least? Held-out perplexity of SmolLM2-135M with K attention layers
linearized under each ranking rule, and with the same number dropped by LLM-Drop's cosine rule, in one run.

Calibration: the demo's data (64 x 256 tokens from half of the Shakespeare plays), plus 8 held-back blocks for
the loss rule. Held-out: (a) the other plays, (b) unrelated English text: the Python documentation that ships
with the standard library (pydoc_data.topics).

    .venv/bin/python benchmarks/selection.py [--ks 2 4 6 8 10] [--eval-blocks 16]
"""

import argparse
import json
import time
from pathlib import Path

from common import REPO, smollm2_and_plays

import torch

from nbl_dist.corpora import pydoc_blocks
from nbl_dist.data import load_blocks
from nbl_dist.evaluate import perplexity
from nbl_dist.linearized import apply_linearization, zero_fits
from nbl_dist.local import InProcessBackend
from nbl_dist.selection import RANK_RULES as RULES, select_layers


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6, 8, 10])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--score-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "runs" / "selection.json"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    model_dir, calib, held = smollm2_and_plays()
    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = load_blocks(calib, tok, a.samples + a.score_samples, a.seq_len)
    stat_blocks, score_blocks = blocks[: a.samples], blocks[a.samples:]
    sets = {"plays": load_blocks(held, tok, a.eval_blocks, a.seq_len),
            "pydoc": pydoc_blocks(tok, a.eval_blocks, a.seq_len)}

    backend = InProcessBackend(model_dir, torch.float32)
    backend.stream(stat_blocks, batch_size=4)
    scores = backend.scores()
    backend.fit([s.layer for s in scores])
    losses = backend.loss_scores(score_blocks, batch_size=4)
    import dataclasses

    scores = [dataclasses.replace(s, loss_increase=losses[s.layer]) for s in scores]
    fits = {i: (f.weight.float(), f.bias.float()) for i, f in backend.fits.items()}
    model = backend.model
    d = model.config.hidden_size
    base = {name: perplexity(model, b) for name, b in sets.items()}
    print(f"calibrated and scored in {time.perf_counter() - t0:.0f} s; original perplexity "
          f"plays {base['plays']:.2f} / pydoc {base['pydoc']:.2f}", flush=True)

    def ppl_with(replacements):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        apply_linearization(m, replacements)
        return {name: perplexity(m, b) for name, b in sets.items()}

    rows = []
    for k in a.ks:
        for rule in RULES + ("attn-drop",):
            layers = select_layers(scores, "cosine" if rule == "attn-drop" else rule, k, None)
            if rule == "attn-drop":
                reps = zero_fits(layers, d)
            else:
                reps = {i: fits[i] for i in layers}
            ppl = ppl_with(reps)
            rows.append({"k": k, "rule": rule, "layers": layers, **ppl})
            print(f"K={k:>2} {rule:>9} {str(layers):<36} plays {ppl['plays']:8.2f}   pydoc {ppl['pydoc']:8.2f}",
                  flush=True)
    Path(a.out).write_text(json.dumps({"original": base, "rows": rows,
                                       "scores": [s.to_dict() for s in scores]}, indent=2))
    print("\nheld-out perplexity, plays / pydoc (original "
          f"{base['plays']:.2f} / {base['pydoc']:.2f})")
    print(f"{'K':>3} " + " ".join(f"{r:>17}" for r in RULES + ("attn-drop",)))
    for k in a.ks:
        cells = [next(r for r in rows if r["k"] == k and r["rule"] == rule) for rule in RULES + ("attn-drop",)]
        print(f"{k:>3} " + " ".join(f"{c['plays']:>8.2f}/{c['pydoc']:<8.2f}" for c in cells))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
