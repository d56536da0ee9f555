"""What a run prints: one line per event, one progress bar per long phase, a summary table.

On a terminal the bars are tqdm's; when the output is not a terminal (CI logs,
``nohup``, a pipe) the same bar prints a plain line every ``ZFNET_PROGRESS_SECONDS``
seconds (default 30) and one when it ends, never carriage returns.  Only JAX
process 0 prints.  Library chatter (Orbax, TensorFlow INFO) is silenced by
``main`` through absl's verbosity, not here.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import os
import sys
import threading
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


def _ready(x) -> bool:
  try:
    return x.is_ready()
  except Exception:  # pylint: disable=broad-except  (deleted, or not a JAX array)
    return True


class Watchdog:
  """Says once, as a ``warning:`` line, when no step has finished for ``seconds`` (0 =
  never).  ``submit(step, outputs)`` hands over step ``step``'s outputs (JAX arrays,
  still computing under asynchronous dispatch); a daemon thread polls them in order
  (``is_ready``), so the step it names is the one really waiting, whether on the
  device or on the loop (data, Python).  Counting starts when the first step finishes
  (compilation is no stall) and stops inside ``paused()``; a finished step re-arms it.
  """

  def __init__(self, seconds: float, what: str = "training"):
    self.seconds, self.what = float(seconds), what
    self._queue = collections.deque()     # (step, outputs) submitted, not yet seen finished
    self._done, self._last, self._warned, self._paused = None, None, False, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="zfnet-watchdog", daemon=True)

  def __enter__(self):
    if self.seconds > 0:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()

  def submit(self, step: int, outputs) -> None:
    if self.seconds > 0:
      self._queue.append((step, jax.tree.leaves(outputs)))

  @contextlib.contextmanager
  def paused(self):
    self._paused += 1
    try:
      yield
    finally:
      self._paused -= 1
      if self._last is not None:
        self._last = time.monotonic()

  def _watch(self):
    while not self._stop.wait(min(self.seconds / 4, 0.5)):
      while self._queue and all(_ready(x) for x in self._queue[0][1]):
        self._done, self._last, self._warned = self._queue.popleft()[0], time.monotonic(), False
      if self._last is None or self._paused or self._warned:
        continue
      idle = time.monotonic() - self._last
      if idle >= self.seconds:
        self._warned = True
        say(f"{self.what}: step {self._done + 1} has not finished after {idle:.0f} s (the "
            f"last finished step is {self._done}); the run may be stuck: if it stays so, stop "
            "it (Ctrl-C or SIGTERM) and rerun the same command to resume from the last "
            "checkpoint", warn=True)


def is_closed_event_loop(value) -> bool:
  """TensorStore's "Event loop is closed", which Orbax's threads report after a failed
  restore or save."""
  return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def quiet_closed_event_loops() -> None:
  """Drop the "Event loop is closed" errors reported as unraisable (a traceback each on
  stderr); others pass on.  Installed once, however often called."""
  previous = sys.unraisablehook
  if getattr(previous, "zfnet_quiet", False):
    return

  def hook(unraisable):
    if not is_closed_event_loop(unraisable.exc_value):
      previous(unraisable)
  hook.zfnet_quiet = True
  sys.unraisablehook = hook


def quiet_libraries(verbose: bool) -> None:
  """A command's logging: the libraries' INFO chatter (Orbax, JAX) off unless ``verbose``,
  and a full disk said once by the run rather than by each of Orbax's threads and tasks
  (with a traceback through absl's handler), nor TensorStore's "Event loop is closed"."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  from absl import logging  # pylint: disable=g-import-not-at-top
  if not verbose:
    logging.set_verbosity(logging.WARNING)
    # Orbax warns on every read-only restore ("Given directory is read only"): errors only.
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.ERROR or f"{os.sep}orbax{os.sep}" not in r.pathname)
  logging.get_absl_handler().addFilter(
      lambda r: not any(t in r.getMessage() for t in ("No space left", "os_error_code='28'")))
  full = lambda value: (getattr(value, "errno", None) == errno.ENOSPC or
                        "No space left" in str(value))
  hook, in_thread = sys.excepthook, threading.excepthook

  def quiet(kind, value, tb):
    if not is_closed_event_loop(value):
      hook(kind, value, tb)

  def quiet_thread(args):    # Orbax's save threads, once the run has said the disk is full
    if not (is_closed_event_loop(args.exc_value) or full(args.exc_value)):
      in_thread(args)
  sys.excepthook, threading.excepthook = quiet, quiet_thread
  quiet_closed_event_loops()   # TensorStore's callbacks after a failed save report here
