"""The experiment configurations, shipped with the package.

Each file defines ``get_config(variant="")`` (or ``get_sweep``) and is loaded by
path, never imported: ``--config=experiments/zfnet.py`` in a clone of the
repository, or ``--config=zfnet`` by name anywhere (``configs.experiment_path``).
"""
