"""The deconvnet of Zeiler & Fergus (Sec. 2.1) as VJPs with custom rules.

To project one activation back to pixels: run the image forward, zero every
other activation of that layer, and go down starting from the activation's own
value (as the paper does, not from 1).  Going down is the VJP of the forward
pass with the rule versions of the layers (``zfnet_jax.nn.layers``):

* max-pool unpools through the switches recorded on the way up (ties: first
  maximum in row-major order within the window);
* ReLU passes relu(R) ("deconvnet"), R * 1[X > 0] ("backprop", the gradient)
  or R * 1[X > 0] * 1[R > 0] ("guided");
* convolution goes down with its transposed (flipped) filters and no bias,
  which is exactly its VJP;
* contrast normalisation goes down with its exact VJP (``norm_rule="exact"``).

Our models switch rule by ``model.clone(rule=...)``;
``deconv.rewrite.deconvnet_transform`` does the same for any JAX function (Flax Linen,
NNX, pure JAX) by rewriting its jaxpr.  ``Network`` is how the analyses see a
CNN, ours (``network(model)``) or any other (``from_features``).

Layer names are those of ``PaperNet.features``; fc layers (fc6, fc7, logits)
count as 1x1 maps, so for them ``channel`` is the unit and the only position is
(0, 0).  ``position=None`` takes the strongest activation of the map in each
image (ties: first in row-major order).  All arrays are NHWC.

The package: ``checks`` (arguments, before any computation), ``projection`` (the core and
its entry points), ``networks`` (a CNN as the analyses see it), ``stages`` (every
stage of the way down), ``display`` (images and receptive-field crops) and ``rewrite``
(the rules for any JAX function).
"""
from zfnet_jax.deconv.checks import MAX_ABS_PIXEL, RULES, check_images
from zfnet_jax.deconv.display import crop_receptive_field, receptive_patch, to_image
from zfnet_jax.deconv.networks import (
                                      Network,
                                      as_network,
                                      from_features,
                                      network,
                                      probe_receptive_fields,
)
from zfnet_jax.deconv.projection import (
                                      project,
                                      project_fn,
                                      project_many,
                                      strongest,
                                      strongest_in,
                                      transposed_filters,
)
from zfnet_jax.deconv.stages import Stage, switches, walkthrough

__all__ = ["MAX_ABS_PIXEL", "RULES", "Network", "Stage", "as_network", "check_images",
           "crop_receptive_field", "from_features", "network", "probe_receptive_fields",
           "project", "project_fn", "project_many", "receptive_patch", "strongest", "strongest_in",
           "switches", "to_image", "transposed_filters", "walkthrough"]
