"""The deconvnet explorer: its endpoint against deconv.project, bad requests, the page in a
real headless Chromium."""
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from zfnet_jax import configs, deconv
from zfnet_jax.data import preprocessing
from zfnet_jax.report import explore
from zfnet_jax.training import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url, timeout=120):
  """(status, body) of a GET."""
  try:
    with urllib.request.urlopen(url, timeout=timeout) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
  """``--mode=explore`` on the shipped weights, in a subprocess; its URL."""
  workdir = tmp_path_factory.mktemp("explore")
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "zfnet_jax.main", "--config=quickstart",
                           f"--workdir={workdir}", "--mode=explore",
                           "--config.pretrained=quickstart", f"--port={port}"],
                          cwd=workdir, env=dict(os.environ, PYTHONPATH=REPO),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 180
  while time.time() < deadline:
    if proc.poll() is not None:
      pytest.fail("the explorer exited: " + proc.stdout.read()[-3000:])
    try:
      if _get(url + "/api/projection?image=china&layer=conv1&channel=0", 10)[0] == 200:
        break
    except OSError:
      time.sleep(1)
  else:
    proc.kill()
    pytest.fail("the explorer did not answer in 180 s")
  yield url, workdir
  proc.terminate()
  proc.wait(timeout=30)


@pytest.fixture(scope="module")
def shipped():
  c = configs.default_config()
  c.pretrained = "quickstart"
  loaded = weights.load_model(c, None)
  return loaded, preprocessing.preprocessing(loaded.config, loaded.pixel_mean)


@pytest.mark.slow
@pytest.mark.parametrize("image,layer,rank,position,rule", [
    ("china", "conv1", 3, None, "deconvnet"), ("flower", "conv3", 5, "second", "guided"),
    ("china", "pool2", 0, None, "backprop"), ("flower", "conv1", 1, "second", "deconvnet"),
    ("china", "fc6", 2, None, "guided")])
def test_endpoint_returns_deconv_project_of_the_unit(app, shipped, image, layer, rank,
                                                      position, rule):
  """Units of several layers and rules (map: the rank-th strongest on the image; position:
  the strongest unit, or the second strongest given as row and col)."""
  url, _ = app
  loaded, prep = shipped
  x = prep(preprocessing.read_image(explore.sample_path(image), prep.channels))
  a = np.asarray(loaded.model.apply(loaded.variables, x[None], method="features")[layer][0])
  channel = int(np.argsort(-a.reshape(-1, a.shape[-1]).max(0))[rank])
  if position == "second":
    flat = np.argsort(-a[..., channel].ravel(), kind="stable")[1]
    position = tuple(int(v) for v in np.unravel_index(flat, a.shape[:2]))
  query = f"image={image}&layer={layer}&channel={channel}&rule={rule}"
  if position:
    query += f"&row={position[0]}&col={position[1]}"
  status, body = _get(f"{url}/api/projection?{query}")
  assert status == 200, body[:300]
  got = np.load(io.BytesIO(body))
  want = np.asarray(deconv.project(loaded.model, loaded.variables, x[None], layer=layer,
                                   channel=channel, position=position, rule=rule))[0]
  assert got.dtype == np.float32 and got.shape == x.shape == (32, 32, 1)
  assert np.abs(want).max() > 0
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * max(1.0, np.abs(want).max()))


@pytest.mark.slow
@pytest.mark.parametrize("query,message", [
    ("image=nope&layer=conv1&channel=0", "image='nope': allowed china, flower"),
    ("image=china&layer=conv9&channel=0", "layer='conv9': allowed conv1, pool1"),
    ("image=china&layer=conv2&channel=64", "channel=64: allowed 0..63 (conv2 has 64 maps)"),
    ("image=china&layer=conv2&channel=x", "channel='x': an integer 0..63"),
    ("image=china&layer=conv2&channel=1&rule=zeiler",
     "rule='zeiler': allowed deconvnet, guided, backprop"),
    ("image=china&layer=conv3&channel=1&row=5&col=0", "row=5: allowed 0..2 (conv3 is 3x3)"),
    ("image=china&layer=conv3&channel=1&row=1", "row and col: give both, or neither"),
    ("layer=conv3&channel=1", "image: missing"),
])
def test_bad_parameters_get_400_and_one_line(app, query, message):
  url, _ = app
  status, body = _get(f"{url}/api/projection?{query}")
  assert status == 400
  text = body.decode()
  assert text.count("\n") == 1 and message in text, text


@pytest.mark.slow
def test_page_in_chromium_click_a_map_and_upload_a_non_image(app, tmp_path):
  """A real headless Chromium: the page loads the sample, a click on the first map shows
  its projection (screenshot in tmp_path), a text file as upload gets a message."""
  if not os.path.exists(CHROMIUM):
    pytest.fail("needs /usr/bin/chromium (launch/install.sh --test installs it)")
  from playwright.sync_api import sync_playwright
  url, workdir = app
  not_an_image = tmp_path / "notes.txt"
  not_an_image.write_text("not a picture")
  with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(url + "/", timeout=120_000)
    page.wait_for_selector("#maps img", timeout=120_000)
    page.locator("#maps img").first.click()
    page.wait_for_selector("#projection img", timeout=120_000)
    page.wait_for_function("document.querySelector('#message').innerText.includes('map')",
                           timeout=120_000)
    page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
    if os.environ.get("ZFNET_KEEP_SCREENSHOT"):
      page.screenshot(path=os.environ["ZFNET_KEEP_SCREENSHOT"], full_page=True)
    assert page.locator("#projection img").count() == 3
    assert page.locator("#walkthrough img").count() == 3   # conv1: unit, rectify, filter
    other = browser.new_context().new_page()   # a second tab: its own state
    other.goto(url + "/", timeout=120_000)
    other.wait_for_selector("#maps img", timeout=120_000)
    other.locator("#maps img").nth(1).click()
    other.wait_for_function("document.querySelector('#message').innerText.includes('unit')",
                            timeout=120_000)
    mine, theirs = (p_.locator("#message").inner_text() for p_ in (page, other))
    assert mine.split(",")[1] != theirs.split(",")[1], (mine, theirs)   # map 5 vs map 23
    assert page.locator("#message").inner_text() == mine
    page.set_input_files("#upload input[type=file]", str(not_an_image))
    page.wait_for_function(
        "document.querySelector('#message').innerText.includes('Could not read the image')",
        timeout=120_000)
    browser.close()
  assert (tmp_path / "explore.png").stat().st_size > 10_000
  uploads = os.path.join(workdir, "explore")
  assert any("notes" in f for _, _, files in os.walk(uploads) for f in files)


def test_without_gradio_the_command_line_says_what_to_install(tmp_path):
  code = ("import runpy, sys\n"
          "sys.modules['gradio'] = None\n"
          "sys.argv = ['main', '--config=quickstart', '--workdir=w', '--mode=explore',\n"
          "            '--config.pretrained=quickstart']\n"
          "runpy.run_module('zfnet_jax.main', run_name='__main__')\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 2
  assert [l for l in out.stderr.splitlines() if l.startswith("error:")] == [
      "error: the explorer needs Gradio: pip install 'zfnet_jax[explore]'"]


def test_atlas_top_nine_shows_the_atlas_images_at_their_units(shipped, tmp_path):
  """The map's row of atlas_<layer>.npz: its images (by id, from the evaluation split) cropped
  at its units, in rank order; empty slots left out; a map the atlas does not show, or no
  atlas, is one line."""
  loaded, prep = shipped
  values = {5: 40, 2: 200, 9: 120}   # each evaluation image one grey level
  eval_images = lambda i: (np.full((32, 32, 1), values[i], np.float32) - prep.mean)
  np.savez(tmp_path / "atlas_conv2.npz", layer="conv2", channels=np.array([3, 7]),
           values=np.array([[9.0, 8.0, 0.0], [7.0, 6.0, 5.0]], np.float32),
           ids=np.array([[5, 2, -1], [9, 5, 2]]), positions=np.zeros((2, 3, 2), np.int32) + 2,
           labels=np.zeros((2, 3), np.int64), distinct_images=True, num_examples=10)
  ex = explore.Explorer(deconv.as_network(loaded.model), loaded.variables, prep,
                        loaded.class_names, eval_images, 10, str(tmp_path))
  top = ex.atlas_top("conv2", 3)
  assert [caption.split(",")[0] for _, caption in top] == ["1: image 5", "2: image 2"]
  for (picture, _), ident in zip(top, (5, 2)):
    grey = picture[..., 0].astype(int)
    inside = grey[grey != 128]   # the part of the field outside the image is mid-grey
    assert inside.size and np.all(np.abs(inside - values[ident]) <= 1), (ident, set(inside))
  assert "does not show map 4" in ex.atlas_top("conv2", 4)
  assert "No atlas of conv3" in ex.atlas_top("conv3", 0)
