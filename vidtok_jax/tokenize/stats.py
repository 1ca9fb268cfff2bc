"""The numbers a tokenized dataset records: id dtype, FSQ codes, per-channel moments, and the
tally of one shard (its sidecar).

    dt = token_dtype(4096)                        # uint16
    m = Moments.of(latents).merge(Moments.of(more))
    tally = ShardTally(fsq=True, levels=(8, 8, 8, 8), pixels_per_frame=64 * 64)
"""

import dataclasses
from typing import Optional

import numpy as np

from vidtok_jax.metrics import rate as rate_lib


def token_dtype(codebook_size: int) -> np.dtype:
  """The smallest unsigned integer type holding ids in [0, codebook_size)."""
  for dt in (np.uint8, np.uint16, np.uint32):
    if codebook_size - 1 <= np.iinfo(dt).max:
      return np.dtype(dt)
  return np.dtype(np.uint64)


def fsq_codes(ids, levels) -> np.ndarray:
  """FSQ ids -> codes `(..., len(levels))` float32 (numpy twin of `FSQ.indices_to_codes`)."""
  levels = np.asarray(levels, np.int64)
  basis = np.cumprod(np.concatenate([[1], levels[:-1]]))
  digits = (np.asarray(ids, np.int64)[..., None] // basis) % levels
  half = (levels // 2).astype(np.float32)
  return ((digits.astype(np.float32) - half) / half).astype(np.float32)


@dataclasses.dataclass
class Moments:
  """Per-channel count, mean and M2 (sum of squared deviations), float64; merged exactly in a
  fixed order (Chan et al.), so any split of the work gives the same numbers."""
  n: int
  mean: np.ndarray
  m2: np.ndarray

  @classmethod
  def zeros(cls, c: int):
    return cls(0, np.zeros(c), np.zeros(c))

  @classmethod
  def of(cls, x):
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    mean = x.mean(0)
    return cls(len(x), mean, ((x - mean) ** 2).sum(0))

  def merge(self, o: "Moments") -> "Moments":
    if o.n == 0:
      return self
    if self.n == 0:
      return o
    n = self.n + o.n
    d = o.mean - self.mean
    return Moments(n, self.mean + d * (o.n / n), self.m2 + o.m2 + d * d * (self.n * o.n / n))

  def to_json(self):
    return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

  @classmethod
  def from_json(cls, d):
    return cls(int(d["n"]), np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64))


class ShardTally:
  """What one shard's sidecar says of its records, added in order: record count, skipped videos,
  input pixels, the moments of the latents (FSQ: of the codes) and the FSQ token counts."""

  def __init__(self, fsq: bool, levels, codebook_size: int, channels: int,
               pixels_per_frame: int):
    self.fsq, self.levels, self.codebook_size = fsq, levels, codebook_size
    self.channels, self.pixels_per_frame = channels, pixels_per_frame
    self.records, self.skipped, self.pixels = 0, [], 0
    self.moments: Optional[Moments] = None
    self.counts: Optional[np.ndarray] = None

  def add(self, meta: dict, arrays: dict):
    """One record written."""
    self.records += 1
    x = arrays["latent"] if not self.fsq else fsq_codes(arrays["tokens"], self.levels)
    m = Moments.of(x)
    self.moments = m if self.moments is None else self.moments.merge(m)
    if self.fsq:
      self.counts = rate_lib.token_counts(arrays["tokens"], self.codebook_size, self.counts)
    self.pixels += meta["input_frames"] * self.pixels_per_frame

  def sidecar(self, name: str, sha: str, nbytes: int, items) -> dict:
    """The sidecar of shard `name` (its videos `items`: [(video index, item)])."""
    side = {"name": name, "records": self.records, "sha256": sha, "bytes": nbytes,
            "videos": [items[0][0], items[-1][0] + 1] if items else [0, 0],
            "skipped": self.skipped, "pixels": self.pixels,
            "moments": (self.moments or Moments.zeros(self.channels)).to_json()}
    if self.fsq:
      c = np.zeros(self.codebook_size, np.int64) if self.counts is None else self.counts
      used = np.flatnonzero(c)
      side["token_counts"] = {"ids": used.tolist(), "counts": c[used].tolist()}
    return side


__all__ = ["Moments", "ShardTally", "fsq_codes", "token_dtype"]
