"""Static HTML pages made of Sections: the report and the visualize page.

Both pages render ``zfnet_jax.render.content.Section`` objects (data, never HTML)
through the Jinja2 templates of ``zfnet_jax/render/templates`` (``page.html.j2`` on
``base.html.j2``) with autoescaping on, so every piece of text from data,
config or results is escaped.  A page carries no script, a
Content-Security-Policy that forbids scripts and any load from the network,
and ``referrer: no-referrer``; figure paths must be relative to the page
(no scheme, no absolute path, no '..').  Long tables and text blocks start
folded (``<details>``).
"""
from __future__ import annotations

import os
import re
import urllib.parse
from typing import Sequence

import jinja2
import markupsafe

from zfnet_jax.render import content

FOLD_LINES = 40      # longer text blocks and tables start folded (<details>)
CSP = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("zfnet_jax.render", "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined,
                          trim_blocks=False, lstrip_blocks=False)


def anchor(text: str, used: set[str]) -> str:
  """A unique HTML id from ``text`` (letters, digits, '_' and '-'), added to ``used``."""
  base = re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "section"
  a, n = base, 1
  while a in used:
    n += 1
    a = f"{base}-{n}"
  used.add(a)
  return a


def src(rel: str) -> str:
  """A figure path relative to the page as a URL; ValueError for anything else."""
  rel = str(rel).replace(os.sep, "/")
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", rel) or rel.startswith("/") or ".." in rel.split("/"):
    raise ValueError(f"figure path {rel!r} must be relative to the page's directory")
  return urllib.parse.quote(rel)


def render(title: str, sections: Sequence[content.Section], note: str = "") -> str:
  """The page: a table of contents and one <section> per Section, all text escaped."""
  used = {"top", "contents"}
  view = [dict(title=str(s.title), anchor=anchor(s.anchor, used),
               paragraphs=[str(p) for p in s.paragraphs],
               preformatted=[str(p) for p in getattr(s, "preformatted", [])],
               figures=[(src(rel), str(caption)) for rel, caption in s.figures],
               tables=[([str(h) for h in header], [[str(c) for c in row] for row in rows])
                       for header, rows in s.tables])
          for s in sections]
  return _ENV.get_template("page.html.j2").render(
      title=str(title), note=str(note or ""), sections=view, csp=markupsafe.Markup(CSP),
      fold_lines=FOLD_LINES)
