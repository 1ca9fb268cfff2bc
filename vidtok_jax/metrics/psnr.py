"""PSNR exactly as VidTok's `compute_psnr` in its evaluation, per frame.

`psnr = -10 * log10(mean((x - y)^2) + 1e-8)` over (H, W, C) of each frame, data in [0, 1];
identical frames give 80 dB. The official function returns the frame mean; we return the
per-frame values so callers can frame-weight across clips and videos.
"""

import jax
import jax.numpy as jnp

EPS = 1e-8


def as_float_images(x, y):
  """Validate a pair of frame batches and cast to float32 (float64 if either is float64)."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape != y.shape or x.ndim not in (4, 5):
    raise ValueError(f"expected two (N,H,W,C) or (B,T,H,W,C) arrays of equal shape, got "
                     f"{x.shape} and {y.shape}")
  for a in (x, y):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(f"expected float images in [0, 1], got {a.dtype} (divide uint8 by 255)")
  dt = jnp.float64 if jnp.float64 in (x.dtype, y.dtype) else jnp.float32
  return x.astype(dt), y.astype(dt)


@jax.jit  # shapes are static: one compile per frame size
def psnr(x, y):
  """Per-frame PSNR. x, y: `(N, H, W, C)` -> `(N,)` or `(B, T, H, W, C)` -> `(B, T)`."""
  x, y = as_float_images(x, y)
  mse = jnp.mean(jnp.square(x - y), axis=(-3, -2, -1))
  return -10.0 * jnp.log10(mse + EPS)
