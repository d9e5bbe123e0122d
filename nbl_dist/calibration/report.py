"""nbl_report.json (assembled from what each phase produced), its table, and the plot of the CCA bound per layer
with the selected layers marked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbl_dist.calibration.backend import Placement, StreamResult, WorkerReport
    from nbl_dist.calibration.plan import ShardPlan
    from nbl_dist.core.linalg import LayerScores
    from nbl_dist.core.selection import Candidate
    from nbl_dist.runtime.progress import PhaseTimer

REPORT_NAME = "nbl_report.json"
PLOT_NAME = "nbl_bounds.png"


@dataclasses.dataclass(frozen=True)
class Selection:
    """The rank phase's outcome: every layer's scores, the layers chosen, the ridge each fit used, and the sets a
    set rule measured (selection.Candidate)."""

    rank_by: str
    scores: list[LayerScores]
    selected: list[int]
    ridges: dict[int, float]
    candidates: list[Candidate] = dataclasses.field(default_factory=list)

    def layer_rows(self) -> list[dict]:
        return [{**s.to_dict(), "selected": s.layer in self.selected, "fit_ridge": self.ridges.get(s.layer)}
                for s in self.scores]

    def cca_ranking(self) -> list[int]:
        """Every layer, lowest CCA bound first (the paper's order, reported whatever rule selected)."""
        return [s.layer for s in sorted(self.scores, key=lambda s: s.cca_bound)]


def build_report(*, model: str, hf_config, tokens: int, score_tokens: int, selection: Selection,
                 timer: PhaseTimer, stream: StreamResult, recovery: dict, workers: list[WorkerReport], placement: list[Placement],
                 plan: ShardPlan, backend: str, dtype: str, device: str, output: dict, config: dict,
                 data: dict | None = None) -> dict:
    """The report of one calibration (the layout of nbl_report.json): what ran, where, how long, and its result.
    `data` is the data record (data.ledger.calibration_record): which blocks of --data were used, None for in-memory
    blocks."""
    return {
        "model": model,
        "num_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "tokens": tokens,
        "score_tokens": score_tokens,
        "selected_layers": selection.selected,
        "rank_by": selection.rank_by,
        "layers": selection.layer_rows(),
        "cca_ranking": selection.cca_ranking(),
        "candidates": [c.to_dict() for c in selection.candidates],
        "timings": {**timer.phases, "total": timer.total(),
                    "tokens_per_s": tokens / max(timer.phases["stream"], 1e-9), **stream.timings()},
        "recovery": recovery,
        "workers": [w.to_report() for w in workers],
        "placement": [p.to_report() for p in placement],
        "plan": plan.to_dict(),
        "backend": backend,
        "dtype": dtype,
        "device": device,
        "output": output,
        "config": config,
        "data": data,
    }


def write_report(out_dir: str | Path, report: dict) -> Path:
    path = Path(out_dir) / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def read_report(out_dir: str | Path) -> dict:
    path = Path(out_dir) / REPORT_NAME
    if not path.exists():
        from nbl_dist.errors import NBLError

        raise NBLError(f"{str(path)!r} does not exist; pass the --out folder of a finished calibration")
    return json.loads(path.read_text())


PANELS = (("cca_bound", "CCA bound (lower: more linear)"), ("nmse", "LMMSE residual / tr(C_yy)"),
          ("cosine", "mean cos(x, x + a) (LLM-Drop)"), ("attn_ratio", "mean |a| / |x|"),
          ("loss_increase", "loss increase, nats/token"))


def plot_bounds(report: dict, path: str | Path) -> Path:
    """One panel per score (the CCA bound first), the selected layers in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    panels = [(k, t) for k, t in PANELS if all(r.get(k) is not None for r in rows)]
    layers = [r["layer"] for r in rows]
    selected = set(report["selected_layers"])
    colors = ["tab:red" if i in selected else "tab:blue" for i in layers]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, len(layers) * 0.25), 2.2 * len(panels)),
                             sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        ax.bar(layers, [r[key] for r in rows], color=colors)
        ax.set_ylabel(key)
        ax.set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("decoder layer")
    fig.suptitle(f"{Path(str(report['model'])).name}: linearized {sorted(selected)} (red), "
                 f"ranked by {report['config']['rank_by']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def format_table(report: dict) -> str:
    head = (f"{'layer':>5} {'cca_bound':>10} {'nmse':>9} {'cosine':>8} {'attn/x':>8} {'loss+':>9} {'ridge':>8} "
            f"{'selected':>8}")
    lines = [f"model {report['model']}: {report['num_layers']} layers, d={report['hidden_size']}, "
             f"{report['tokens']:,} tokens; selected {report['selected_layers']} by {report['config']['rank_by']}",
             head]
    for r in report["layers"]:
        loss = "-" if r.get("loss_increase") is None else f"{r['loss_increase']:.5f}"
        lines.append(f"{r['layer']:>5} {r['cca_bound']:>10.4f} {r['nmse']:>9.5f} {r['cosine']:>8.4f} "
                     f"{r['attn_ratio']:>8.4f} {loss:>9} {max(r['ridge_x'], r['ridge_y']):>8.0e} "
                     f"{'yes' if r['selected'] else '':>8}")
    return "\n".join(lines + candidate_lines(report))


def candidate_lines(report: dict) -> list[str]:
    """The sets a set rule measured, with their held-back KL divergence from the original and loss increase
    (nats/token), the chosen one marked; greedy's steps are shown by their best set only (greedy goes by loss)."""
    found = report.get("candidates") or []
    if not found:
        return []
    best: dict[str, dict] = {}
    for c in found:
        if c["found_by"] not in best or c["loss_increase"] < best[c["found_by"]]["loss_increase"]:
            best[c["found_by"]] = c
    lines = [f"CCA ranking (lowest bound first): {report['cca_ranking']}",
             "sets measured on the held-back blocks (nats/token):",
             f"  {'layers':<40} {'KL':>9} {'loss+':>9}  found by"]
    for c in best.values():
        kl = "-" if c.get("kl") is None else f"{c['kl']:.5f}"
        lines.append(f"  {str(c['layers']):<40} {kl:>9} {c['loss_increase']:>9.5f}  {c['found_by']}"
                     f"{'  <- chosen' if c['chosen'] else ''}")
    return lines
