"""Write constraints.txt: the versions of every package the suite and the README's
figures were measured with (the project's dependencies in setup.cfg, with the test
extras and mutmut, TensorFlow's CPU build, plus the numerical core they pull in).

To move to newer releases:
  python -m pip install -U -e '.[test]'    # without -c: the newest allowed by setup.cfg
  bash .ci/run                             # the suite must pass
  python launch/pin_versions.py            # rewrite constraints.txt from what is installed
and re-measure the README's figures (benchmarks/run.py, the quickstart).
"""
import configparser
import importlib.metadata
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("tensorflow-cpu", "jaxlib", "tensorstore", "ml-dtypes", "scipy", "protobuf", "keras", "grimp", "MarkupSafe")


def requirements() -> list[str]:
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  lines = cfg["options"]["install_requires"].splitlines()
  for extra in ("test", "mutation"):
    lines += cfg["options.extras_require"][extra].splitlines()
  names = [re.split(r"[<>=!~\[; ]", l.strip())[0] for l in lines if l.strip()]
  return list(dict.fromkeys(names + list(CORE)))


def main():
  pins = []
  for name in requirements():
    try:
      pins.append(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      print(f"not installed, left out: {name}")
  path = os.path.join(REPO, "constraints.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("# Versions the suite and the README's figures were measured with; written by\n"
            "# launch/pin_versions.py (see its docstring to update).  Used by launch/install.sh.\n")
    f.write("\n".join(sorted(pins, key=str.lower)) + "\n")
  print(f"wrote {len(pins)} pins to {path}")


if __name__ == "__main__":
  main()
