"""What every benchmark script shares: the repository importable, the environment offline (no hub), Ray's token
authentication off for the local cluster a benchmark starts. Import it first: `import common  # noqa: F401`."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
for key, value in (("RAY_AUTH_MODE", "disabled"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                   ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(key, value)


def smollm2_and_plays():
    """(SmolLM2-135M checkpoint folder, calibration plays folder, held-out plays folder): the demo's model and
    text, converted and split once into runs/."""
    from nbl_dist.artifact.convert import convert_gguf, smollm2_gguf
    from nbl_dist.data.corpora import shakespeare_split

    runs = REPO / "runs"
    return convert_gguf(smollm2_gguf(), runs / "smollm2-135m"), *shakespeare_split(runs / "shakespeare")


def default_rule_folder(model_dir, calib, k: int):
    """SmolLM2 with K layers linearized under the default rule, calibrated as the demo does (64 x 256 tokens of
    half the plays, 8 more held back), once per K from one set of kept statistics; cached in runs/nbl-default/."""
    from nbl_dist import calibrate

    root = REPO / "runs" / "nbl-default"
    out = root / f"k{k}"
    if (out / "nbl_report.json").exists():
        return out
    calibrate(model_dir, out, data=str(calib), samples=64, seq_len=256, linearize=k, backend="in-process",
              batch_size=4, dtype="float32", device="cpu", overwrite=True, checkpoint_dir=str(root / "statistics"),
              keep_checkpoint=True, log=print)
    return out


def healed_folder(model_dir, calib, k: int = 8):
    """The default-rule K folder healed with `nbl-dist heal`'s defaults (the kl loss, the default budget), on the
    calibration plays; cached in runs/nbl-default/k<K>-healed, shared by the quantization and speculative-decoding
    benchmarks."""
    from nbl_dist import heal

    out = REPO / "runs" / "nbl-default" / f"k{k}-healed"
    if (out / "nbl_heal_report.json").exists():
        return out
    heal(default_rule_folder(model_dir, calib, k), model_dir, str(calib), out, overwrite=True, log=print)
    return out
