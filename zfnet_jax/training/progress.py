"""What a training run shows and keeps while it runs: the metrics log
(``metrics.jsonl``) and the progress bar with its stall warning.
"""
from __future__ import annotations

import math
import time

import jax
import numpy as np
from clu import metric_writers

from zfnet_jax import console, rundir
from zfnet_jax.training.steps import Run

# ----------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# The run: its fixed pieces, then the steps of the recipe.
# ----------------------------------------------------------------------------

class MetricsLog:
  """metrics.jsonl + TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.path = rundir.path(workdir, rundir.METRICS)
    self.writer = (metric_writers.create_default_writer(workdir, asynchronous=False)
                   if self.active else None)

  def write(self, step: int, epoch: float, split: str, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step), "epoch": round(float(epoch), 4), "split": split}
    row.update({k: float(v) for k, v in metrics.items()})
    rundir.append_metrics(self.path, row)
    self.writer.write_scalars(int(step), {f"{split}/{k}": float(v) for k, v in metrics.items()})
    self.writer.flush()

  def drop_after(self, step: int) -> None:
    if self.active:
      rundir.drop_metrics_after(self.path, step)

  def close(self) -> None:
    if self.active:
      self.writer.close()


class _Progress:
  """The training bar, training time, the step metrics since the last log row (averaged
  into a row every ``log_every_steps`` steps) and the divergence guard.  ``record()``
  goes into each checkpoint and ``meta`` (a restored checkpoint's record; {} for a fresh
  run or one written before these fields) continues it, so a resumed run counts all its
  segments' time and logs the rows an uninterrupted run logs."""

  def __init__(self, run: Run, start: int, meta: dict):
    self.run = run
    self.pending = list(meta.get("pending_metrics", []))
    self.seconds0, self.t0 = float(meta.get("train_seconds", 0.0)), time.time()
    self.step_log = int(meta.get("log_step", start))
    self.t_log = float(meta.get("log_seconds", self.seconds0))
    self.initial_loss = meta.get("initial_loss")
    self.above = 0                  # consecutive rows above the divergence level
    self.bar = console.progress(desc=f"training {run.config.model.name}", total=run.num_steps,
                                initial=start, unit="step")

  def seconds(self) -> float:
    """Training seconds of the run so far, all segments."""
    return self.seconds0 + time.time() - self.t0

  def close(self) -> None:
    self.bar.close()

  def add(self, metrics) -> None:
    self.pending.append(metrics)

  def _floats(self) -> list[dict]:
    self.pending = [{k: float(v) for k, v in m.items()} for m in jax.device_get(self.pending)]
    return self.pending

  def record(self) -> dict:
    return {"train_seconds": self.seconds(), "pending_metrics": self._floats(),
            "log_step": self.step_log, "log_seconds": self.t_log,
            "initial_loss": self.initial_loss}

  @property
  def diverging(self) -> bool:
    """The last row was above the divergence level: no checkpoint is saved."""
    return self.above > 0

  def check_divergence(self, step: int, loss: float, mngr) -> None:
    """FloatingPointError when ``loss`` (the row at ``step``) is above ``max_loss``, or
    the rows have stayed above the divergence level for ``divergence_patience`` rows (or
    the run ends above it)."""
    c = self.run.config
    level = c.divergence_factor * max(self.initial_loss, math.log(self.run.info.num_classes))
    self.above = self.above + 1 if c.divergence_factor and loss > level else 0
    why = None
    if c.max_loss and loss > c.max_loss:
      why = f"above max_loss={c.max_loss:g}"
    elif self.above >= c.divergence_patience or (self.above and step == self.run.num_steps):
      why = (f"above {level:.4g} (divergence_factor={c.divergence_factor:g} x the starting "
             f"loss) for {self.above} log rows")
    if why:
      raise FloatingPointError(
          f"training diverged at step {step}: loss {loss:.4g} {why}; training stopped; the "
          f"last good checkpoint is step {mngr.latest_step()} in {self.run.workdir}/checkpoints "
          "(lower the learning rate)")

  def report(self, step: int, log: MetricsLog, mngr) -> None:
    run = self.run
    m = self._floats()
    if self.initial_loss is None:
      self.initial_loss = m[0]["loss"]
    self.pending = []
    avg = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
    now = self.seconds()
    sps = (step - self.step_log) / max(now - self.t_log, 1e-9)
    self.t_log, self.step_log = now, step
    avg["steps_per_second"] = sps
    avg["images_per_second"] = sps * run.config.batch_size
    log.write(step, step / run.steps_per_epoch, "train", avg)
    self.bar.set_postfix(epoch=f"{step / run.steps_per_epoch:.2f}", loss=f"{avg['loss']:.4f}",
                         err=f"{avg['top1_error']:.4f}", lr=f"{avg['learning_rate']:.1e}",
                         refresh=False)
    self.bar.update(step - self.bar.n)
    if math.isfinite(avg["loss"]):    # a non-finite one is check_finite's
      self.check_divergence(step, avg["loss"], mngr)

