"""Progress display for long loops: steps, loss, it/s and ETA.

On a terminal a single line is redrawn; otherwise (CI, log files) a plain line
is printed every `every` steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Reports ``step/total``, the latest loss, iterations per second and the ETA."""

    def __init__(self, total: int, start: int = 0, mode: str = "auto", every: int = 50,
                 stream: TextIO | None = None, label: str = "train"):
        self.total, self.start, self.every, self.label = total, start, every, label
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.t0 = time.perf_counter()
        self._last_draw = 0.0

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.t0
        return (step - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, **values: float) -> None:
        """Record that `step` steps are done; `values` (loss, ...) are shown."""
        if self.mode == "off":
            return
        now = time.perf_counter()
        last = step >= self.total
        if self.mode == "bar":
            if not last and now - self._last_draw < 0.2:
                return
            self._last_draw = now
            self.stream.write("\r" + self._line(step, values, bar=True))
            if last:
                self.stream.write("\n")
            self.stream.flush()
        elif last or step % self.every == 0:
            self.stream.write(self._line(step, values, bar=False) + "\n")
            self.stream.flush()

    def _line(self, step: int, values: dict[str, float], bar: bool) -> str:
        rate = self.rate(step)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        width = len(str(self.total))
        head = f"{self.label} {step:>{width}}/{self.total}"
        if bar:
            frac = step / self.total if self.total else 1.0
            filled = int(24 * frac)
            head += " [" + "#" * filled + "." * (24 - filled) + "]"
        return f"{head} {shown} {rate:.1f} it/s eta {_fmt_time(eta)}"

    def close(self) -> None:
        if self.mode == "bar":
            self.stream.write("\n")
            self.stream.flush()


@contextmanager
def phase(what: str, detail: str = "", enabled: bool = True, stream: TextIO | None = None) -> Iterator[None]:
    """Announce a phase that shows no step counter (an evaluation, the data floor) and its duration:

        flowforge: evaluating the untrained model (4000 samples; energy_distance, sliced_wasserstein) ...
        flowforge: evaluating the untrained model: done in 3.1 s
    """
    out = stream or sys.stderr
    if enabled:
        print(f"flowforge: {what}" + (f" ({detail})" if detail else "") + " ...", file=out, flush=True)
    started = time.perf_counter()
    yield
    if enabled:
        print(f"flowforge: {what}: done in {time.perf_counter() - started:.1f} s", file=out, flush=True)
