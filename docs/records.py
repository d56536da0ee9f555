"""Figures from the committed records, for the docs (inserted at build time) and the README
(checked by ``tests/test_docs.py``).

In a page: ``{{ rec("docs/results/quickstart/results.json", "top1_error", ".4f") }}``
(path from the repository root; ``key`` with dots, list items by index: ``runs.0.steps``).
"""
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def value(path: str, key: str, root: str = REPO):
  """The value at ``key`` of the JSON record ``path`` (under ``root``); KeyError naming
  both if absent."""
  with open(os.path.join(root, path), encoding="utf-8") as f:
    node = json.load(f)
  for part in key.split("."):
    try:
      node = node[int(part)] if isinstance(node, list) else node[part]
    except (KeyError, IndexError, ValueError) as e:
      raise KeyError(f"{path} has no {key!r} (at {part!r})") from e
  return node


def rec(path: str, key: str, fmt: str = "", scale: float = 1.0, root: str = REPO) -> str:
  """``value(path, key)`` (times ``scale`` when numeric) formatted with ``fmt``
  (a format spec such as ".4f", ".1%", ",d"; "mmss": seconds as "M min SS s")."""
  v = value(path, key, root)
  if isinstance(v, (int, float)) and not isinstance(v, bool) and scale != 1.0:
    v = v * scale
  if fmt == "mmss":
    m, s = divmod(int(round(v)), 60)
    return f"{m} min {s:02d} s"
  return format(v, fmt)


def floors() -> str:
  """The package's floors as a Markdown table, read from the import-linter contract in
  setup.cfg (top floor first), each module with the first line of its docstring."""
  import ast
  import configparser
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  layers = [l.strip() for l in cfg["importlinter:contract:floors"]["layers"].splitlines()
            if l.strip()]
  rows = ["| floor | module | what it holds |", "|---|---|---|"]
  for i, layer in enumerate(layers):
    for name in (n.strip() for n in layer.split("|")):
      base = os.path.join(REPO, "zfnet_jax", *name.split("."))
      path = os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"
      with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
      first = doc.split("\n\n")[0].replace("\n", " ").replace("|", "\\|").replace("<", "&lt;")
      shown = name + "/" if os.path.isdir(base) else name
      rows.append(f"| {len(layers) - 1 - i} | `{shown}` | {first} |")
  return "\n".join(rows)


def rooms() -> str:
  """Each folder's floors, read from its import-linter contract in setup.cfg, as a
  Markdown table (folder, floors from the top, joined by " > ")."""
  import configparser
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  rows = ["| folder | its floors, top first |", "|---|---|"]
  for name in cfg.sections():
    if not name.startswith("importlinter:contract:") or name.endswith(":floors"):
      continue
    contract = cfg[name]
    layers = [l.strip().replace("|", "\\|") for l in contract["layers"].splitlines()
              if l.strip()]
    folder = contract["containers"].strip().split(".", 1)[1]
    rows.append(f"| `{folder}/` | {' > '.join(layers)} |")
  return "\n".join(rows)


# The README's measured figures: (record, key, format).  Each must appear in the README in
# a paragraph that links its record (``readme_mismatches``; tests/test_docs.py).
README_FIGURES = [
    ("benchmarks/results/quickstart_runs.json", "runs.2.seconds", "mmss"),
    ("benchmarks/results/quickstart_runs.json", "runs.1.seconds", "mmss"),
    ("benchmarks/results/quickstart_runs.json", "runs.0.seconds", "mmss"),
    ("benchmarks/results/quickstart_runs.json", "machine.cpu", ""),
    ("docs/results/quickstart/results.json", "top1_error", ".4f"),
    ("docs/results/quickstart/results.json", "top1_error_10crop", ".4f"),
    ("benchmarks/results/suite.json", "machine.cpu", ""),
    ("benchmarks/results/suite.json", "counts.passed", "d"),
    ("benchmarks/results/suite.json", "seconds", "mmss"),
]


def readme_mismatches(root: str = REPO, figures=None) -> list[str]:
  """One line per README figure that is not its record's value, or not in a paragraph
  linking that record (``root``: a repository checkout)."""
  with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
    paragraphs = f.read().split("\n\n")
  bad = []
  for path, key, fmt in figures or README_FIGURES:
    text = rec(path, key, fmt, root=root)
    if not any(text in p and f"({path})" in p for p in paragraphs):
      bad.append(f"README: {text!r} ({path}: {key}) is not in a paragraph linking {path}")
  return bad
