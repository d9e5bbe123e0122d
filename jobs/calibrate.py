"""Ray job entry point: the same options as `nbl-dist calibrate`, plus --config FILE.yaml.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/calibrate.py --config jobs/configs/smollm2.yaml

Inside a job it joins the cluster the job runs on (Ray sets RAY_ADDRESS for the entry point).
Errors go through the same boundary as the CLI (nbl_dist.cli.main): a bad option, config file or model is one
`nbl-dist: error: ...` line on stderr and exit status 2, so the job fails fast and says why; a bug keeps its
traceback.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds nbl_dist/

from nbl_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
