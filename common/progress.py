"""Progress bars for the whole project: a tqdm bar on a terminal, clean lines in a log file.

Every progress bar of the project comes from `progress_bar` (and every message printed beside
one goes through `write`). What it writes depends on the stream (``file``, default stderr):

* **a terminal** (``file.isatty()``): a normal ``tqdm`` bar, redrawn in place.
* **anything else** (a file, a pipe, a SLURM log): never a carriage return. The bar writes whole
  lines ending in ``\\n`` and flushes each one:

  - one line when it starts: ``pretrain: 0/24000 it (0%), started``;
  - then at most one line every ``interval`` seconds (default 30, environment variable
    ``DINO_PROGRESS_SECONDS``), written by the first update, ``set_postfix`` or
    ``set_description`` after the interval has passed, with the rate since the previous line and
    the time left: ``pretrain: 1200/24000 it (5%), 38.2 it/s, elapsed 0:31, eta 9:56, loss=5.12 lr=0.0012``;
  - one line when it is closed (end of the loop, of the ``with`` block, or ``close()``), with the
    average rate over the whole bar and ``done`` (the total was reached, or there is none) or
    ``stopped`` (closed before its total): ``pretrain: 24000/24000 it (100%), 38.2 it/s, elapsed 10:28, done``.

  A bar made with ``leave=False`` (a transient inner bar, e.g. one epoch of a probe) writes no
  start line, its periodic lines only once it has run for ``interval`` seconds, and an end line
  only if it wrote a periodic one: short inner loops leave nothing in the log.

  A 12-epoch pretraining log therefore holds a few hundred short lines instead of one
  carriage-return line of hundreds of kilobytes.

``disable=True`` gives a silent bar in both cases (``disable=None``, tqdm's "off when not a
terminal", counts as ``False`` here: a log gets lines instead). `write` prints a message as its own
line in both modes (a terminal bar is cleared and redrawn around it).

The object returned is a ``tqdm`` instance either way (`ProgressBar`): ``update``, ``set_postfix``,
``set_postfix_str``, ``set_description``, ``write``, ``close``, ``reset``, iteration, ``len`` and
the context manager behave as tqdm's, and ``n``, ``total``, ``desc`` hold the same values.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections import OrderedDict
from numbers import Number

from tqdm import tqdm

DEFAULT_SECONDS = 30.0
SECONDS_VARIABLE = "DINO_PROGRESS_SECONDS"

ProgressBar = tqdm  # what `progress_bar` returns: a tqdm bar or a `LineProgress` (a tqdm subclass)

# keywords that only shape a redrawn terminal bar; a line bar ignores them
_TERMINAL_ONLY = ("ncols", "nrows", "dynamic_ncols", "bar_format", "ascii", "colour", "mininterval",
                  "maxinterval", "miniters", "smoothing", "delay")

_warned_variable: set[str] = set()


def _clock() -> float:
    """Seconds on a monotonic clock (a module function, so tests can replace it)."""
    return time.monotonic()


def interval_seconds() -> float:
    """Seconds between two progress lines: $DINO_PROGRESS_SECONDS, else 30.

    A value that is not a number >= 0 gives the default, with one warning line on stderr.
    """
    raw = os.environ.get(SECONDS_VARIABLE)
    if raw is None or not raw.strip():
        return DEFAULT_SECONDS
    try:
        seconds = float(raw)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(raw)
        return seconds
    except ValueError:
        if raw not in _warned_variable:
            _warned_variable.add(raw)
            print(f"warning: {SECONDS_VARIABLE}={raw!r} is not a number of seconds >= 0; "
                  f"progress lines every {DEFAULT_SECONDS:g} s", file=sys.stderr, flush=True)
        return DEFAULT_SECONDS


def is_terminal(stream) -> bool:
    """True when ``stream`` is a terminal (a bar can be redrawn in place there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, *, total=None, desc: str | None = None, unit: str = "it",
                 disable: bool | None = False, leave: bool | None = True, file=None,
                 interval: float | None = None, **kw) -> ProgressBar:
    """A progress bar over ``iterable`` (or driven by ``update``), drawn for the stream it writes to.

    ``file`` (default ``sys.stderr``, looked up at call time) a terminal: ``tqdm(...)`` with these
    arguments and ``kw`` (e.g. ``initial``, ``dynamic_ncols``, ``position``, ``postfix``).
    Otherwise: a `LineProgress` writing whole lines (see the module docstring) every ``interval``
    seconds (default: `interval_seconds`); ``kw`` that only shape a redrawn bar are ignored.
    ``disable=True``: a silent tqdm bar (tqdm's: it does not count either).
    """
    file = sys.stderr if file is None else file
    disable = bool(disable)
    if disable or is_terminal(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave, file=file, **kw)
    for key in _TERMINAL_ONLY:
        kw.pop(key, None)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, leave=leave, file=file,
                        interval=interval_seconds() if interval is None else interval, **kw)


def write(message: str, file=None, end: str = "\n") -> None:
    """Print ``message`` as its own line beside any bar (tqdm.write: default stream stdout, as tqdm's)."""
    tqdm.write(message, file=file, end=end)


def _count(value) -> str:
    """An iteration count as written in a line: integers as such, other numbers with 3 digits."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}"
    return str(int(value)) if isinstance(value, Number) else str(value)


class LineProgress(tqdm):
    """A tqdm bar for streams that are not terminals: whole lines, at most one per ``interval`` s.

    It never writes ``\\r`` nor cursor moves: ``display`` writes one complete line and flushes,
    ``clear`` and ``moveto`` do nothing, ``refresh`` (called by ``update``, ``set_postfix``,
    ``set_description`` and after a `write`) writes a line only when ``interval`` seconds have passed
    since the previous one, and ``close`` writes the end line. Use `progress_bar` to make one.
    """

    def __init__(self, iterable=None, *args, interval: float = DEFAULT_SECONDS, **kwargs):
        self._interval = float(interval)
        self._t0 = _clock()
        self._n0 = kwargs.get("initial", 0) or 0
        self._last_line_t: float | None = None
        self._last_line_n = self._n0
        self._lines = 0
        kwargs.update(mininterval=0, miniters=1, dynamic_ncols=False)
        super().__init__(iterable, *args, **kwargs)

    # --- when a line is written -------------------------------------------------------------
    def _transient(self) -> bool:
        """leave=False (or None on an inner bar): no start line, no end line unless one was written."""
        return not (abs(getattr(self, "pos", 0)) == 0 if self.leave is None else self.leave)

    def _due(self) -> bool:
        if self._last_line_t is None:
            if not self._transient():
                return True  # the start line
            return _clock() - self._t0 >= self._interval
        return _clock() - self._last_line_t >= self._interval

    def update(self, n=1):
        """Add ``n`` to the count; write a line if ``interval`` seconds have passed since the last one."""
        if self.disable:
            return None
        self.n += n
        return self.refresh(lock_args=self.lock_args)

    def __iter__(self):
        if self.disable:
            yield from self.iterable
            return
        try:
            for obj in self.iterable:
                yield obj
                self.update(1)
        finally:
            self.close()

    def refresh(self, nolock=False, lock_args=None):
        """Write a progress line if one is due (never more than one per ``interval`` seconds)."""
        if self.disable or not self._due():
            return False
        if not nolock:
            if lock_args:
                if not self._lock.acquire(*lock_args):
                    return False
            else:
                self._lock.acquire()
        try:
            if self._due():  # another thread may have written it while we waited for the lock
                self.display()
        finally:
            if not nolock:
                self._lock.release()
        return True

    def display(self, msg=None, pos=None):
        """Write ``msg`` (default: the progress line) as one line; ``msg=''`` (tqdm's clear) writes nothing."""
        if msg == "":
            return False
        now = _clock()
        self._emit(self._line(now) if msg is None else str(msg))
        self._last_line_t, self._last_line_n = now, self.n
        return True

    def clear(self, nolock=False):
        """Nothing to clear: every line is complete."""

    def moveto(self, n):
        """No cursor moves in a log."""

    def reset(self, total=None):
        """Back to 0 (and a new ``total``); the next update or refresh writes a start line."""
        self.n = 0
        if total is not None:
            self.total = None if total == float("inf") else total
        if self.disable:
            return
        self.last_print_n = 0
        self.last_print_t = self.start_t = self._time()
        self._t0, self._n0, self._last_line_t, self._last_line_n, self._lines = _clock(), 0, None, 0, 0
        self.refresh()

    def close(self):
        """Write the end line (unless a transient bar never wrote a line) and stop."""
        if getattr(self, "disable", True):
            return
        self.disable = True
        transient = self._transient()
        self._decr_instances(self)
        if transient and not self._lines:
            return
        with self._lock:
            self._emit(self._line(_clock(), final=True))

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        """As tqdm's, with the fields joined by spaces (``loss=5.12 lr=0.0012``): a line's parts are comma-separated."""
        postfix = OrderedDict([] if ordered_dict is None else ordered_dict)
        for key in sorted(kwargs):
            postfix[key] = kwargs[key]
        self.postfix = " ".join(f"{key}={self.format_num(value) if isinstance(value, Number) else str(value).strip()}"
                                for key, value in postfix.items())
        if refresh:
            self.refresh()

    # --- what a line says -----------------------------------------------------------------
    def _emit(self, line: str) -> None:
        self.fp.write(line.replace("\r", " ").rstrip("\n") + "\n")
        self.fp.flush()
        self._lines += 1

    def _rate(self, count: float, seconds: float) -> str | None:
        if count <= 0 or seconds <= 0:
            return None
        rate = count / seconds
        unit = self.unit or "it"
        return f"{rate:.1f} {unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}"

    def _line(self, now: float, final: bool = False) -> str:
        unit = self.unit or "it"
        n, total = self.n, self.total
        text = f"{_count(n)}/{_count(total)} {unit}" if total else f"{_count(n)} {unit}"
        if total:
            text += f" ({int(100 * n / total) if n < total else 100}%)"
        prefix = (self.desc or "").rstrip(": ")
        parts = [f"{prefix}: {text}" if prefix else text]
        elapsed = now - self._t0
        if final:
            rate = self._rate(n - self._n0, elapsed)
        elif self._last_line_t is None:
            rate = None if not self._transient() else self._rate(n - self._n0, elapsed)
        else:
            rate = self._rate(n - self._last_line_n, now - self._last_line_t)
        if rate:
            parts.append(rate)
        if self._last_line_t is None and not self._transient() and not final:
            parts.append("started")
        else:
            parts.append(f"elapsed {self.format_interval(elapsed)}")
        if final:
            parts.append("done" if not total or n >= total else "stopped")
        elif total and rate and n < total:
            since = (n - self._n0, elapsed) if self._last_line_t is None else \
                (n - self._last_line_n, now - self._last_line_t)
            parts.append(f"eta {self.format_interval((total - n) * since[1] / since[0])}")
        if self.postfix:
            parts.append(str(self.postfix))
        return ", ".join(parts)
