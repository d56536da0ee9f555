"""The static HTML report of a run: <workdir>/report/index.html (work in progress)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Section:
  """One section of the report, given as data (the report escapes all text).

  figures: (path relative to the report directory, caption) pairs.
  tables: (header, rows) pairs; cells are plain strings.
  """
  title: str
  anchor: str
  paragraphs: list[str] = dataclasses.field(default_factory=list)
  figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  tables: list[tuple[list[str], list[list[str]]]] = dataclasses.field(default_factory=list)
