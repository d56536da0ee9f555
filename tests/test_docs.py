"""The README and the documentation: built with warnings as errors, figures from records,
no development history in what users read."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "docs"))
import records  # noqa: E402  pylint: disable=wrong-import-position

HISTORY = re.compile(r"(?<![\w&/#])#\d{1,4}\b(?![;\w])|\b[Ii]ssues? \d+|\bas filed\b")


def _user_facing_files():
  """The README, the docs (pages and generated result pages), the package's modules (their
  docstrings), the experiment configs' headers and the page templates."""
  files = [os.path.join(REPO, "README.md")]
  for pattern in ("docs/**/*.md", "docs/**/*.html", "docs/*.py", "zfnet_jax/**/*.py",
                  "zfnet_jax/render/templates/*"):
    files += glob.glob(os.path.join(REPO, pattern), recursive=True)
  return [f for f in files if f"{os.sep}_build{os.sep}" not in f]


def test_readme_is_short():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    assert len(f.read().splitlines()) <= 200


def test_no_development_history_where_users_read():
  found = []
  for path in _user_facing_files():
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if HISTORY.search(line):
          found.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()[:100]}")
  assert not found, "\n".join(found)


def test_the_history_check_can_fail():
  for text in ("fixed in #28", "see issue 20", "Issue 17: faster", "as filed"):
    assert HISTORY.search(text), text
  for text in ("color: #222;", "conv5", "x_2", "issue tracker"):
    assert not HISTORY.search(text), text


def test_readme_links_point_at_files_that_exist():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
  assert targets
  missing = [t for t in targets if "://" not in t and not os.path.exists(os.path.join(REPO, t))]
  assert not missing, missing


def test_readme_figures_are_their_records():
  assert records.readme_mismatches() == []


def test_every_measured_looking_number_of_the_readme_is_a_recorded_figure():
  """Decimals, times and ratios in the README are the recorded figures, or constants that
  are no measurement (dropout, the licence version, the pixel scale)."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  recorded = {records.rec(p, k, fmt) for p, k, fmt in records.README_FIGURES}
  numbers = re.findall(r"\d+ min \d+ s|\d+(?:\.\d+)?x(?![\w\d])|\d+\.\d+%?|\d+ ?(?:ms|s)\b", text)
  allowed = {"0.5", "2.0", "255.0"}   # dropout 0.5; Apache-2.0; pixels / 255.0
  stray = [n for n in numbers if n not in recorded | allowed and
           not any(n in r for r in recorded)]
  assert not stray, stray


def test_a_record_changed_by_hand_fails_the_readme_check(tmp_path):
  """Copy the README and its records, change one record value: the check names it."""
  for path in {p for p, _, _ in records.README_FIGURES} | {"README.md"}:
    os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
    shutil.copy(os.path.join(REPO, path), tmp_path / path)
  assert records.readme_mismatches(str(tmp_path)) == []
  path = tmp_path / "docs/results/quickstart/results.json"
  doc = json.loads(path.read_text())
  doc["top1_error"] = round(doc["top1_error"] + 0.01, 4)
  path.write_text(json.dumps(doc))
  bad = records.readme_mismatches(str(tmp_path))
  assert len(bad) == 1 and "top1_error" in bad[0] and "results.json" in bad[0], bad


def test_rec_formats_and_names_missing_keys():
  assert records.rec("benchmarks/results/quickstart_runs.json", "runs.0.seconds", "mmss") == \
      "{} min {:02d} s".format(*divmod(int(round(records.value(
          "benchmarks/results/quickstart_runs.json", "runs.0.seconds"))), 60))
  with pytest.raises(KeyError, match="no 'nope'"):
    records.rec("docs/results/quickstart/results.json", "nope")


def test_floors_table_is_the_import_contract():
  """The docs' floors table is generated from the contract in setup.cfg: every module of
  the contract appears once, on its floor, top floor first."""
  import configparser
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  layers = [l.strip() for l in cfg["importlinter:contract:floors"]["layers"].splitlines()
            if l.strip()]
  rows = [r.split("|") for r in records.floors().splitlines()[2:]]
  got = [(int(r[1]), r[2].strip().strip("`").rstrip("/")) for r in rows]
  want = [(len(layers) - 1 - i, m.strip()) for i, l in enumerate(layers) for m in l.split("|")]
  assert got == want


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
  out = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q",
                        "-b", "html", "docs", str(tmp_path / "html")], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  page = (tmp_path / "html" / "guides" / "quickstart.html").read_text(encoding="utf-8")
  assert records.rec("docs/results/quickstart/results.json", "top1_error", ".4f") in page
  assert "{{" not in page and "rec(" not in page
  assert (tmp_path / "html" / "api.html").exists()


def test_docs_pages_type_no_measured_figure_by_hand():
  """Outside code blocks, a ratio, a time, a speed or a size in a page is a ``rec``
  substitution (inserted from its record at build time), never typed."""
  measured = re.compile(r"(?<![\w.])(?:\d+(?:\.\d+)?x\b|\d+(?:\.\d+)? ?ms\b|\d+ min \d+ s"
                        r"|\d+(?:\.\d+)? ?(?:images|projections|steps)/s|\d+(?:\.\d+)? ?"
                        r"(?:GiB|MiB|GB|MB)\b)")
  found = []
  for path in sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)):
    if f"{os.sep}results{os.sep}" in path or f"{os.sep}_build{os.sep}" in path:
      continue   # generated record summaries
    with open(path, encoding="utf-8") as f:
      text = re.sub(r"\{\{.*?\}\}", "", re.sub(r"```.*?```", "", f.read(), flags=re.S),
                    flags=re.S)
    found += [f"{os.path.relpath(path, REPO)}: {m}" for m in measured.findall(text)]
  assert not found, found
