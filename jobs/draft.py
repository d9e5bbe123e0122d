"""Ray job entry point: the same options as `nbl-dist draft`, plus --config FILE.yaml.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/draft.py --config jobs/configs/draft/smollm2.yaml

Inside a job it joins the cluster the job runs on (Ray sets RAY_ADDRESS for the entry point) and runs the Ray
Train workers there. Submitting the same job again after it was stopped resumes from its last checkpoint. Errors go
through the same boundary as the CLI: bad input is one `nbl-dist: error: ...` line and exit status 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds nbl_dist/

from nbl_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["draft", *sys.argv[1:]]))
