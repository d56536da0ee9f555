"""The Colab notebook runs top to bottom (tiny settings on CPU, no downloads)."""
import pathlib

import pytest

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
