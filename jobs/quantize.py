"""Ray job entry point: the same options as `nbl-dist quantize`, plus --config FILE.yaml.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/quantize.py --config jobs/configs/quantize/smollm2.yaml

Inside a job it joins the cluster the job runs on (Ray sets RAY_ADDRESS for the entry point); the driver checks the
inputs and chooses the blocks, and llm-compressor's step runs as one Ray task holding one GPU when the cluster has
GPUs (else one CPU task), in the worker's own process: the job's environment must have llmcompressor installed
(`pip install llmcompressor==0.14.0.1` beside nbl-dist, or a runtime_env). Errors go through the same boundary as
the CLI: bad input is one `nbl-dist: error: ...` line and exit status 2.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds nbl_dist/

from nbl_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
