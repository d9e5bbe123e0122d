"""`python -m nbl_dist.drafting OPTIONS_JSON`: `nbl-dist draft` in the interpreter that has speculators (and vLLM),
started by drafting.pipeline.run_draft from the one the user typed the command in (runtime/environments.py). The
options come as one JSON object of DraftConfig's fields; bad input is one `nbl-dist: error:` line and exit status 2,
which the parent turns back into the same error."""

import json
import sys

from nbl_dist.errors import NBLError, one_line


def main(argv: list[str]) -> int:
    from nbl_dist.drafting.config import DraftConfig
    from nbl_dist.drafting.pipeline import draft

    try:
        draft(DraftConfig.from_dict(json.loads(argv[0])))
    except NBLError as e:
        print(f"nbl-dist: error: {one_line(str(e))}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
