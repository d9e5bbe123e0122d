"""nbl_report.json, its table, and the plot of the CCA bound per layer with the selected layers marked."""

from __future__ import annotations

import json
from pathlib import Path

REPORT_NAME = "nbl_report.json"
PLOT_NAME = "nbl_bounds.png"


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


def plot_bounds(report: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [row["layer"] for row in report["layers"]]
    bounds = [row["cca_bound"] for row in report["layers"]]
    selected = set(report["selected_layers"])
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.25), 3.5))
    colors = ["tab:red" if i in selected else "tab:blue" for i in layers]
    ax.bar(layers, bounds, color=colors)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("CCA bound (lower = more linear)")
    ax.set_title(f"{Path(str(report['model'])).name}: selected {sorted(selected)} (red) by {report['config']['rank_by']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def format_table(report: dict) -> str:
    head = f"{'layer':>5} {'cca_bound':>10} {'nmse':>9} {'cosine':>8} {'attn/x':>8} {'ridge':>8} {'selected':>8}"
    lines = [f"model {report['model']}: {report['num_layers']} layers, d={report['hidden_size']}, "
             f"{report['tokens']:,} tokens; selected {report['selected_layers']} by {report['config']['rank_by']}",
             head]
    for r in report["layers"]:
        lines.append(f"{r['layer']:>5} {r['cca_bound']:>10.4f} {r['nmse']:>9.5f} {r['cosine']:>8.4f} "
                     f"{r['attn_ratio']:>8.4f} {max(r['ridge_x'], r['ridge_y']):>8.0e} "
                     f"{'yes' if r['selected'] else '':>8}")
    return "\n".join(lines)
