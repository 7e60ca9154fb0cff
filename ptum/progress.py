"""Progress of a long loop, for a person at a terminal and for a log alike.

    with progress(total=150, desc="demo grid", unit="cell", initial=cached) as bar:
        for cell in todo:
            ...
            bar.update(1)

On a terminal it is a tqdm bar. When stderr is not a terminal (a log file, `make run 2>&1 |
cat`, CI, a Prefect worker) tqdm turns itself off, and a loop of ten minutes would print nothing:
a user cannot tell progress from a hang. There it is `LogLines`: one line when the loop starts,
then one at most every `every_s` seconds (a minute by default) — from a timer as well, so a
single step longer than that still shows the loop is alive — and one when it ends:

    demo grid: 37/150 cells (25%), elapsed 2:10, ETA 6:37
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from tqdm import tqdm

EVERY_S = 60.0  # a log line at most this often


def _clock(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "sh", "tch")) else "s")  # batches, epochs


class LogLines:
    """A progress counter that writes whole lines (the subset of tqdm's interface ptum uses:
    update, refresh, reset, set_description, set_postfix, set_postfix_str, close, n, total,
    disable, a context)."""

    disable = False

    def __init__(
        self,
        *,
        total: int | None,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        every_s: float = EVERY_S,
        file: IO[str] | None = None,
        ends: bool = True,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.ends = ends  # a line when the loop starts and ends (an inner loop: only timed ones)
        self.initial, self.every_s = initial, every_s
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self._t0 = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if ends:
            self._write()
        self._timer = threading.Thread(target=self._tick, daemon=True, name=f"progress {desc}")
        self._timer.start()

    def line(self) -> str:
        """'DESC: N/TOTAL UNITs (P%), elapsed M:SS, ETA M:SS[, POSTFIX]'."""
        elapsed = time.monotonic() - self._t0
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        text = f"{self.desc}: {done} {_plural(self.unit)}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", elapsed {_clock(elapsed)}"
        fresh = self.n - self.initial  # work done in this run: cached steps take no time
        if self.total is not None and 0 < fresh and self.n < self.total:
            text += f", ETA {_clock(elapsed / fresh * (self.total - self.n))}"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _write(self) -> None:
        with self._lock:
            self.file.write(self.line() + "\n")
            self.file.flush()
            self._last = time.monotonic()

    def _due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def _tick(self) -> None:
        while not self._closed.wait(timeout=max(0.05, self.every_s / 10)):
            if self._due():
                self._write()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def refresh(self) -> None:
        if self._due():
            self._write()

    def reset(self, total: int | None = None) -> None:
        """Count again from 0 (to `total`): the next pass of an inner loop."""
        self.n = self.initial = 0
        self.total = total if total is not None else self.total
        self._t0 = time.monotonic()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc
        if refresh:
            self.refresh()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(dict(ordered_dict) if ordered_dict else {}), **kwargs}
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in items.items()), refresh)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        if refresh:
            self.refresh()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._timer.join()
        if self.ends:
            self._write()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    *,
    total: int | None,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    leave: bool = True,
    every_s: float = EVERY_S,
    file: IO[str] | None = None,
) -> tqdm | LogLines:
    """A tqdm bar when `file` (default stderr) is a terminal, else `LogLines`; `leave=False`
    (an inner loop, e.g. the batches of one epoch) logs only its timed lines."""
    stream = file if file is not None else sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream)
    return LogLines(
        total=total, desc=desc, unit=unit, initial=initial, every_s=every_s, file=file, ends=leave
    )
