"""The paper's analyses (Sec. 4, Figs. 4-7, Table 1) as functions of a network and arrays.

* ``atlas``: the top-k activations of every map over a split, projected (Fig. 2),
  with their legibility (``legibility``: does a projection show its patch's structure).
* ``walkthrough``: the deconvnet's way down, stage by stage, for one unit per
  layer (Fig. 1).
* ``occlusion``: occlusion sensitivity (Fig. 7).
* ``invariance``: feature distances and class probability under translation,
  scale and rotation (Fig. 5).
* ``correspondence``: Delta_l for occluded object parts vs random boxes (Table 1).
* ``evolution``: strongest activations projected at each evolution checkpoint
  (Fig. 4), and TensorBoard panels during training.
* ``diagnostics``: first-layer filters, dead filters, radial spectra and layer-2
  aliasing, ZFNet vs AlexNet (Fig. 6).
* ``transfer``: per-layer probes (Table 7) and transfer to other datasets (Sec. 5.2);
  ``transfer_tables`` writes their tables.
* ``common``: what several analyses share (activations in batches, softmax).

Each takes a ``deconv.Network`` (or one of our models) with its variables and
arrays, knows no config and no workdir, and contributes to the report through
``validate(options, net, data)`` and ``sections(context, options)``
(``zfnet_jax.render.content``); ``zfnet_jax.report.report`` lists them.
"""
