"""The files of a run directory (a "workdir"), and atomic writes.

A training run writes, in its workdir:

  config.json        the config it ran with (``CONFIG``)
  dataset_info.json  classes, channels, input size, split sizes (``DATASET_INFO``)
  evolution.json     steps per epoch, steps, [epoch, step] of the Fig. 4 checkpoints
  pixel_mean.npy     float32 (R, R, C) training mean after resize (``MEAN``)
  metrics.jsonl      one JSON row per log/eval: step, epoch, split, metrics
  results.json       final evaluation, with the package versions it ran with
  checkpoints/       Orbax checkpoints (``zfnet_jax.checkpoints``)
  report/            the HTML report (``zfnet_jax.report.report``)
  training.lock      held (``flock``) by the training process, with its pid and host (``LOCK``)

Every file is written to a temporary name (``<name>.tmp<pid>``) and renamed, so
a reader (or a killed writer) never leaves half a file; what a killed writer
leaves behind is removed by ``clean_leftovers``.  Nothing here imports JAX.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

CONFIG = "config.json"
TIMINGS = "timings.json"
DATASET_INFO = "dataset_info.json"
EVOLUTION = "evolution.json"
MEAN = "pixel_mean.npy"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
REPORT = "report"
LOCK = "training.lock"
REPORT_TMP = ".report-tmp-"   # + "<pid>@<host>-<random>": a report being written

# The packages whose versions a results file records (``versions``).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow",
            "tensorflow-cpu", "tensorflow-datasets", "ml-collections", "scikit-learn")


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def write_text(file: str, text: str) -> None:
  """Write via a temporary file and a rename: a reader never sees half a file."""
  tmp = f"{file}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, file)


def replace_dir(tmp: str, final: str) -> None:
  """Replace the folder ``final`` by ``tmp`` (a sibling); the old one is removed only
  once the new one is in place."""
  old = None
  if os.path.exists(final):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}-old-{os.getpid()}@"
                                  f"{socket.gethostname()}-", dir=os.path.dirname(final))
    os.rename(final, os.path.join(old, os.path.basename(final)))
  os.chmod(tmp, 0o755)
  os.rename(tmp, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def write_json(file: str, obj: Any) -> None:
  write_text(file, json.dumps(obj, indent=2))


def read_json(file: str, what: str = "run directory") -> Any:
  """A JSON file; FileNotFoundError naming it (and what it belongs to) if missing."""
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} not found: {os.path.dirname(file)!r} is not a {what}")
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def versions() -> dict[str, str]:
  """{package: version} of Python and ``PACKAGES`` (missing ones left out)."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def machine() -> dict[str, object]:
  """{cpu, cores, platform}: the machine a figure was measured on (cpu from /proc/cpuinfo)."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def read_metrics(file: str) -> tuple[list[dict], int]:
  """metrics.jsonl -> (records, number of unreadable lines skipped)."""
  if not os.path.exists(file):
    return [], 0
  records, bad = [], 0
  with open(file, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if isinstance(row, dict):
        records.append(row)
      else:
        bad += 1
  return records, bad


def append_metrics(file: str, row: dict) -> None:
  with open(file, "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")


def drop_metrics(file: str, drop: Callable[[dict], bool]) -> None:
  """Forget the rows for which ``drop(row)`` is true (and lines cut short by a kill)."""
  if not os.path.exists(file):
    return
  with open(file, encoding="utf-8") as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if not drop(json.loads(line)):
        keep.append(line)
    except (ValueError, KeyError, TypeError):   # a line cut short by a kill
      pass
  if len(keep) != len(lines):
    write_text(file, "".join(keep))


def drop_metrics_after(file: str, step: int) -> None:
  """Forget rows past ``step`` (logged after the checkpoint a resumed run starts from)."""
  drop_metrics(file, lambda row: row["step"] > step)


def evolution_checkpoints(workdir: str) -> list[tuple[float, int]]:
  """[(epoch, step)] of the feature-evolution checkpoints that exist, in order."""
  kept = read_json(path(workdir, EVOLUTION), "training workdir")["checkpoints"]
  ckpt = path(workdir, CHECKPOINTS)
  have = {int(d) for d in os.listdir(ckpt) if d.isdigit()} if os.path.isdir(ckpt) else set()
  return [(float(e), int(s)) for e, s in kept if int(s) in have]


# ----------------------------------------------------------------------------
# The workdir lock, leftovers, a full disk.
# ----------------------------------------------------------------------------

class WorkdirInUse(OSError):
  """Another training process holds the workdir's lock."""


class DiskFull(OSError):
  """No space left on the device while writing the run's files (one-line message)."""


def _alive(pid: int) -> bool:
  """Whether process ``pid`` exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # it exists, owned by someone else
    return True
  return True


def _holder(fd: int) -> dict:
  """The lock file's record ({} when empty or unreadable)."""
  try:
    data = os.pread(fd, 4096, 0).decode("utf-8")
    return json.loads(data) if data.strip() else {}
  except (OSError, ValueError):
    return {}


def _describe(h: dict) -> str:
  return (f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, "
          f"started {h.get('since', '?')}")


_HELD: dict[str, list] = {}   # lock file -> [fd, depth]: re-entrant within a process


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Hold ``<workdir>/training.lock`` (an exclusive ``flock``, released by the kernel
  when the holder dies) with this process's pid, host and start time in it.

  WorkdirInUse naming the workdir and the holder (pid, host) when another
  process holds it.  A record left by a holder that ended without releasing
  (killed) is taken over with a notice.  Re-entrant within one process.  On a
  file system without ``flock`` the record alone decides: a live pid on this
  host, or any pid on another host, holds it (delete the file if that process
  has ended).
  """
  file = os.path.realpath(path(workdir, LOCK))
  if file in _HELD:
    _HELD[file][1] += 1
    try:
      yield
    finally:
      _HELD[file][1] -= 1
    return
  host = socket.gethostname()
  fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      for _ in range(20):          # the holder may be writing its record just now
        held = _holder(fd)
        if held:
          break
        time.sleep(0.05)
      raise WorkdirInUse(f"workdir {os.path.dirname(file)} is in use by another training "
                         f"process ({_describe(held)}; lock {file}); wait for it to end or "
                         "use another --workdir") from None
    except OSError as e:          # no flock here (some network file systems)
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
      locked = False
    old = _holder(fd)
    if old and old.get("pid") != os.getpid():
      same_host = old.get("host") == host
      if not locked and (not same_host or _alive(int(old.get("pid", 0)))):
        raise WorkdirInUse(f"workdir {os.path.dirname(file)} is in use by another training "
                           f"process ({_describe(old)}; lock {file}); wait for it to end, "
                           "or delete the lock file if that process has ended")
      print(f"warning: taking over the lock of workdir {os.path.dirname(file)}: its holder "
            f"({_describe(old)}) ended without releasing it", file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host,
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    _HELD[file] = [fd, 1]
    try:
      yield
    finally:
      del _HELD[file]
      os.ftruncate(fd, 0)         # released cleanly: no record for the next holder to doubt
  finally:
    os.close(fd)                  # releases the flock


def report_tmp_prefix() -> str:
  """Prefix of this process's temporary report folders (its pid and host in the name)."""
  return f"{REPORT_TMP}{os.getpid()}@{socket.gethostname()}-"


_TMP_FILE = re.compile(r"\.tmp(\d+)(\.npy)?$")


def clean_leftovers(workdir: str, locked: bool) -> list[str]:
  """Remove what killed writers left in ``workdir``; returns the paths removed.

  Always: ``.report-tmp-<pid>@<host>-*`` / ``.report-old-*`` folders of a
  process of this host that is gone.  With ``locked`` (the caller holds the
  training lock, so no other process writes here but report writers):
  also report folders of the old unnamed form, ``<name>.tmp<pid>`` files of
  atomic writes (in the workdir and in checkpoint steps) whose process is gone,
  and Orbax's ``*.orbax-checkpoint-tmp*`` folders of unfinished saves.
  """
  if not os.path.isdir(workdir):
    return []
  host, gone = socket.gethostname(), []
  for name in os.listdir(workdir):
    if not name.startswith((REPORT_TMP, ".report-old-")):
      continue
    owner = re.match(r"\.report-(?:tmp|old)-(\d+)@(.*)-[^-]*$", name)
    if owner:
      stale = owner.group(2) == host and not _alive(int(owner.group(1)))
    else:
      stale = locked
    if stale:
      gone.append(path(workdir, name))
  if locked:
    ckpt = path(workdir, CHECKPOINTS)
    dirs = [workdir] + ([ckpt] + [os.path.join(ckpt, d) for d in os.listdir(ckpt)
                                  if d.isdigit()] if os.path.isdir(ckpt) else [])
    for d in dirs:
      for name in os.listdir(d):
        m = _TMP_FILE.search(name)
        dead_writer = m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
        if dead_writer or (d == ckpt and ".orbax-checkpoint-tmp" in name):
          gone.append(os.path.join(d, name))
  for p in gone:
    if os.path.isdir(p):
      shutil.rmtree(p, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(p)
  if gone:
    print(f"Removed {len(gone)} leftover(s) of interrupted writes in {workdir}: "
          f"{', '.join(os.path.relpath(p, workdir) for p in gone)}", flush=True)
  return gone


def is_disk_full(e: BaseException) -> bool:
  """Whether ``e`` (an OSError, or TensorStore's error via Orbax) says the disk is full."""
  return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or \
      "No space left on device" in str(e) or "os_error_code='28'" in str(e)


def disk_full_path(e: BaseException, default: str) -> str:
  """The file ``e`` names (OSError.filename, or the first quoted path of the message)."""
  if isinstance(e, OSError) and e.filename:
    return str(e.filename)
  m = re.search(r'"(/[^"]+)"', str(e))
  return m.group(1) if m else default
