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
    from nbl_dist.convert import convert_gguf, smollm2_gguf
    from nbl_dist.corpora import shakespeare_split

    runs = REPO / "runs"
    return convert_gguf(smollm2_gguf(), runs / "smollm2-135m"), *shakespeare_split(runs / "shakespeare")
