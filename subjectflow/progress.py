"""Progress that reaches whoever is watching: a tqdm bar on a terminal, and where there is
none (a deployment's logs, CI, `nohup`) a line every `every_s` seconds and one at the end,
with step/total, the latest figures, rate and time left. A progress opened inside another
(the images of one evaluated prompt) is a transient bar, and off a terminal it reports only
the slow stretches: its end is the outer one's next step."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm import tqdm


_depth: ContextVar[int] = ContextVar("progress_depth", default=0)  # per thread: tasks run in threads


class Progress:
    def __init__(self, total: int, desc: str, unit: str, initial: int, every_s: float,
                 say: Callable[[str], None] | None, bar: tqdm | None, final_line: bool = True) -> None:
        self.total, self.desc, self.unit, self.every_s, self.say, self.bar = total, desc, unit, every_s, say, bar
        self.final_line = final_line
        self.done = self._start = initial
        self._t0 = self._last = time.monotonic()

    def update(self, n: int = 1, **figures: float) -> None:
        self.done += n
        if self.bar is not None:
            if figures:
                self.bar.set_postfix({k: f"{v:.4f}" for k, v in figures.items()})
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or (self.final_line and self.done >= self.total):
            self._last = now
            # print looked up now, not bound at import: Prefect's log_prints swaps it per run.
            (self.say or print)(self.line(now, figures))

    def line(self, now: float, figures: dict[str, float]) -> str:
        rate = (self.done - self._start) / max(now - self._t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        shown = "".join(f" {k} {v:.4f}" for k, v in figures.items())
        eta = f"{left:.0f} s" if left != float("inf") else "?"
        return f"{self.desc} {self.done}/{self.total} {self.unit}s{shown}, {rate:.2f} {self.unit}/s, {eta} left"


@contextmanager
def progress(total: int, desc: str, unit: str = "step", initial: int = 0, every_s: float = 30.0,
             say: Callable[[str], None] | None = None) -> Iterator[Progress]:
    """`say` defaults to print, which Prefect's `log_prints` sends to the run's logs."""
    depth = _depth.get()
    token = _depth.set(depth + 1)
    try:
        if sys.stderr.isatty():
            with tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=depth == 0, position=depth) as bar:
                yield Progress(total, desc, unit, initial, every_s, say, bar)
        else:
            yield Progress(total, desc, unit, initial, every_s, say, None, final_line=depth == 0)
    finally:
        _depth.reset(token)
