"""The house: modules import only downwards, nothing hides a circle, importing has no effects."""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "zfnet_jax")


def _modules():
  for folder, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith(".py"):
        yield os.path.join(folder, f)


def test_floors_contract_holds():
  """import-linter's layers contract in setup.cfg (the README's floors), counting imports
  inside functions too."""
  out = subprocess.run([sys.executable, "-c",
                        "import sys; from importlinter.cli import lint_imports; "
                        "sys.exit(lint_imports(config_filename='setup.cfg', no_cache=True, "
                        "no_logo=True))"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
  assert " kept, 0 broken" in out.stdout


def test_no_function_local_imports_of_our_modules():
  """Only main.py may import a zfnet_jax module inside a function (to configure XLA first)."""
  found = []
  for path in _modules():
    if os.path.basename(path) == "main.py":
      continue
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          names = ([inner.module or ""] if isinstance(inner, ast.ImportFrom)
                   else [a.name for a in inner.names] if isinstance(inner, ast.Import) else [])
          if any(n == "zfnet_jax" or n.startswith("zfnet_jax.") for n in names):
            found.append(f"{os.path.relpath(path, REPO)}:{inner.lineno}")
  assert not found, found


def test_a_circle_is_caught(tmp_path):
  """The contract can fail: a copy of the package where nn.layers imports the report is broken."""
  import shutil
  copy = tmp_path / "repo"
  shutil.copytree(PACKAGE, copy / "zfnet_jax")
  shutil.copy(os.path.join(REPO, "setup.cfg"), copy / "setup.cfg")
  with open(copy / "zfnet_jax" / "nn" / "layers.py", "a", encoding="utf-8") as f:
    f.write("\nfrom zfnet_jax.report import report  # noqa\n")
  out = subprocess.run([sys.executable, "-c",
                        "import sys; sys.path.insert(0, '.'); "
                        "from importlinter.cli import lint_imports; "
                        "sys.exit(lint_imports(config_filename='setup.cfg', no_cache=True, "
                        "no_logo=True))"],
                       cwd=copy, capture_output=True, text=True, timeout=300, check=False,
                       env=dict(os.environ, PYTHONPATH=str(copy)))
  assert out.returncode != 0
  assert "zfnet_jax.nn.layers -> zfnet_jax.report.report" in out.stdout


@pytest.mark.parametrize("module", ["zfnet_jax", "zfnet_jax.report.report", "zfnet_jax.training.loop"])
def test_importing_sets_nothing_in_jax(module):
  code = (f"import os, sys; before = os.environ.get('XLA_FLAGS'); import {module}; "
          "assert os.environ.get('XLA_FLAGS') == before, os.environ.get('XLA_FLAGS')")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120,
                 capture_output=True)


def test_rooms_are_small():
  """No module of the package over 500 lines, no function over 80 (the config builders
  aside: a config is one long list of settings), main.py at most 80 lines."""
  long_modules, long_functions = [], []
  for path in _modules():
    rel = os.path.relpath(path, REPO)
    text = open(path, encoding="utf-8").read()
    if len(text.splitlines()) > 500:
      long_modules.append((rel, len(text.splitlines())))
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        builder = node.name in ("default_config", "get_config", "get_sweep")
        if n > 80 and not builder:
          long_functions.append((rel, node.name, n))
  assert not long_modules and not long_functions, (long_modules, long_functions)
  assert len(open(os.path.join(PACKAGE, "main.py"), encoding="utf-8").read().splitlines()) <= 80
