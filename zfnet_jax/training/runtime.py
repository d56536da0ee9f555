"""What keeps a run safe on a shared machine: multi-host start-up, SIGTERM as a clean
stop (exit ``EXIT_PREEMPTED``), one training process per workdir, a full disk.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from zfnet_jax import rundir

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: stopped by SIGTERM after saving; rerun to resume


# ----------------------------------------------------------------------------
# Set-up helpers.
# ----------------------------------------------------------------------------

def maybe_initialize_distributed(config) -> None:
  """jax.distributed.initialize() if config.distributed or JAX_COORDINATOR_ADDRESS is set.

  Must run before any device is touched.  Reads JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID when present (else auto-detection).
  """
  env = os.environ
  if not (config.distributed or env.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
    if jax.config.jax_platforms in (None, "", "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


class Preempted(BaseException):
  """SIGTERM outside the training loop (start-up, final evaluation, report): the work in
  progress is dropped (temporary files removed by the ``finally`` blocks it unwinds).
  A BaseException, so ``except Exception`` (a checkpoint fallback) cannot swallow it."""


@contextlib.contextmanager
def sigterm_raises():
  """While inside: the first SIGTERM raises ``Preempted`` in the main thread (later ones
  are ignored, so clean-up runs).  The training loop replaces it by a flag (``_Preemption``):
  there SIGTERM finishes the step and saves it."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  fired = []

  def handle(signum, frame):
    del signum, frame
    if not fired:
      fired.append(True)
      raise Preempted()
  old = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Process 0 creates ``workdir`` and holds its training lock (``rundir.lock``) while
  inside; with several processes all of them raise ``rundir.WorkdirInUse`` if it could not."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        os.makedirs(workdir, exist_ok=True)
        stack.enter_context(rundir.lock(workdir))
      except rundir.WorkdirInUse as e:
        error = e
      except OSError as e:
        error = PermissionError(f"workdir {workdir!r} is not writable ({e.strerror})")
    if jax.process_count() > 1:
      failed = bool(np.max(multihost_utils.process_allgather(np.int32(error is not None))))
      if failed and error is None:
        error = rundir.WorkdirInUse(f"workdir {workdir} is in use: process 0 could not lock it")
    if error is not None:
      raise error
    yield


class _Preemption:
  """Records SIGTERM while training (main thread only); restores the old handler on exit.

  With several processes a SIGTERM may reach only some of them: ``agreed()``
  (called by every process after every step) gathers the flags, so all stop
  after the same step.
  """

  def __init__(self):
    self.received, self.old = False, None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self.old is not None:
      signal.signal(signal.SIGTERM, self.old)

  def agreed(self) -> bool:
    """True once any process has received SIGTERM (a collective when P > 1)."""
    if jax.process_count() == 1:
      return self.received
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.received))))


def _disk_full(e: BaseException, workdir: str) -> rundir.DiskFull:
  """The one-line error for a full disk: where, and the checkpoint that is kept."""
  ckpt = rundir.path(workdir, rundir.CHECKPOINTS)
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
  kept = (f"the last good checkpoint, step {max(steps)} in {ckpt}, is kept" if steps else
          "no checkpoint was written yet")
  return rundir.DiskFull(f"the disk is full (no space left on device writing "
                         f"{rundir.disk_full_path(e, workdir)}); training stopped; {kept}; "
                         "free space and rerun the same command to resume")

