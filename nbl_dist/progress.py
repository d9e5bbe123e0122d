"""A progress line for long streams (tokens done, tokens/s, ETA), and a timer of a run's phases. The line works on a
terminal (one line, redrawn) and under `ray job submit` or in a log file (a new line every few seconds)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Tokens done, rate and ETA of a long stream, printed as it goes."""

    def __init__(self, total: int, label: str = "calibrate", every_s: float = 5.0, stream=None):
        self.total, self.label, self.every_s = total, label, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
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
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        line = (f"{self.label}: {self.done:,}/{self.total:,} tokens ({pct:5.1f}%) "
                f"{rate:,.0f} tok/s, elapsed {elapsed:.0f}s, ETA {eta:.0f}s")
        end = "\r" if self.tty and self.done < self.total else "\n"
        print(line, end=end, file=self.stream, flush=True)


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
