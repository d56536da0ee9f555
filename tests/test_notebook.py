"""The Colab notebook runs top to bottom (tiny settings on CPU, no downloads)."""
import json
import os
import pathlib
import re
import subprocess

import pytest

import helpers

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "zfnet_jax_colab.ipynb"


@pytest.mark.slow
def test_notebook_runs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("ZFNET_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("ZFNET_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 5                    # deconvnet grids and analysis figures inline
  assert (tmp_path / "run" / "transfer" / "probes.csv").exists()
  # The shipped model on the sample photograph (no upload outside Colab), its page written.
  assert (tmp_path / "run" / "visualize" / "china" / "index.html").exists()


def _first_cells(last: int) -> str:
  """The notebook's code cells up to cell ``last`` (index in the notebook) as one script."""
  nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
  return "\n\n".join("".join(c["source"]) for c in nb["cells"][:last + 1]
                     if c["cell_type"] == "code")


def _versions(python, env, names):
  code = ("import importlib.metadata as m\n"
          "for n in %r:\n"
          "  try: print(n, m.version(n))\n"
          "  except m.PackageNotFoundError: print(n, None)\n" % (names,))
  out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(python))   # not the checkout (its egg-info)
  return dict(line.split(" ", 1) for line in out.stdout.splitlines())


@pytest.mark.slow
def test_install_cell_keeps_the_runtimes_jax_and_tensorflow(tmp_path):
  """A Colab-like runtime: a fresh virtualenv with its own jax, jaxlib and tensorflow at other
  versions than ours (stand-in distributions: the metadata pip acts on; the code is this
  machine's), and newer ones offered to pip.  The install cell installs the package from a
  wheel (SOURCE) and leaves those three as they were; the first cells then run on the shipped
  model, name the devices and warn that they are CPUs."""
  house = tmp_path / "wheelhouse"
  house.mkdir()
  wheel = helpers.build_wheel(house)
  for name, version in (("jax", "0.10.9"), ("jaxlib", "0.10.9"), ("tensorflow", "2.99.0"),
                        ("tensorflow-cpu", "2.99.0")):
    helpers.fake_wheel(house, name, version)   # what pip could take instead
  python, env = helpers.fresh_venv(tmp_path / "venv",
                                   hide_metadata=("jax", "jaxlib", "tensorflow_cpu"))
  colab = {"jax": "0.10.1", "jaxlib": "0.10.1", "tensorflow": "2.19.0"}
  for name, version in colab.items():
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps",
                    helpers.fake_wheel(tmp_path, name, version)], env=env, check=True,
                   capture_output=True)
  names = ["jax", "jaxlib", "tensorflow", "tensorflow-cpu", "zfnet_jax"]
  assert _versions(python, env, names) == dict(colab, **{"tensorflow-cpu": "None",
                                                         "zfnet_jax": "None"})
  env.update(PIP_FIND_LINKS=str(house), ZFNET_JAX_SOURCE=wheel, ZFNET_NOTEBOOK_TINY="1",
             ZFNET_NOTEBOOK_WORKDIR=str(tmp_path / "run"), MPLBACKEND="Agg")
  script = tmp_path / "first_cells.py"
  script.write_text(_first_cells(6), encoding="utf-8")   # up to the shipped model's pictures
  empty = tmp_path / "empty"
  empty.mkdir()
  run = subprocess.run([python, str(script)], cwd=empty, env=env, capture_output=True,
                       text=True, timeout=900)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert _versions(python, env, names) == dict(colab, **{"tensorflow-cpu": "None",
                                                         "zfnet_jax": "0.2.0"})
  assert re.search(r"zfnet_jax 0\.2\.0, JAX \S+: \d+ CPU device\(s\)", run.stdout), run.stdout
  assert "warning: no GPU or TPU found" in run.stdout
  assert (tmp_path / "run" / "visualize" / "china" / "index.html").exists()
  assert (tmp_path / "run" / "visualize" / "china.zip").exists()   # offered for download


def test_install_cell_stops_with_one_line_on_a_jax_too_old(tmp_path):
  python, env = helpers.fresh_venv(tmp_path / "venv", hide_metadata=("jax",))
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps",
                  helpers.fake_wheel(tmp_path, "jax", "0.4.30")], env=env, check=True,
                 capture_output=True)
  env.update(ZFNET_JAX_SOURCE=str(tmp_path / "never_used.whl"))
  script = tmp_path / "first_cells.py"
  script.write_text(_first_cells(3), encoding="utf-8")
  run = subprocess.run([python, str(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines() == [
      "this runtime's JAX 0.4.30 is older than zfnet_jax needs (0.10 or newer): pip install -U "
      "'jax[cuda12]' (GPU) or 'jax[tpu]' (TPU), restart the runtime, then run this cell again"]
  assert _versions(python, env, ["jax", "zfnet_jax"]) == {"jax": "0.4.30", "zfnet_jax": "None"}
