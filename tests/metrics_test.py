"""Tests for vidtok_jax.metrics.psnr / ssim: parity with VidTok's compute_psnr/ssim + invariants."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import Ref, max_abs

from vidtok_jax.metrics.psnr import psnr
from vidtok_jax.metrics.ssim import ssim

# The module (the package attribute `vidtok_jax.metrics.ssim` is the function).
ssim_lib = importlib.import_module("vidtok_jax.metrics.ssim")


def _case(r, i, dtype):
  """Fixture case i as channels-last [0, 1] floats (case 2 is uint8, used as u8/255)."""
  x, y = r.inputs[f"x{i}"], r.inputs[f"y{i}"]
  if x.dtype == np.uint8:
    x, y = x.astype(dtype) / 255, y.astype(dtype) / 255
  return np.moveaxis(x, 1, -1).astype(dtype), np.moveaxis(y, 1, -1).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity(dtype):
  r = Ref("metrics_psnr_ssim")
  # float32: f32 run errors are <= 1e-6; float64 must match to rounding.
  tol = {"float32": (1e-6, 1e-5), "float64": (1e-12, 1e-12)}[dtype]
  with jax.enable_x64(dtype == "float64"):
    for i in range(3):
      x, y = _case(r, i, np.dtype(dtype))
      p, s = psnr(x, y), ssim(x, y)
      assert p.shape == s.shape == x.shape[:-3]  # per frame; callers average
      assert p.dtype == s.dtype == np.dtype(dtype)
      for name, v in ((f"psnr{i}", p), (f"ssim{i}", s)):
        ref = r.expected(name)
        err = max_abs(jnp.mean(v), ref)
        print(f"metrics_psnr_ssim[{dtype}] {name}: max_abs {err:.3g}")
        assert err <= tol[0] * abs(float(ref)) + (tol[1] if dtype == "float32" else 0), name


def test_identical_images():
  x = jax.random.uniform(jax.random.key(0), (2, 3, 24, 24, 3))
  np.testing.assert_allclose(psnr(x, x), 80.0, rtol=1e-6)  # -10 log10(1e-8)
  np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-6)


def test_ssim_drops_with_noise_and_is_symmetric():
  x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
  noise = jax.random.normal(jax.random.key(1), x.shape)
  s_small = ssim(x, jnp.clip(x + 0.02 * noise, 0, 1))
  s_big = ssim(x, jnp.clip(x + 0.2 * noise, 0, 1))
  assert np.all(s_small < 1.0) and np.all(s_big < s_small)
  np.testing.assert_allclose(ssim(x, x + 0.1 * noise), ssim(x + 0.1 * noise, x), rtol=1e-6)
  p = psnr(x, x + 0.1)
  np.testing.assert_allclose(p, -10 * np.log10(0.01 + 1e-8), rtol=1e-5)


def test_downsample_factor_rounds_half_to_even():
  f = ssim_lib.downsample_factor
  assert [f(128, 128), f(256, 999), f(383, 400), f(384, 392), f(640, 640), f(896, 900)] == \
      [1, 1, 1, 2, 2, 4]  # 0.5 -> 0 -> max 1; 1.5 -> 2; 2.5 -> 2; 3.5 -> 4


def test_avg_pool_path():
  # f = 2 at 384: equal to SSIM of the 2x2-average-pooled images (floor crop of odd sizes).
  x = jax.random.uniform(jax.random.key(0), (1, 384, 387, 1))
  y = jnp.clip(x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), 0, 1)
  pool = lambda a: a[:, :, :386].reshape(1, 192, 2, 193, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(ssim(x, y), ssim_lib.ssim(pool(x), pool(y)), rtol=1e-6)


def test_gaussian_matches_2d_definition():
  g = ssim_lib.gaussian_1d()
  coords = np.arange(11.0) - 5.0
  k2 = np.exp(-(coords[None] ** 2 + coords[:, None] ** 2) / (2 * 1.5**2))
  np.testing.assert_allclose(np.outer(g, g), k2 / k2.sum(), rtol=1e-12)


def test_input_checks():
  x = np.zeros((1, 16, 16, 3), np.uint8)
  with pytest.raises(TypeError, match="255"):
    psnr(x, x)
  with pytest.raises(ValueError, match="equal shape"):
    ssim(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 17, 3)))
  with pytest.raises(ValueError, match=">= 11"):
    ssim(np.zeros((1, 10, 16, 3)), np.zeros((1, 10, 16, 3)))
