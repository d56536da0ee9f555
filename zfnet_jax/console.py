"""What a run prints: one line per event, one progress bar per long phase, a summary table.

On a terminal the bars are tqdm's; when the output is not a terminal (CI logs,
``nohup``, a pipe) the same bar prints a plain line every ``ZFNET_PROGRESS_SECONDS``
seconds (default 30) and one when it ends, never carriage returns.  Only JAX
process 0 prints.  Library chatter (Orbax, TensorFlow INFO) is silenced by
``main`` through absl's verbosity, not here.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterable, Sequence

import jax
from tqdm import tqdm


def _quiet() -> bool:
  return jax.process_index() != 0


def say(msg: str, *, warn: bool = False) -> None:
  """Print one line (warnings to stderr, as ``warning: msg``) without breaking a bar; process 0 only."""
  if _quiet():
    return
  if warn:
    tqdm.write(f"warning: {msg}", file=sys.stderr)
  else:
    tqdm.write(msg, file=sys.stdout)


def interactive() -> bool:
  """True when stderr (where the bars go) is a terminal."""
  return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class _Lines(tqdm):
  """A tqdm bar for logs: a plain line every ``mininterval`` seconds once work has
  started, and one at the end."""

  def display(self, msg=None, pos=None):
    del pos
    if msg is None and self.n in (self.initial, getattr(self, "_last_n", None)):
      return True             # nothing done yet, or nothing new since the last line
    self._last_n = self.n
    print(msg or str(self), file=self.fp, flush=True)
    return True

  def clear(self, nolock=False):   # nothing to erase on a log
    del nolock

  def close(self):
    if getattr(self, "disable", True):
      return
    self._ema_dt = lambda: None   # the last line gives the overall rate
    self.display()
    self.disable = True
    self._decr_instances(self)


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None,
             unit: str = "it", initial: int = 0, disable: bool = False, **kwargs) -> tqdm:
  """A progress bar over ``iterable`` (or one updated by hand): tqdm on a terminal,
  periodic plain lines otherwise; silent when ``disable`` or on processes other than 0."""
  disable = disable or _quiet()
  if interactive():
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, disable=disable,
                dynamic_ncols=True, **kwargs)
  every = float(os.environ.get("ZFNET_PROGRESS_SECONDS", "30"))
  return _Lines(iterable, desc=desc, total=total, unit=unit, initial=initial, disable=disable,
                mininterval=every, maxinterval=every, ascii=True, ncols=100, file=sys.stderr,
                **kwargs)


class Phases:
  """Wall time per phase of a job: ``with phases("training"): ...``; ``total()`` since creation."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.start = time.time()

  @contextlib.contextmanager
  def __call__(self, name: str):
    t0 = time.time()
    try:
      yield
    finally:
      self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0

  def total(self) -> float:
    return time.time() - self.start


def table(rows: Sequence[tuple[str, str]], title: str) -> str:
  """A two-column plain-text table: ``title`` then ``name  value`` lines, aligned."""
  width = max(len(k) for k, _ in rows)
  rule = "-" * max(len(title), width + 2 + max(len(v) for _, v in rows))
  return "\n".join([title, rule] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [rule])


def minutes(seconds: float) -> str:
  """``332.4`` -> ``'5 min 32 s'``."""
  m, s = divmod(int(round(seconds)), 60)
  return f"{m} min {s} s" if m else f"{s} s"
