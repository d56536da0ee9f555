r"""The first-layer table, generated from the committed record.

  python launch/conv1_table.py docs/results/conv1_sweep/conv1_measures.json           # print it
  python launch/conv1_table.py docs/results/conv1_sweep/conv1_measures.json README.md # rewrite

With a README path, replaces what lies between its conv1-table markers
(``zfnet_jax.studies.conv1_sweep.TABLE_MARKERS``).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zfnet_jax import rundir
from zfnet_jax.studies import conv1_sweep


def main(argv):
  if len(argv) not in (2, 3):
    print(__doc__, file=sys.stderr)
    return 2
  try:
    table = conv1_sweep.readme_table(argv[1])
    if len(argv) == 2:
      print(table, end="")
      return 0
    with open(argv[2], encoding="utf-8") as f:
      text = conv1_sweep.replace_table(f.read(), table)
  except (ValueError, OSError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  rundir.write_text(argv[2], text)
  print(f"{argv[2]}: table from {argv[1]} ({table.count(chr(10)) - 2} rows)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
