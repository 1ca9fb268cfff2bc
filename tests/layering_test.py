"""Inference never depends on training: `vidtok_jax.inference`, `evaluation`, `tokenize` and
`weights` import nothing from `vidtok_jax.train`, neither at import time (a fresh interpreter
imports them and no `vidtok_jax.train` module is loaded) nor anywhere in their source (imports
inside functions included, checked on the syntax tree)."""

import ast
import json
import os
import pathlib
import subprocess
import sys

from conftest import REPO

PACKAGES = ("inference", "evaluation", "tokenize", "weights")
ENTRY_POINTS = ("vidtok_jax.inference.reconstruct", "vidtok_jax.evaluation.evaluator",
                "vidtok_jax.tokenize.job", "vidtok_jax.weights.load")
TRAIN = "vidtok_jax.train"


def _is_train(module: str) -> bool:
  return module == TRAIN or module.startswith(TRAIN + ".")


def train_imports(path: pathlib.Path) -> list:
  """`(line, what)` of every import of `vidtok_jax.train` in the file at `path`."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names if _is_train(a.name)]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if _is_train(node.module):
        found.append((node.lineno, node.module))
      elif node.module == "vidtok_jax":  # `from vidtok_jax import train`
        found += [(node.lineno, f"vidtok_jax.{a.name}") for a in node.names if a.name == "train"]
    elif isinstance(node, ast.Call) and node.args:  # importlib.import_module("vidtok_jax.train")
      first = node.args[0]
      func = node.func
      name = getattr(func, "attr", getattr(func, "id", ""))
      if (name in ("import_module", "__import__") and isinstance(first, ast.Constant)
          and isinstance(first.value, str) and _is_train(first.value)):
        found.append((node.lineno, first.value))
  return found


def test_static_no_train_imports():
  files = [f for p in PACKAGES for f in sorted((REPO / "vidtok_jax" / p).rglob("*.py"))]
  assert len(files) >= 10
  bad = {str(f.relative_to(REPO)): hits for f in files if (hits := train_imports(f))}
  assert not bad, f"inference-side modules import the training package: {bad}"


def test_the_checker_finds_train_imports(tmp_path):
  src = tmp_path / "m.py"
  src.write_text("import os\n\ndef f():\n  from vidtok_jax.train.checkpoint import Checkpoints\n"
                 "  from vidtok_jax import train\n  import vidtok_jax.train.state\n"
                 "  importlib.import_module('vidtok_jax.train.loop')\n"
                 "  from vidtok_jax import weights\n  import vidtok_jax.trainer\n")
  assert [line for line, _ in train_imports(src)] == [4, 5, 6, 7]


def test_fresh_import_loads_no_train_module():
  script = ("import json, sys\n" + "".join(f"import {m}\n" for m in ENTRY_POINTS)
            + "print(json.dumps(sorted(m for m in sys.modules if m.startswith('vidtok_jax'))))\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  loaded = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(ENTRY_POINTS) <= set(loaded)
  assert not [m for m in loaded if _is_train(m)], loaded
