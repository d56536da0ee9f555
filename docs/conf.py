"""Sphinx configuration: MyST Markdown pages, the API reference from the docstrings,
figures inserted from the committed records (``records.rec``).

Build (warnings are errors, as in CI):
  python -m sphinx -W --keep-going -n -b html docs docs/_build/html
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import records  # noqa: E402

project = "zfnet_jax"
author = "the zfnet_jax authors"
copyright = "2026, the zfnet_jax authors"   # pylint: disable=redefined-builtin
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.autosummary",
              "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "results", "README.md"]
myst_enable_extensions = ["substitution", "colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
myst_substitutions = {"rec": records.rec, "floors": records.floors, "rooms": records.rooms}
suppress_warnings = ["config.cache"]   # rec is a function: no config cache
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
autosummary_generate = False
nitpicky = True
nitpick_ignore_regex = [("py:.*", r"(?!zfnet_jax\.).*")]   # other libraries: not ours to document
html_theme = "sphinx_book_theme"
html_title = "zfnet_jax"
html_theme_options = {"show_toc_level": 2}


def _plain_docstring(app, what, name, obj, options, lines):
  """The package's docstrings are plain text (names, shapes, units), not reStructuredText:
  the first paragraph is shown as text, the rest as written (a literal block)."""
  del app, what, name, obj, options
  if not lines:
    return
  cut = lines.index("") if "" in lines else len(lines)
  head = [re.sub(r"_(?![A-Za-z0-9])", r"\\_",
                 l.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|"))
          for l in lines[:cut]]
  rest = lines[cut:]
  while rest and not rest[0].strip():
    rest = rest[1:]
  lines[:] = head + (["", "::", ""] + ["   " + l for l in rest] + [""] if rest else [])


def setup(app):
  app.connect("autodoc-process-docstring", _plain_docstring)
