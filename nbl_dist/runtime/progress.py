"""Progress lines for a run's long phases (streaming, merging replicas, scoring, fitting, writing: units done,
rate, ETA), actor restarts as they happen, and a timer of a run's phases. A line works on a terminal (one line,
redrawn) and under `ray job submit` or in a log file (a new line every few seconds); each line also goes to a
sink (the Ray backend's: Ray metrics, for the dashboard)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol


class ProgressSink(Protocol):
    """Where progress goes besides the log (the Ray backend: Ray metrics)."""

    def update(self, phase: str, done: int, total: int, rate: float, eta_s: float) -> None:
        ...

    def restart(self, phase: str) -> None:
        ...


class Progress:
    """Units done (tokens, layers, bytes), rate and ETA of one long phase, printed as it goes.

    Args:
        total: units in the phase.
        label: the phase's name, first on the line.
        every_s: seconds between lines when not on a terminal.
        stream: where the lines go (default stderr).
        unit: what is counted ("tokens" prints its rate as tok/s).
        sink: also given every line's numbers.
        restarts: the run's actor restarts so far, shown on the line once there are any.
        done: units already done before this phase started counting (a resumed run): the rate counts from here.
        detail: more to say at the end of each line (a training step's loss).
    """

    def __init__(self, total: int, label: str = "streaming", every_s: float = 5.0, stream=None,
                 unit: str = "tokens", sink: ProgressSink | None = None, restarts: Callable[[], int] | None = None,
                 done: int = 0, detail: Callable[[], str] | None = None):
        self.total, self.label, self.every_s, self.unit, self.sink = total, label, every_s, unit, sink
        self.restarts, self.detail = restarts, detail
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = self.start = done
        self.t0 = time.perf_counter()
        self._last = 0.0

    def __call__(self, tokens: int) -> None:
        self.done += tokens
        now = time.perf_counter()
        if self.done >= self.total or now - self._last >= (0.2 if self.tty else self.every_s):
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        line = (f"{self.label}: {self._amount()} ({pct:5.1f}%) {self._speed(rate)}, "
                f"elapsed {elapsed:.0f}s, ETA {eta:.0f}s")
        restarts = self.restarts() if self.restarts else 0
        if restarts:
            line += f", {restarts} actor restart(s) so far"
        if self.detail:
            line += f", {self.detail()}"
        end = "\r" if self.tty and self.done < self.total else "\n"
        print(line, end=end, file=self.stream, flush=True)
        if self.sink:
            self.sink.update(self.label, self.done, self.total, rate, eta)


    def _amount(self) -> str:
        if self.unit == "bytes":
            from nbl_dist.runtime.resources import fmt_bytes

            return f"{fmt_bytes(self.done)}/{fmt_bytes(self.total)}"
        return f"{self.done:,}/{self.total:,} {self.unit}"

    def _speed(self, rate: float) -> str:
        if self.unit == "bytes":
            from nbl_dist.runtime.resources import fmt_bytes

            return f"{fmt_bytes(rate)}/s"
        return f"{rate:,.0f} tok/s" if self.unit == "tokens" else f"{rate:,.2f} {self.unit}/s"


class RunProgress:
    """The progress of one run: a Progress line per long phase and a line per actor restart, all also given to
    one sink.

    Args:
        stream: where the lines go (default stderr, which `ray job logs` shows).
        sink: the run's metrics, if any.
    """

    def __init__(self, stream=None, sink: ProgressSink | None = None):
        self.stream, self.sink = stream, sink
        self.restarts = 0

    def phase(self, label: str, total: int, unit: str) -> Progress:
        """The progress line of a phase of `total` units; call it with the units each step finished."""
        return Progress(total, label, stream=self.stream, unit=unit, sink=self.sink, restarts=lambda: self.restarts)

    def restart(self, phase: str, used: int, limit: int) -> None:
        """An actor died while `phase` ran and is being recreated: the used-th restart of at most `limit`."""
        self.restarts = used
        print(f"{phase}: an actor died; recreating it from its snapshot (restart {used} of at most {limit})",
              file=self.stream or sys.stderr, flush=True)
        if self.sink:
            self.sink.restart(phase)


class PhaseTimer:
    """Wall time of consecutive phases: mark(name) closes the phase that ran since the previous mark."""

    def __init__(self):
        self.t0 = self._last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> float:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now
        return self.phases[phase]

    def total(self) -> float:
        return self._last - self.t0
