"""Networks as the analyses see them: ours (``network(model)``) or any other
(``from_features``), with their receptive fields.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from zfnet_jax import xla
from zfnet_jax.deconv import rewrite
from zfnet_jax.deconv.checks import _check_images
from zfnet_jax.deconv.projection import _project_core, _project_requests, project_many
from zfnet_jax.nn import geometry, models, rules

# ----------------------------------------------------------------------------
# Networks as the analyses see them.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """A CNN as the analyses see it.

  features: (variables, images (N, S, S, C)) -> {layer: (N, H, W, C) or (N, units)},
    with "logits" for analyses that read class probabilities.
  layer_table: input_size -> [geometry.LayerSpec] (names, kinds, maps, map sides),
    so ``geometry.layer_shapes``, ``geometry.check_layer``... work on it.
  project: (variables, images (R, S, S, C), *, layer, channels (R,), positions
    (R, 2) or None, rule, chunk_size, progress) -> (R, S, S, C) projections.
  fields: input_size -> {spatial layer: geometry.ReceptiveField}, or None if
    unknown (analyses that crop to receptive fields then say so).
  module: the Flax module, when there is one.
  """
  features: Callable
  layer_table: Callable[[int], list]
  project: Callable
  fields: Callable[[int], dict] | None = None
  name: str = "network"
  module: Any = None

  @functools.cached_property
  def jit_features(self) -> Callable:
    """jit(features): one compilation per input shape, reused by every analysis."""
    return xla.jit(self.features)

  def receptive_fields(self, input_size: int) -> dict:
    if self.fields is None:
      raise ValueError(f"the receptive fields of {self.name} are unknown: give "
                       "receptive_fields= to deconv.from_features")
    return self.fields(input_size)

  def param(self, variables, layer: str, name: str = "kernel"):
    """A parameter of a layer (``variables["params"][layer][name]``), or None."""
    params = variables.get("params", {}) if hasattr(variables, "get") else {}
    return params.get(layer, {}).get(name) if hasattr(params, "get") else None


def _paper_features(model, variables, images):
  return model.apply(variables, images, method="features")


@functools.lru_cache(maxsize=32)
def network(model: models.PaperNet) -> Network:
  """One of our models as a Network (cached per model, so compilations are shared)."""
  return Network(features=functools.partial(_paper_features, model),
                 layer_table=model.layer_table,
                 project=functools.partial(project_many, model),
                 fields=functools.partial(geometry.receptive_fields, model),
                 name=type(model).__name__, module=model)


def as_network(model) -> Network:
  """``model`` if it is a Network, else ``network(model)`` (one of our models)."""
  return model if isinstance(model, Network) else network(model)


@functools.partial(xla.jit, static_argnames=("features", "layer", "rule"))
def _project_features(features, variables, images, channels, positions, strongest, layer,
                      rule):
  g = rewrite.deconvnet_transform(lambda v, x: features(v, x)[layer], rule)
  return _project_core(lambda x: g(variables, x), images, channels, positions, strongest)


def _fit_field(left: np.ndarray, right: np.ndarray, s: int) -> tuple[int, int, int]:
  """(size, stride, offset) whose windows, clipped to [0, s), are columns
  [left[j], right[j]] for every unit j (see ``probe_receptive_fields``)."""
  j = np.arange(len(left))
  for stride in range(1, s + 1):
    offsets = np.arange(s - 1, -4 * s, -1)                   # least padding first
    starts = offsets[:, None] + j * stride                   # (O, W)
    ok = (np.clip(starts, 0, s - 1) == left).all(axis=1)
    for offset, start in zip(offsets[ok], starts[ok]):
      free = right < s - 1                                   # right edges inside the image
      if free.any():
        size = int(right[free][0] - start[free][0] + 1)
      else:
        size = int(max(1, (s - start).max()))
      if (np.clip(start + size - 1, 0, s - 1) == right).all():
        return size, stride, int(offset)
  raise ValueError("no receptive-field geometry fits the probed windows")


def probe_receptive_fields(features: Callable, variables, channels: int, input_size: int, *,
                           batch_size: int = 16) -> dict[str, geometry.ReceptiveField]:
  """Receptive field of every spatial layer of ``features``, found by probing.

  Image c of a batch holds NaN in input column c (every row and channel); a unit
  whose map column turns NaN sees that column.  The columns each unit sees give its
  window clipped to the image; ``_fit_field`` finds the geometry that reproduces
  every clipped window exactly (where the image is too small to tell, the smallest
  stride, then the least padding and the smallest size).  Rows are assumed to behave as columns (square kernels, symmetric strides).
  Raises ValueError for a layer no NaN reaches (an op that stops NaNs, e.g.
  ``jnp.where(x > 0, x, 0)``): give ``receptive_fields=`` then.
  """
  s = int(input_size)
  jit = jax.jit(features, compiler_options=xla.nan_propagating_options())
  seen = {}                                   # layer -> (S, W) bool: column c hits unit column j
  for c0 in range(0, s, batch_size):
    cols = np.arange(c0, min(c0 + batch_size, s))
    x = np.zeros((len(cols), s, s, channels), np.float32)
    x[np.arange(len(cols)), :, cols, :] = np.nan
    for name, act in jit(variables, jnp.asarray(x)).items():
      if np.ndim(act) != 4:
        continue
      hit = np.isnan(np.asarray(act)).any(axis=(1, 3))          # (B, W)
      seen.setdefault(name, []).append(hit)
  out = {}
  for name, parts in seen.items():
    hit = np.concatenate(parts)                                 # (S, W)
    w = hit.shape[1]
    if not hit.any(axis=0).all():
      raise ValueError(f"probing the receptive fields of {name!r}: NaN reached no input "
                       "for some of its units (an op that stops NaN, such as "
                       "jnp.where(x > 0, x, 0)?); give receptive_fields= to from_features")
    left = np.array([np.flatnonzero(hit[:, j])[0] for j in range(w)])
    right = np.array([np.flatnonzero(hit[:, j])[-1] for j in range(w)])
    size, stride, offset = _fit_field(left, right, s)
    out[name] = geometry.ReceptiveField(size, stride, offset)
  return out


def from_features(features: Callable, variables, channels: int, *,
                  receptive_fields: Callable[[int], dict] | Mapping | None = None,
                  name: str = "network") -> Network:
  """Any CNN as a Network, from ``features(variables, images) -> {layer: activation}``.

  Projections go through ``rewrite.deconvnet_transform`` (its ReLUs and
  max-pools take the rule).  ``channels``: input channels; ``variables``: any
  variables of the network (only their shapes are kept, for the layer table).
  ``receptive_fields``: {layer: geometry.ReceptiveField} or input_size -> that; None:
  found by ``probe_receptive_fields`` (once per input size, cached).
  """
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                          variables)

  @functools.lru_cache(maxsize=8)
  def table(input_size: int) -> list:
    x = jax.ShapeDtypeStruct((1, input_size, input_size, channels), jnp.float32)
    shapes = jax.eval_shape(features, abstract, x)
    return [geometry.LayerSpec(k, "fc", v.shape[-1]) if len(v.shape) == 2 else
            geometry.LayerSpec(k, "conv", v.shape[-1], out=v.shape[1]) for k, v in shapes.items()]

  def project(variables, images, *, layer, channels, positions=None, rule="deconvnet",
              chunk_size=32, progress=False):
    rules.get(rule)
    _check_images(images)
    batch = lambda name, *args: _project_features(features, variables, *args, layer=name,
                                                  rule=rule)
    return _project_requests(batch, net, images, layer, channels, positions, chunk_size,
                             progress, rule)

  fields = receptive_fields
  if isinstance(receptive_fields, Mapping):
    fields = lambda input_size: dict(receptive_fields)
  elif receptive_fields is None:                       # found by probing, once per size
    fields = functools.lru_cache(maxsize=8)(
        lambda input_size: probe_receptive_fields(features, variables, channels, input_size))
  net = Network(features, table, project, fields, name)
  return net

