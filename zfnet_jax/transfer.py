"""Transfer (Sec. 5.2) and per-layer probes (Table 7) of a trained model, from the command line.

  python -m zfnet_jax.transfer --config=experiments/transfer_digits.py --workdir=workdirs/quickstart
  python -m zfnet_jax.transfer --config=experiments/transfer_caltech101.py \\
      --workdir=workdirs/transfer_caltech101 --config.transfer.source_workdir=workdirs/zfnet

Writes the tables of ``analyses.transfer_tables`` to <workdir>/transfer/ and prints them.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from zfnet_jax import configs
from zfnet_jax.analyses.transfer_tables import TABLES, _tables
from zfnet_jax.render import content


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  for name, (header, rows) in _tables(config, workdir, TABLES).items():
    print(f"\n{name}:\n" + content.markdown_table(header, rows))
  print(f"Tables written to {os.path.join(workdir, 'transfer')}")

if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Output directory (and the model, unless "
                      "config.transfer.source_workdir is set).")
  config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=lambda argv: flags.FLAGS(configs.config_argv(argv)))
