"""lm-evaluation-harness accuracy of SmolLM2 original vs the demo's linearized models, one run.

Run `make demo` first (it writes runs/demo and runs/demo-cosine). The task is the small local multiple-choice
task of the tests (tests/harness/nbl_tiny_mc.jsonl), so it runs offline.

    .venv/bin/python benchmarks/harness.py
"""

import tempfile
from pathlib import Path

from common import REPO

from nbl_dist.artifact.loading import load_linearized
from nbl_dist.evaluation.harness import harness_eval
from tests.helpers import write_task


def main():
    from transformers import AutoTokenizer

    models = {"original": REPO / "runs/smollm2-135m", "NBL (cca rule)": REPO / "runs/demo",
              "NBL (cosine rule)": REPO / "runs/demo-cosine"}
    tasks = write_task(Path(tempfile.mkdtemp()) / "tasks")
    print(f"{'model':<20} {'layers':<18} {'nbl_tiny_mc acc':>16}")
    for name, path in models.items():
        model = load_linearized(path)
        layers = (model.config.nbl or {}).get("linearized_layers", []) if model.config.nbl else []
        res = harness_eval(model, AutoTokenizer.from_pretrained(path), ["nbl_tiny_mc"], include_path=str(tasks))
        print(f"{name:<20} {str(layers):<18} {res['nbl_tiny_mc']['acc,none']:>16.3f}")


if __name__ == "__main__":
    main()
