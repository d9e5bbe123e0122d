"""Which rule picks the layers that cost least? Held-out perplexity of SmolLM2-135M with K attention layers
linearized under each ranking rule, and with the same number dropped by LLM-Drop's cosine rule, in one run; and
what each rule costs on top of the statistics pass.

Calibration: the demo's data (64 x 256 tokens from half of the Shakespeare plays), plus 8 held-back blocks that
the measured rules (loss, auto, greedy) score on. Held-out: (a) the other plays, (b) unrelated English text: the
Python documentation that ships with the standard library (pydoc_data.topics). In-process backend (the Ray
backend's numbers are the same: tests/test_selection.py).

    .venv/bin/python benchmarks/selection.py [--ks 2 3 4 5 6 7 8 9 10] [--eval-blocks 16] [--shortlist 8]
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import REPO, smollm2_and_plays

from nbl_dist.calibration.local import InProcessBackend
from nbl_dist.core.losses import next_token_loss
from nbl_dist.core.selection import (
    STATISTIC_RULES,
    choose_set,
    fits_needed,
    select_layers,
)
from nbl_dist.data.blocks import load_blocks
from nbl_dist.data.corpora import pydoc_blocks
from nbl_dist.evaluation.perplexity import perplexity
from nbl_dist.model.surgery import linearized_in_place, zero_fits

COLUMNS = (*STATISTIC_RULES, "loss", "auto", "greedy", "attn-drop")


class Timed:
    """A measure callable (sets -> losses) that records the seconds of each call."""

    def __init__(self, backend, score_blocks):
        self.backend, self.score_blocks, self.calls = backend, score_blocks, []

    def __call__(self, sets):
        t0 = time.perf_counter()
        out = self.backend.measure_sets(sets, self.score_blocks, batch_size=4)
        self.calls.append(time.perf_counter() - t0)
        return out


def seconds(run):
    """(run's result, its wall time)."""
    t0 = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0


def statistic_picks(backend, scores, ks):
    """(k, rule) -> (layers, seconds to choose and fit them) for cca, nmse, cosine."""
    picks = {}
    for k in ks:
        for rule in STATISTIC_RULES:
            layers, s = seconds(lambda: select_layers(scores, rule, k, None))
            picks[k, rule] = (layers, s + seconds(lambda: backend.fit(layers))[1])
    return picks


def loss_picks(backend, scores, score_blocks, ks):
    """(k, "loss") -> (layers, seconds): every layer fitted and measured alone once, for every K."""
    import dataclasses

    def run():
        backend.fit([s.layer for s in scores])
        return backend.loss_scores(score_blocks, batch_size=4)

    losses, s = seconds(run)
    scores = [dataclasses.replace(x, loss_increase=losses[x.layer]) for x in scores]
    return {(k, "loss"): (select_layers(scores, "loss", k, None), s) for k in ks}, scores


def set_rule_run(backend, scores, score_blocks, rule, k, shortlist):
    """(layers, candidates, measure) of one set rule at K, the fits it needs made first."""
    measure = Timed(backend, score_blocks)
    backend.fit(fits_needed(scores, rule, k, shortlist))
    layers, found = choose_set(scores, rule, k, shortlist, measure)
    return layers, found, measure


def auto_picks(backend, scores, score_blocks, ks):
    """(k, "auto") -> (layers, seconds), k -> the rules whose set auto chose, and k -> every candidate."""
    picks, chose, found_at = {}, {}, {}
    for k in ks:
        (layers, found, _), s = seconds(lambda: set_rule_run(backend, scores, score_blocks, "auto", k, 0))
        picks[k, "auto"] = (layers, s)
        chose[k] = next(c.found_by for c in found if c.chosen)
        found_at[k] = found
    return picks, chose, found_at


def greedy_picks(backend, scores, score_blocks, ks, shortlist):
    """(k, "greedy") -> (layers, seconds). Greedy's sets for K below the shortlist's size are the steps of one
    run (the same shortlist, so the same path); a K at or above it takes the whole shortlist of K layers."""
    picks = {}
    path = [k for k in ks if k < shortlist]
    if path:
        t0 = time.perf_counter()
        _, found, measure = set_rule_run(backend, scores, score_blocks, "greedy", max(path), shortlist)
        fit_s = time.perf_counter() - t0 - sum(measure.calls)
        for k in path:
            step = [c for c in found if c.found_by == f"greedy step {k}"]
            best = min(step, key=lambda c: c.loss_increase)
            picks[k, "greedy"] = (list(best.layers), fit_s + sum(measure.calls[:k]))
    for k in (k for k in ks if k >= shortlist):
        (layers, _, _), s = seconds(lambda: set_rule_run(backend, scores, score_blocks, "greedy", k, shortlist))
        picks[k, "greedy"] = (layers, s)
    return picks


class PassThrough(torch.nn.Module):
    """Stands in for a decoder layer whose output is already known: hands its input on."""

    def forward(self, hidden_states, **kwargs):
        return hidden_states


class Evaluator:
    """Held-out perplexity of the model with a set of layers replaced, each distinct set evaluated once. A set's
    forward starts at its first layer, from the original's hidden states entering that layer (computed once):
    the layers before it are the original's, so their output is too."""

    def __init__(self, backend, sets, batch_size=4):
        self.model, self.fits, self.sets, self.batch_size = backend.model, backend.fits, sets, batch_size
        self.layers = backend.adapter.layers(self.model)
        self.done, self.entering = {}, {name: self._entering(b) for name, b in sets.items()}

    @torch.no_grad()
    def _entering(self, blocks):
        """[layer] -> (N, T, d) hidden states entering that layer in the original model."""
        parts = [self.model(input_ids=blocks[i:i + self.batch_size], output_hidden_states=True).hidden_states
                 for i in range(0, len(blocks), self.batch_size)]
        return [torch.cat([p[j] for p in parts]) for j in range(len(self.layers))]

    @torch.no_grad()
    def _perplexity_from(self, start, name):
        ids, h = self.sets[name], self.entering[name][start]
        kept = [self.layers[i] for i in range(start)]
        for i in range(start):
            self.layers[i] = PassThrough()
        try:
            total = count = 0
            for i in range(0, len(ids), self.batch_size):
                logits = self.model(inputs_embeds=h[i:i + self.batch_size]).logits
                loss, n = next_token_loss(logits, ids[i:i + self.batch_size])
                total, count = total + loss, count + n
        finally:
            for i, layer in enumerate(kept):
                self.layers[i] = layer
        return math.exp(total / count)

    def __call__(self, layers, drop=False):
        key = (tuple(layers), drop)
        if key not in self.done:
            d = self.model.config.hidden_size
            fits = zero_fits(layers, d) if drop else {i: (self.fits[i].weight, self.fits[i].bias) for i in layers}
            with linearized_in_place(self.model, fits):
                self.done[key] = {name: self._perplexity_from(min(layers, default=0), name) for name in self.sets}
        return self.done[key]

    def check(self, layers):
        """The shortcut against a whole forward of the model with `layers` linearized (both perplexities)."""
        got = self(layers)
        fits = {i: (self.fits[i].weight, self.fits[i].bias) for i in layers}
        with linearized_in_place(self.model, fits) as model:
            return got, {name: perplexity(model, b, self.batch_size) for name, b in self.sets.items()}


def print_candidates(found_at):
    """auto's candidates at each K: KL divergence from the original / loss increase on the held-back blocks."""
    print("\nauto's candidates on the held-back blocks, KL from the original / loss increase (nats/token):")
    print(f"{'K':>3} " + " ".join(f"{r:>17}" for r in STATISTIC_RULES))
    for k, found in found_at.items():
        by_rule = {rule: c for c in found for rule in c.found_by.split(", ")}
        print(f"{k:>3} " + " ".join(f"{by_rule[r].kl:>8.4f}/{by_rule[r].loss_increase:<+8.4f}"
                                    for r in STATISTIC_RULES)
              + f"  chose {next(c.found_by for c in found if c.chosen)}")


def print_tables(base, rows, times, stream_s, ks, chose):
    print("\nheld-out perplexity, plays / pydoc (original "
          f"{base['plays']:.2f} / {base['pydoc']:.2f})")
    print(f"{'K':>3} " + " ".join(f"{r:>15}" for r in COLUMNS))
    for k in ks:
        cells = [next(r for r in rows if r["k"] == k and r["rule"] == rule) for rule in COLUMNS]
        print(f"{k:>3} " + " ".join(f"{c['plays']:>7.2f}/{c['pydoc']:<7.2f}" for c in cells) + f"  auto: {chose[k]}")
    print(f"\nseconds each rule adds to the statistics pass ({stream_s:.0f} s), in-process:")
    print(f"{'K':>3} " + " ".join(f"{r:>8}" for r in COLUMNS[:-1]))
    for k in ks:
        print(f"{k:>3} " + " ".join(f"{times[k, r]:>8.1f}" for r in COLUMNS[:-1]))


def main():
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=list(range(2, 11)))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--score-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--shortlist", type=int, default=8, help="greedy's shortlist (the calibrate default)")
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
    _, stream_s = seconds(lambda: backend.stream(stat_blocks, batch_size=4))
    scores = backend.scores()
    picks = statistic_picks(backend, scores, a.ks)
    auto, chose, found_at = auto_picks(backend, scores, score_blocks, a.ks)
    picks.update(auto)
    print(f"statistics in {stream_s:.0f} s; auto done at {time.perf_counter() - t0:.0f} s", flush=True)
    picks.update(greedy_picks(backend, scores, score_blocks, a.ks, a.shortlist))
    print(f"greedy done at {time.perf_counter() - t0:.0f} s", flush=True)
    loss, scores = loss_picks(backend, scores, score_blocks, a.ks)
    picks.update(loss)
    print(f"loss rule done at {time.perf_counter() - t0:.0f} s", flush=True)

    evaluate = Evaluator(backend, sets)
    base = evaluate([])
    shortcut, whole = evaluate.check(picks[a.ks[0], "cosine"][0])
    print(f"held-out perplexity from the first linearized layer {shortcut}, by a whole forward {whole}", flush=True)
    assert all(math.isclose(shortcut[n], whole[n], rel_tol=1e-4) for n in sets), (shortcut, whole)
    rows = []
    for k in a.ks:
        for rule in COLUMNS:
            layers = picks[k, "cosine" if rule == "attn-drop" else rule][0]
            ppl = evaluate(layers, drop=rule == "attn-drop")
            rows.append({"k": k, "rule": rule, "layers": layers, **ppl})
            print(f"K={k:>2} {rule:>9} {str(layers):<36} plays {ppl['plays']:8.2f}   pydoc {ppl['pydoc']:8.2f}",
                  flush=True)
    times = {key: s for key, (_, s) in picks.items()}
    candidates = {k: [c.to_dict() for c in found] for k, found in found_at.items()}
    Path(a.out).write_text(json.dumps({"original": base, "rows": rows, "stream_s": stream_s, "auto_chose": chose,
                                       "auto_candidates": candidates,
                                       "seconds": [{"k": k, "rule": r, "s": s} for (k, r), s in times.items()],
                                       "scores": [s.to_dict() for s in scores]}, indent=2))
    print_tables(base, rows, times, stream_s, a.ks, chose)
    print_candidates(found_at)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
