"""The data-parallel steps, written per device: ``lax.pmean`` over the named axis
``AXIS`` inside a function that ``jax.jit`` + ``jax.shard_map`` map over all devices.

The train step (the paper's recipe, Sec. 3), the eval step (centre crop or the ten
crops of Sec. 3) and the evaluation loop over a split; ``Run``, what stays fixed while training, and the step counts of a run.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zfnet_jax import console, xla
from zfnet_jax.data import iterators, preprocessing, sources
from zfnet_jax.nn import models
from zfnet_jax.training import train_state

AXIS = "data"


# ----------------------------------------------------------------------------
# Steps (written per device).
# ----------------------------------------------------------------------------

def _errors(logits, labels, mask):
  """Summed (top-1 wrong, top-5 wrong) over valid examples."""
  k = min(5, logits.shape[-1])
  topk = lax.top_k(logits, k)[1]
  hit1 = topk[:, 0] == labels
  hit5 = jnp.any(topk == labels[:, None], axis=-1)
  return jnp.sum(mask * ~hit1), jnp.sum(mask * ~hit5)


def _over_devices(reduce, tree):
  """``reduce(tree, AXIS)`` (``lax.pmean`` or ``lax.psum``); on a one-device mesh the tree
  itself, so the compiled step holds no collective that could wait on anything."""
  return tree if lax.axis_size(AXIS) == 1 else reduce(tree, AXIS)


def train_step(state: train_state.TrainState, batch, *, model, tx, lr_fn, clip_radius):
  """One SGD step on this device's part of the batch; returns (state, metrics)."""
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

  def loss_fn(params):
    logits = model.apply({"params": params}, batch["image"], train=True,
                         rngs={"dropout": key}).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = _over_devices(lax.pmean, grads)
  lr = lr_fn(state.step) * state.lr_scale
  params, opt_state = train_state.step_update(tx, grads, state.opt_state, state.params, lr,
                                              clip_radius)
  ones = jnp.ones_like(batch["label"], jnp.float32)
  e1, e5 = _errors(logits, batch["label"], ones)
  metrics = _over_devices(lax.pmean, {"loss": loss, "top1_error": e1 / ones.size,
                                      "top5_error": e5 / ones.size})
  metrics["learning_rate"] = lr
  finite = jnp.isfinite(metrics["loss"]) & jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  ok = finite & (state.nonfinite_step < 0)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
  first_bad = (~finite) & (state.nonfinite_step < 0)
  new = new.replace(nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
                    nonfinite_loss=jnp.where(first_bad, metrics["loss"], state.nonfinite_loss))
  return new, metrics


def _crop(x, top, left, size, flip):
  x = lax.dynamic_slice_in_dim(lax.dynamic_slice_in_dim(x, top, size, 1), left, size, 2)
  return x[:, :, ::-1] if flip else x


def eval_step(params, batch, *, model, crop_size, ten_crop):
  """Summed counts over this batch (all devices): n, loss, top-1/5 wrong (centre, 10-crop).

  ``batch['image']`` is (b, R, R, C); the centre crop and the paper's 10 crops
  (softmax averaged) are cut on device.
  """
  images, labels, mask = batch["image"], batch["label"], batch["mask"]
  size = images.shape[1]
  apply = lambda x: model.apply({"params": params}, x, train=False).astype(jnp.float32)
  c = (size - crop_size) // 2
  logits = apply(_crop(images, c, c, crop_size, False))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  e1, e5 = _errors(logits, labels, mask)
  out = {"n": jnp.sum(mask), "loss": jnp.sum(loss * mask), "top1_wrong": e1, "top5_wrong": e5}
  if ten_crop:
    probs = jnp.zeros_like(logits)
    for top, left, flip in preprocessing.ten_crop_offsets(size, crop_size):
      probs = probs + jax.nn.softmax(apply(_crop(images, top, left, crop_size, flip)))
    out["top1_wrong_10crop"], out["top5_wrong_10crop"] = _errors(probs, labels, mask)
  return _over_devices(lax.psum, out)


def total_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def evolution_steps(config, steps_per_epoch: int, num_steps: int) -> dict[int, float]:
  """{step: epoch} of the feature-evolution checkpoints (Fig. 4), scaled to the run.

  Epochs beyond the run (a shortened run) are left out with a one-line notice."""
  run_epochs = num_steps / steps_per_epoch
  ref = config.evolution_reference_epochs
  scale = run_epochs / ref if ref and ref > 0 else 1.0
  out, dropped = {}, []
  for e in config.evolution_epochs:
    epoch = e * scale
    if epoch > run_epochs + 1e-6:
      dropped.append(e)
      continue
    step = min(num_steps, max(1, int(round(epoch * steps_per_epoch))))
    out[step] = round(step / steps_per_epoch, 4)
  if dropped:
    console.say(f"note: evolution epochs {dropped} are beyond the run ({run_epochs:.3g} "
                f"epochs) and left out; kept: {[round(e, 4) for e in out.values()]}")
  return dict(sorted(out.items()))


def _global(batch, sharding):
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _eval_fn(model, mesh, crop_size: int, ten_crop: bool):
  """jit(shard_map(eval_step)): compiled once per setting (evaluations during training,
  the final one and the training-error one share it)."""
  return xla.jit(jax.shard_map(
      lambda p, b: eval_step(p, b, model=model, crop_size=crop_size, ten_crop=ten_crop),
      mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False))


def evaluate(config, workdir, state, model, mesh, *, ten_crop: bool, split=None,
             max_examples=-1, ids=None) -> dict:
  """Errors over a split (``ids``: those examples only), every example counted once
  (padded batches are masked)."""
  ndev = mesh.devices.size
  batch = -(-config.eval_batch_size // ndev) * ndev   # rounded up to a multiple of devices
  pc = jax.process_count()
  fn = _eval_fn(model, mesh, config.dataset.crop_size, ten_crop)
  sharding = NamedSharding(mesh, P(AXIS))
  totals = None
  for b in iterators.create_eval_iterator(
      config, workdir, split=split, batch_size=batch, max_examples=max_examples,
      full_size=True, process_index=jax.process_index(), process_count=pc, ids=ids):
    b.pop("id")
    out = fn(state.params, _global(b, sharding))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.tree.map(lambda x: float(x), jax.device_get(totals))
  n = int(totals["n"])
  res = {"loss": totals["loss"] / n, "top1_error": totals["top1_wrong"] / n,
         "top5_error": totals["top5_wrong"] / n, "num_eval_examples": n}
  if ten_crop:
    res["top1_error_10crop"] = totals["top1_wrong_10crop"] / n
    res["top5_error_10crop"] = totals["top5_wrong_10crop"] / n
  return res


@dataclasses.dataclass
class Run:
  """What stays fixed while training: the config, data sizes, model, mesh and schedule."""
  config: ml_collections.ConfigDict
  workdir: str
  info: sources.DatasetInfo
  steps_per_epoch: int
  num_steps: int
  evolution: dict[int, float]        # {step: epoch} of the Fig. 4 checkpoints
  mesh: Mesh
  model: models.PaperNet
  tx: optax.GradientTransformation

  def say(self, msg: str, warn: bool = False) -> None:
    console.say(msg, warn=warn)

