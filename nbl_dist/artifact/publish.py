"""The one way every workflow puts an output folder in place: written whole beside --out, then moved in, so that
--out is always either the previous output or the new one, whole, whatever kills the process and when.

`check_out(OUT, overwrite)` refuses a non-empty OUT without --overwrite before a workflow starts its work;
`staging_for(OUT)` gives an empty staging folder `.OUT.writing` beside OUT when the output is ready to be written,
and the workflow writes everything there; `publish(staging, OUT)` then takes three steps, each one rename or one
removal on the same filesystem:

  1. the previous OUT, if any, is renamed aside to `.OUT.old`;
  2. the staging folder is renamed to OUT;
  3. `.OUT.old` is deleted.

A kill before step 1 leaves the previous OUT in place (and an unfinished staging folder); between 1 and 2 the
previous output whole at `.OUT.old`; between 2 and 3 the new one at OUT. `recover(OUT)`, which `check_out` runs first
(and anyone may run) puts that back: an `.OUT.old` without OUT is the previous output, renamed back to OUT; an
`.OUT.old` beside OUT is left over from step 3 and deleted; a staging folder is unpublished work and deleted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from nbl_dist.errors import ConfigError

STAGING_SUFFIX = ".writing"
ASIDE_SUFFIX = ".old"


def staging_dir(final: str | Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}{STAGING_SUFFIX}"


def aside_dir(final: str | Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}{ASIDE_SUFFIX}"


def recover(final: str | Path) -> None:
    """Finish or undo a publish that was interrupted: afterwards OUT is the previous output or the new one, whole,
    and neither the aside nor the staging folder exists."""
    final, aside = Path(final), aside_dir(final)
    if aside.exists():
        if final.exists():
            remove(aside)  # killed in step 3: the new output is in place
        else:
            os.replace(aside, final)  # killed between steps 1 and 2: the previous output comes back
    shutil.rmtree(staging_dir(final), ignore_errors=True)


def remove(path: Path) -> None:
    """A folder with everything in it, or a file (an --out given as a file and overwritten)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_out(final: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """`final` as a Path, once it may be written: an interrupted publish recovered, and a non-empty folder refused
    unless overwrite.

    Raises:
        ConfigError: `final` exists, is not empty, and overwrite is off (the message names `flag`).
    """
    final = Path(final)
    recover(final)
    if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
        raise ConfigError(f"output folder {str(final)!r} exists and is not empty; pass --overwrite or another {flag}")
    return final


def staging_for(final: str | Path) -> Path:
    """An empty staging folder beside `final`, to write the output into (a leftover one is removed first)."""
    staging = staging_dir(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def publish(staging: str | Path, final: str | Path, after_step: Callable[[int], None] | None = None) -> Path:
    """Move the finished staging folder in as `final` (steps 1-3 above). Returns `final`.

    Args:
        after_step: called with 1, 2, 3 after each step (a test stops the process there).
    """
    staging, final, aside = Path(staging), Path(final), aside_dir(final)
    step = after_step or (lambda n: None)
    if final.exists():
        os.replace(final, aside)
    step(1)
    os.replace(staging, final)
    step(2)
    if aside.exists():
        remove(aside)
    step(3)
    return final
