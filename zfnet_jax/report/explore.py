"""Point at any unit and see what it sees: the deconvnet explorer, a local web app.

  python -m zfnet_jax.main --config=quickstart --workdir=w --mode=explore \
      --config.pretrained=quickstart [--port=7860]
  explore.launch(model_or_network, variables, preprocessing=prep, class_names=names)

The page (Gradio; inline in Colab and Jupyter): an input image, its top-5 prediction and a
layer's maps, strongest first; a click on a map, or on a place in the enlarged map,
projects that unit (deconvnet, guided backprop or gradient), with its receptive field, its
Fig. 1 walk-through and, where the report wrote ``atlas_<layer>.npz``, the map's top 9.
``GET /api/projection?image=<china|flower|eval:N>&layer=L&channel=C[&row=R&col=K]
[&rule=...]`` returns one projection as a ``.npy`` body (float32 (S, S, C); no row/col: the
map's strongest unit), or HTTP 400 with one line naming the bad parameter.  It listens on
127.0.0.1 unless told otherwise and keeps uploads under ``<workdir>/explore/``.
"""
import dataclasses
import functools
import io
import os
import threading
import time
from typing import Callable, Sequence

import numpy as np

from zfnet_jax import deconv
from zfnet_jax.analyses import atlas
from zfnet_jax.data import iterators, sources
from zfnet_jax.data import preprocessing as preprocessing_lib
from zfnet_jax.nn import models, rules, torchvision
from zfnet_jax.render import figures
from zfnet_jax.training import weights

SAMPLES = ("china", "flower")   # scikit-learn's sample photographs
RULES = tuple(sorted(rules.RULES, key=lambda r: {"deconvnet": 0, "guided": 1}.get(r, 2)))
MAX_UPLOAD = "10mb"


def require_gradio() -> None:
  """ImportError saying in one line what to install when Gradio is missing."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("gradio") is None:
    raise ImportError("the explorer needs Gradio: pip install 'zfnet_jax[explore]'")


def _gradio(workdir: str):
  """gradio, imported with its files under ``<workdir>/explore/`` (set before the import:
  Gradio reads the setting once)."""
  require_gradio()
  uploads = os.path.abspath(os.path.join(workdir, "explore"))
  os.makedirs(uploads, exist_ok=True)
  os.environ["GRADIO_TEMP_DIR"] = uploads
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  import gradio  # pylint: disable=import-outside-toplevel
  return gradio


@functools.lru_cache(maxsize=None)
def sample_path(name: str) -> str:
  """The file of scikit-learn's sample photograph ``name`` (china, flower)."""
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  if name not in SAMPLES:
    raise ValueError(f"unknown sample {name!r}; allowed: {', '.join(SAMPLES)}")
  return next(f for f in load_sample_images().filenames if os.path.basename(f) == f"{name}.jpg")


class BadRequest(ValueError):
  """A request parameter that is not allowed (the endpoint answers HTTP 400)."""


@dataclasses.dataclass(eq=False)
class Explorer:
  """What the page and the endpoint compute, for one network.

  eval_images: index -> float32 (S, S, C) model input of that evaluation image, or None.
  eval_size: how many evaluation images there are (0: none).
  atlas_dir: a report folder holding ``atlas_<layer>.npz``, or None.
  """
  net: deconv.Network
  variables: dict
  preprocessing: preprocessing_lib.Preprocessing
  class_names: Sequence[str] | None = None
  eval_images: Callable[[int], np.ndarray] | None = None
  eval_size: int = 0
  atlas_dir: str | None = None

  def __post_init__(self):
    size = self.preprocessing.crop_size
    self.table = {s.name: s for s in self.net.layer_table(size)}
    self.layers = [n for n, s in self.table.items() if s.kind != "fc"] + \
        [n for n, s in self.table.items() if s.kind == "fc"]
    self.fields = self.net.receptive_fields(size) or {}
    self._lock = threading.Lock()   # one computation at a time on the device

  # -- inputs ------------------------------------------------------------------

  @functools.lru_cache(maxsize=16)
  def named_input(self, image: str) -> np.ndarray:
    """float32 (S, S, C) model input of a sample name or ``eval:N`` (cached); BadRequest
    naming what is allowed."""
    if image in SAMPLES:
      return self.preprocessing(preprocessing_lib.read_image(sample_path(image),
                                                          self.preprocessing.channels))
    if image.startswith("eval:") and self.eval_images is not None:
      try:
        index = int(image[5:])
      except ValueError:
        index = -1
      if not 0 <= index < self.eval_size:
        raise BadRequest(f"image={image!r}: an evaluation index 0..{self.eval_size - 1}")
      return np.asarray(self.eval_images(index), np.float32)
    allowed = ", ".join(SAMPLES) + (f", eval:0..eval:{self.eval_size - 1}"
                                    if self.eval_images is not None else "")
    raise BadRequest(f"image={image!r}: allowed {allowed}")

  # -- what the page shows -------------------------------------------------------

  def features(self, x: np.ndarray) -> dict[str, np.ndarray]:
    with self._lock:
      return {k: np.asarray(v[0]) for k, v in self.net.features(self.variables, x[None]).items()}

  def top(self, feats, k: int = 5) -> dict[str, float]:
    """{class name: probability} of the ``k`` most probable classes."""
    logits = np.asarray(feats["logits"], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    names = self.class_names or [str(i) for i in range(len(p))]
    return {names[i]: float(p[i]) for i in np.argsort(-p)[:k]}

  def check(self, layer: str, channel, row=None, col=None, rule: str = "deconvnet"):
    """(layer, channel, position or None, rule) checked; BadRequest naming the parameter."""
    if layer not in self.table:
      raise BadRequest(f"layer={layer!r}: allowed {', '.join(self.layers)}")
    maps = self.table[layer].features
    try:
      channel = int(channel)
    except (TypeError, ValueError):
      raise BadRequest(f"channel={channel!r}: an integer 0..{maps - 1}") from None
    if not 0 <= channel < maps:
      raise BadRequest(f"channel={channel}: allowed 0..{maps - 1} ({layer} has {maps} maps)")
    if rule not in RULES:
      raise BadRequest(f"rule={rule!r}: allowed {', '.join(RULES)}")
    if (row is None) != (col is None):
      raise BadRequest("row and col: give both, or neither (the strongest unit)")
    if row is None:
      return layer, channel, None, rule
    side = self.table[layer].out if self.table[layer].kind != "fc" else 1
    try:
      position = (int(row), int(col))
    except (TypeError, ValueError):
      raise BadRequest(f"row={row!r}, col={col!r}: integers 0..{side - 1}") from None
    for name, v in zip(("row", "col"), position):
      if not 0 <= v < side:
        raise BadRequest(f"{name}={v}: allowed 0..{side - 1} ({layer} is {side}x{side})")
    return layer, channel, position, rule

  def project(self, x: np.ndarray, layer: str, channel: int, position=None,
              rule: str = "deconvnet") -> np.ndarray:
    """float32 (S, S, C): the unit's projection (the map's strongest unit when no position)."""
    module = self.net.module
    with self._lock:
      if isinstance(module, (models.PaperNet, torchvision.TorchvisionNet)):
        p = deconv.project(module, self.variables, x[None], layer=layer, channel=channel,
                           position=position, rule=rule)
      else:
        p = self.net.project(self.variables, x[None], layer=layer,
                             channels=np.array([channel]),
                             positions=None if position is None else np.array([position]),
                             rule=rule)
    return np.asarray(p[0], np.float32)

  def unit(self, feats, layer: str, channel: int, position=None) -> tuple[int, int]:
    """The unit's (row, col): ``position``, or the first maximum of the map."""
    if position is not None:
      return tuple(position)
    a = feats[layer]
    a = a.reshape(1, 1, -1) if a.ndim == 1 else a
    return tuple(int(v) for v in np.unravel_index(np.argmax(a[..., channel]), a.shape[:2]))

  def walkthrough(self, x, layer, channel, position, rule) -> list[deconv.Stage] | str:
    """The unit's stages, or one line saying why there are none."""
    try:
      with self._lock:
        return deconv.walkthrough(self.net.module or self.net, self.variables, x, layer=layer,
                                  channel=channel, position=position, rule=rule)
    except ValueError as e:
      return str(e)

  def atlas_top(self, layer: str, channel: int) -> list[tuple[np.ndarray, str]] | str:
    """The map's top 9 from the report's atlas (eval image patches), or why there are none."""
    path = os.path.join(self.atlas_dir or "", f"atlas_{layer}.npz")
    if not self.atlas_dir or not os.path.exists(path):
      return f"No atlas of {layer} for this model (the report writes atlas_{layer}.npz)."
    a = atlas.load(path)
    rows = np.flatnonzero(a["channels"] == channel)
    if not len(rows):
      return f"The report's atlas of {layer} does not show map {channel}."
    if self.eval_images is None:
      return "The atlas names evaluation images, but no dataset is configured."
    out = []
    for i, (ident, pos, value) in enumerate(zip(a["ids"][rows[0]], a["positions"][rows[0]],
                                                a["values"][rows[0]])):
      if ident >= 0:
        x = self.named_input(f"eval:{int(ident)}")
        out.append((self.patch(self.show_input(x), layer, tuple(pos)),
                    f"{i + 1}: image {ident}, {value:.3g}"))
    return out

  # -- pictures ------------------------------------------------------------------

  def show_input(self, x: np.ndarray) -> np.ndarray:
    """uint8 (S, S, 3) picture of a model input (its mean and scale added back)."""
    p = self.preprocessing
    pixels = x * np.asarray(p.std, np.float32) + np.asarray(p.mean, np.float32)
    return figures.to_uint8_rgb(np.clip(np.round(pixels), 0, 255).astype(np.uint8))

  def patch(self, picture: np.ndarray, layer: str, position) -> np.ndarray:
    """uint8 ``picture`` (S, S, 3) cropped to the receptive field of ``layer``'s unit
    (grey where the field lies outside the image); fc units see the whole picture."""
    if layer not in self.fields:
      return picture
    crop = deconv.crop_receptive_field(picture[None].astype(np.float32) / 255,
                                       self.fields[layer], np.asarray([position]), fill=0.5)
    return figures.to_uint8_rgb(crop[0])

  def map_pictures(self, feats, layer: str, num: int = 32):
    """[(uint8 map picture, caption)] of the layer's maps, strongest first, and their channels."""
    a = feats[layer]
    a = a.reshape(1, 1, -1) if a.ndim == 1 else a
    peak = a.reshape(-1, a.shape[-1]).max(0)
    order = np.argsort(-peak, kind="stable")[:num]
    top = max(float(peak.max()), 1e-12)
    pics = [(figures.to_uint8_rgb(_enlarge(np.clip(a[..., c] / top, 0, 1))), f"map {c}: max {peak[c]:.3g}")
            for c in order]
    return pics, [int(c) for c in order]


def _enlarge(a: np.ndarray, side: int = 96) -> np.ndarray:
  """Nearest-neighbour enlargement of an (h, w) map to about ``side`` pixels."""
  f = max(1, side // max(a.shape))
  return np.kron(a, np.ones((f, f)))


def _api(explorer: Explorer):
  """The FastAPI app of the endpoint (the page is mounted on it at /)."""
  import fastapi  # pylint: disable=import-outside-toplevel
  app = fastapi.FastAPI(title="zfnet_jax explorer")

  @app.get("/api/projection")
  def projection(image: str = "", layer: str = "", channel: str = "", row: str | None = None,
                 col: str | None = None, rule: str = "deconvnet"):
    try:
      if not image:
        raise BadRequest("image: missing; a sample name (china, flower) or eval:N")
      if not layer or channel == "":
        raise BadRequest("layer and channel: both required")
      layer, ch, position, rule = explorer.check(layer, channel, row, col, rule)
      x = explorer.named_input(image)
    except BadRequest as e:
      return fastapi.responses.PlainTextResponse(str(e) + "\n", status_code=400)
    body = io.BytesIO()
    np.save(body, explorer.project(x, layer, ch, position, rule))
    return fastapi.Response(body.getvalue(), media_type="application/octet-stream")
  return app


def _load(explorer, sample, eval_index, upload, webcam, source):
  """The page's chosen input -> (state, picture, prediction, message)."""
  try:
    pixels = None
    if source == "upload":
      if upload is None:
        raise ValueError("choose a file to upload")
      pixels = preprocessing_lib.read_image(upload, explorer.preprocessing.channels)
    elif source == "webcam":
      if webcam is None:
        raise ValueError("take a picture with the webcam first")
      pixels = webcam_pixels(webcam, explorer.preprocessing.channels)
    if source == "evaluation image":
      x = explorer.named_input(f"eval:{int(eval_index or 0)}")
    elif source == "sample":
      x = explorer.named_input(sample)
    else:
      x = explorer.preprocessing(pixels)
  except (ValueError, OSError) as e:
    return None, None, None, f"**Could not read the image:** {e}"
  feats = explorer.features(x)
  return ({"x": x, "feats": feats}, explorer.show_input(x), explorer.top(feats),
          f"Input {explorer.preprocessing.crop_size} px. Pick a layer, then click a map.")

def _maps(explorer, state, layer):
  """A layer's maps, strongest first -> (gallery, state, message)."""
  if state is None:
    return [], None, "Load an image first."
  pics, channels = explorer.map_pictures(state["feats"], layer)
  state["channels"], state["layer"] = channels, layer
  return pics, state, (f"{layer}: {len(channels)} strongest maps. The first click on a layer "
                       "compiles its projection (seconds); after that it answers at once.")

def _unit(explorer, state, rule, position=None):
  """The selected unit -> (projection views, enlarged map, walk-through, atlas, message)."""
  x, feats, layer, channel = state["x"], state["feats"], state["layer"], state["channel"]
  proj = explorer.project(x, layer, channel, position, rule)
  pos = explorer.unit(feats, layer, channel, position)
  picture = explorer.show_input(x)
  shown = figures.to_uint8_rgb(deconv.to_image(proj))
  views = [(shown, "projection"), (explorer.patch(shown, layer, pos), "its receptive field"),
           (explorer.patch(picture, layer, pos), "the image patch")]
  a = feats[layer]
  big = (figures.to_uint8_rgb(_enlarge(np.clip(a[..., channel] / max(float(a.max()), 1e-12), 0, 1), 256))
         if a.ndim == 3 else None)
  stages = explorer.walkthrough(x, layer, channel, position, rule)
  walk = ([(figures.to_uint8_rgb(deconv.to_image(s.signal if i == len(stages) - 1 else
                                 s.signal.sum(-1, keepdims=True))), s.name)
           for i, s in enumerate(stages)] if isinstance(stages, list) else [])
  top = explorer.atlas_top(layer, channel)
  text = (f"**{layer}, map {channel}, unit ({pos[0]}, {pos[1]})**, rule {rule}."
          + ("" if isinstance(stages, list) else f" Walk-through: {stages}")
          + ("" if isinstance(top, list) else f" {top}"))
  return views, big, walk, (top if isinstance(top, list) else []), text


def page(explorer: Explorer, workdir: str = "explore_workdir"):
  """The Gradio Blocks of the explorer (per-tab state in ``gr.State``)."""
  gr = _gradio(workdir)
  load, maps = functools.partial(_load, explorer), functools.partial(_maps, explorer)
  unit = functools.partial(_unit, explorer)
  first_layer = next((n for n in explorer.layers if n.startswith("conv")), explorer.layers[0])

  def pick_map(state, rule, evt: gr.SelectData):
    if state is None or "channels" not in state:
      return [], None, [], [], "Load an image and pick a layer first."
    state["channel"], state["position"] = state["channels"][evt.index], None
    return unit(state, rule)

  def pick_place(state, rule, evt: gr.SelectData):
    if state is None or "channel" not in state or state["feats"][state["layer"]].ndim != 3:
      return [], None, [], [], "Click a map first."
    side = state["feats"][state["layer"]].shape[0]
    f = max(1, 256 // side)
    col, row = (min(int(v) // f, side - 1) for v in evt.index)
    state["position"] = (row, col)
    return unit(state, rule, (row, col))

  theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])   # no web fonts
  with gr.Blocks(title="zfnet_jax explorer", theme=theme) as demo:
    state = gr.State(None)
    gr.Markdown("## What does this unit see? The deconvnet explorer")
    with gr.Row():
      with gr.Column():
        kinds = ["sample", "upload", "webcam"] + \
            (["evaluation image"] if explorer.eval_images is not None else [])
        source = gr.Radio(kinds, value="sample", label="input")
        sample = gr.Dropdown(list(SAMPLES), value=SAMPLES[0], label="sample photograph")
        eval_index = gr.Number(0, precision=0, label="evaluation image index",
                               visible=explorer.eval_images is not None)
        upload = gr.File(label="upload an image", type="filepath", elem_id="upload")
        webcam = gr.Image(sources=["webcam"], type="numpy", label="webcam")
        go = gr.Button("Load", elem_id="load")
      shown = gr.Image(label="model input", interactive=False, elem_id="input", height=240)
      label = gr.Label(num_top_classes=5, label="top-5")
    message = gr.Markdown(elem_id="message")
    with gr.Row():
      layer = gr.Dropdown(explorer.layers, value=first_layer, label="layer", elem_id="layer")
      rule = gr.Radio(list(RULES), value="deconvnet", label="rule", elem_id="rule")
    grid = gr.Gallery(label="activation maps, strongest first (click one)", columns=8,
                      height="auto", allow_preview=False, elem_id="maps")
    with gr.Row():
      views = gr.Gallery(label="the unit's projection", columns=3, height="auto",
                         allow_preview=False, elem_id="projection")
      big = gr.Image(label="the map: click a place for that unit", interactive=False,
                     elem_id="map")
    walk = gr.Gallery(label="the way down (Fig. 1)", columns=10, height="auto",
                      allow_preview=False, elem_id="walkthrough")
    top9 = gr.Gallery(label="this map's top 9 in the dataset (Fig. 2)", columns=9,
                      height="auto", allow_preview=False, elem_id="atlas")
    unit_out = [views, big, walk, top9, message]
    go.click(load, [sample, eval_index, upload, webcam, source],
             [state, shown, label, message]).then(maps, [state, layer], [grid, state, message])
    upload.upload(lambda: "upload", None, source).then(
        load, [sample, eval_index, upload, webcam, source], [state, shown, label, message]
    ).then(maps, [state, layer], [grid, state, message])
    layer.change(maps, [state, layer], [grid, state, message])
    grid.select(pick_map, [state, rule], unit_out)
    rule.change(lambda st, r: unit(st, r, st.get("position")) if st and "channel" in st
                else ([], None, [], [], "Click a map first."), [state, rule], unit_out)
    big.select(pick_place, [state, rule], unit_out)
    demo.load(load, [sample, eval_index, upload, webcam, source],
              [state, shown, label, message]).then(maps, [state, layer], [grid, state, message])
  return demo


def webcam_pixels(pixels: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (H, W, channels) of a webcam frame (RGB or RGBA)."""
  a = np.asarray(pixels)[..., :3].astype(np.float64)
  if channels == 1:
    return np.round(a @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
  return a.astype(np.uint8)


@dataclasses.dataclass
class Server:
  """A running explorer: ``url``; ``close()`` stops it."""
  url: str
  server: object
  thread: threading.Thread

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=10)


def launch(model, variables, *, preprocessing: preprocessing_lib.Preprocessing,
           class_names: Sequence[str] | None = None, workdir: str = "explore_workdir",
           eval_images: Callable[[int], np.ndarray] | None = None, eval_size: int = 0,
           atlas_dir: str | None = None, host: str = "127.0.0.1", port: int = 7860,
           block: bool = True, inline: bool | None = None) -> Server:
  """Serve the explorer of ``model`` (one of our models, torchvision's AlexNet/VGG16 from
  ``convert``, or a ``deconv.Network``) at http://host:port/ (port 0: a free one).

  Uploads go to ``<workdir>/explore/``; nothing else is written.  block: serve until
  stopped (the command line); else return the running ``Server`` (a notebook).  inline:
  show the page in the notebook (default: when running in Colab or Jupyter).
  """
  gr = _gradio(workdir)
  import uvicorn  # pylint: disable=import-outside-toplevel
  explorer = Explorer(deconv.as_network(model), variables, preprocessing, class_names,
                      eval_images, eval_size, atlas_dir)
  app = gr.mount_gradio_app(_api(explorer), page(explorer, workdir), path="/",
                            max_file_size=MAX_UPLOAD,
                            allowed_paths=[os.environ["GRADIO_TEMP_DIR"]])
  if port == 0:   # any free port
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as s:
      s.bind((host, 0))
      port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
  url = f"http://{host}:{port}/"
  if block:
    print(f"explore: {url} (Ctrl-C stops it)", flush=True)
    server.run()
    return Server(url, server, threading.current_thread())
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:   # serving before this returns
    if not thread.is_alive():
      raise OSError(f"the explorer could not listen on {host}:{port} (in use?)")
    time.sleep(0.05)
  running = Server(url, server, thread)
  if inline is None:
    inline = _in_notebook()
  if inline:
    _show_inline(port)
  return running


def _in_notebook() -> bool:
  try:
    from IPython import get_ipython  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return get_ipython() is not None and "IPKernelApp" in getattr(get_ipython(), "config", {})


def _show_inline(port: int) -> None:
  try:
    from google.colab import output  # pylint: disable=import-outside-toplevel
    output.serve_kernel_port_as_iframe(port, height=900)
  except ImportError:
    from IPython.display import IFrame, display  # pylint: disable=import-outside-toplevel
    display(IFrame(f"http://127.0.0.1:{port}/", width="100%", height=900))


def run(config, workdir: str, *, host: str = "127.0.0.1", port: int = 7860) -> None:
  """``--mode=explore``: the model of ``workdir`` (or ``config.pretrained``), the
  evaluation split of its dataset where its files are here, the report's atlas where
  ``<workdir>/report`` has one; serves until stopped."""
  require_gradio()
  loaded = weights.load_model(config, workdir)
  prep = preprocessing_lib.preprocessing(loaded.config, loaded.pixel_mean)
  eval_images, eval_size = None, 0
  if not weights.is_imported(config):
    # The run's own pixel mean: the shipped folder's, or the workdir's.
    run_dir = weights.shipped_dir(config.pretrained) if config.get("pretrained") else workdir
    try:
      eval_size = sources.dataset_info(loaded.config).num_eval
    except (ValueError, OSError):
      eval_size = 0   # the dataset is not here: samples, uploads and the webcam only
    if eval_size:
      @functools.lru_cache(maxsize=64)
      def eval_images(i):
        return iterators.load_examples(loaded.config, run_dir, ids=[i])[0][0]
  report = os.path.join(workdir, "report")
  launch(loaded.model, loaded.variables, preprocessing=prep, class_names=loaded.class_names,
         workdir=workdir, eval_images=eval_images, eval_size=eval_size,
         atlas_dir=report if os.path.isdir(report) else None, host=host, port=port)
