"""Shared test helpers: locating and loading the official reference vectors."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

# Parity is checked in float32 with exact (non-TF32) matmuls/convs.
jax.config.update("jax_default_matmul_precision", "highest")
# CPU compile time dominates this suite; XLA's optimisation passes roughly double it.
jax.config.update("jax_disable_most_optimizations", True)
# The same for the commands the tests start (`train.py`, `eval.py`, multi-process runs: JAX reads
# the variable at import), each of which compiles its own programs: `train_loop_test` 737 -> 531 s
# measured. The command matrix (`command_matrix.py`) strips every JAX_* variable: it runs the
# installed commands as a user's shell does, with JAX's defaults.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("VIDTOK_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"


class Ref:
  """One reference fixture: `params` ({torch key: array}), `inputs`, `out`, `out64`, `meta`."""

  def __init__(self, name):
    path = REFERENCE / f"{name}.npz"
    if not path.exists():
      pytest.skip(f"reference fixture {path} not found (needs ../shared/reference beside the repo)")
    d = np.load(path)
    self.name = name
    self.params = {k[len("params/"):]: d[k] for k in d.files if k.startswith("params/")}
    self.inputs = {k[len("in/"):]: d[k] for k in d.files if k.startswith("in/")}
    self.out = {k[len("out/"):]: d[k] for k in d.files if k.startswith("out/")}
    self.out64 = {k[len("out64/"):]: d[k] for k in d.files if k.startswith("out64/")}
    self.meta = json.loads((REFERENCE / f"{name}.json").read_text())

  def expected(self, key):
    """The float64 reference where stored, else its float32 rounding."""
    return self.out64.get(key, self.out[key])


@pytest.fixture
def ref():
  return Ref


def ncthw_to_nthwc(x):
  return np.moveaxis(np.asarray(x), 1, -1)


def nthwc_to_ncthw(x):
  return np.moveaxis(np.asarray(x), -1, 1)


def max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_to_flax_layout(x):
  """PyTorch activations -> channels-last 5-D `(B, T, H, W, C)`.

  `(N, C, T)` temporal sequences become `(N, T, 1, 1, C)`, `(N, C, H, W)` frames `(N, 1, H, W, C)`.
  """
  x = np.asarray(x)
  if x.ndim == 3:
    return np.moveaxis(x, 1, -1)[:, :, None, None, :]
  if x.ndim == 4:
    return np.moveaxis(x, 1, -1)[:, None]
  return ncthw_to_nthwc(x)


def flax_to_torch_layout(y, like):
  """Inverse of `torch_to_flax_layout` for an output shaped like the reference `like`."""
  y = np.asarray(y)
  if np.ndim(like) == 3:
    return np.moveaxis(y[:, :, 0, 0, :], -1, 1)
  if np.ndim(like) == 4:
    return np.moveaxis(y[:, 0], -1, 1)
  return nthwc_to_ncthw(y)


def module_params(module, torch_params, *args, **kwargs):
  """The reference's torch params put onto `module`'s params tree.

  Module fixtures have no model path to tell a Conv2d from a Conv1d, so the layout is derived
  from the Flax shape: `(O, I, *k)` -> `(*k, I, O)`, then unit axes inserted. Whole models go
  through the real converter instead.
  """
  from vidtok_jax.weights.keys import torch_key
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  def convert(path, leaf):
    key = torch_key(tuple(getattr(p, "key", p) for p in path))
    value = np.asarray(torch_params[key], np.float32)
    if getattr(path[-1], "key", None) == "kernel":
      value = np.moveaxis(value, (0, 1), (-1, -2))
    squeeze = lambda s: tuple(d for d in s if d != 1)
    assert squeeze(value.shape) == squeeze(leaf.shape), (key, value.shape, leaf.shape)
    return value.reshape(leaf.shape)
  params = jax.tree_util.tree_map_with_path(convert, template.get("params", {}))
  used = {torch_key(tuple(getattr(p, "key", p) for p in path))
          for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert used == set(torch_params), set(torch_params) ^ used
  return params


# One implementation, a testing helper beside this file (benchmarks/ import it too).
from random_weights import random_params  # noqa: E402,F401
