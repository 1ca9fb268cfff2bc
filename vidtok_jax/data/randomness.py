"""Stateless randomness of the training pipeline: every draw is a pure function of (seed,
stream, index), so a batch depends only on its step (see `vidtok_jax.data.pipeline`).

    perm = epoch_permutation(seed, epoch, n)              # the example order of one epoch
    u = hash_uniform(seed, _STREAM_START, k)[0]           # clip start of global sample k
    start, idx = clip_indices(total, fps, 17, 30.0, u)
"""

import numpy as np

from vidtok_jax.data import sampling

_STREAM_PERM, _STREAM_START = 1, 2  # hash streams: epoch permutations, clip starts


def _u64(x):
  """int(s) -> uint64 array, negatives wrapped (two's complement)."""
  return np.asarray(x, np.int64).astype(np.uint64)


def _mix64(x):
  """splitmix64 finaliser of uint64 arrays (wrapping arithmetic): a bijective, well-mixed,
  platform-independent hash, so the data order never depends on numpy's RNG versions."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash(seed: int, stream: int, sub: int, index) -> np.ndarray:
  """uint64 hash of `index` (array) keyed by (seed, stream, sub)."""
  key = _mix64(_mix64(_mix64(_u64([seed])) ^ _u64([stream])) ^ _u64([sub]))
  return _mix64(key ^ _u64(index))


def hash_uniform(seed: int, stream: int, index) -> np.ndarray:
  """float64 in [0, 1) per `index` (int array), a pure function of (seed, stream, index)."""
  return (_hash(seed, stream, 0, index) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """int64 `(n,)`: the example order of `epoch` (argsort of distinct hash keys)."""
  return np.argsort(_hash(seed, _STREAM_PERM, epoch, np.arange(n)), kind="stable").astype(np.int64)


def clip_indices(total: int, fps: float, num_frames: int, sample_fps: float, u: float):
  """(start, int64 `(num_frames,)` indices): the official loader's clip, last index repeated when short."""
  start = int(np.floor(u * sampling.start_range(total, fps, num_frames, sample_fps)))
  idx = sampling.sample_frame_indices(total, fps, num_frames, sample_fps, start=start)
  return start, sampling.pad_to_length(idx, num_frames)


__all__ = ["clip_indices", "epoch_permutation", "hash_uniform"]
