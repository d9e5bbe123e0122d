"""Where a workflow's engine runs: a Python interpreter that can import it.

llm-compressor and vLLM each pin transformers and compressed-tensors to versions that share an environment neither
with each other nor with the main one (README "Environments"). A workflow that drives one of them (quantization:
llm-compressor; drafting: vLLM and speculators) checks its inputs here, in the command the user typed, and runs the
engine's part in the interpreter that has it: this process when it can import the engine's modules; else the one
`NBL_<NAME>_PYTHON` names; else the repository's own environment (`make venv-quant`, `make venv-vllm`). On a
cluster the engine is installed where the job runs, so the first case holds. No Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from nbl_dist.errors import MissingExtraError, NBLError

REPO = Path(__file__).resolve().parents[2]  # the checkout holding nbl_dist/ (an editable install's source)


@dataclasses.dataclass(frozen=True)
class Engine:
    """A third-party engine a workflow drives, and where to find it.

    Attributes:
        name: the engine's short name, also in NBL_<NAME>_PYTHON (e.g. "quantize").
        modules: what the interpreter must import (e.g. ("llmcompressor",)).
        venv: the repository's environment that has it (e.g. ".venv-quant").
        install: how to get it, for the refusal (e.g. "make venv-quant").
    """

    name: str
    modules: tuple[str, ...]
    venv: str
    install: str

    @property
    def variable(self) -> str:
        return f"NBL_{self.name.upper()}_PYTHON"

    def interpreter(self) -> str | None:
        """None when this process can import the engine; else the path of a Python that can.

        Raises:
            MissingExtraError: none found; the message says how to install one.
        """
        if all(importlib.util.find_spec(m) is not None for m in self.modules):
            return None
        named = os.environ.get(self.variable)
        if named:
            if not Path(named).is_file():
                raise MissingExtraError(f"{self.variable}={named!r} is not a file; point it at the python of an "
                                        f"environment with {', '.join(self.modules)} and nbl-dist installed")
            return named
        local = REPO / self.venv / "bin" / "python"
        if local.is_file():
            return str(local)
        raise MissingExtraError(
            f"{', '.join(self.modules)} is not installed here, and no environment of its own was found "
            f"({self.variable} is unset, {REPO / self.venv} does not exist): run `{self.install}` in the nbl-dist "
            f"repository, or install it beside nbl-dist and set {self.variable} to that environment's python")

    def run(self, module: str, args: list[str], log: Callable[[str], None] = print,
            env: dict[str, str] | None = None) -> None:
        """`python -m module *args` in the engine's interpreter (this one's when it has the engine), its output
        passed through line by line; `env` is added to this process's environment for it.

        Raises:
            NBLError: it failed; the message holds its last lines (an NBLError of its own is its last line).
        """
        python = self.interpreter() or sys.executable
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        tail: list[str] = []
        with subprocess.Popen([python, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) as proc:
            for line in proc.stdout:
                log(line.rstrip("\n"))
                tail = (tail + [line.rstrip("\n")])[-20:]
        if proc.returncode:
            errors = [line for line in tail if line.startswith("nbl-dist: error: ")]
            if errors:
                raise NBLError(errors[-1].removeprefix("nbl-dist: error: "))
            raise NBLError(f"the {self.name} step failed in {python} (exit status {proc.returncode}); its last "
                           "lines: " + " | ".join(tail[-5:]))
