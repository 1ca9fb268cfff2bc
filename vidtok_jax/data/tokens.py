"""Reading a tokenized dataset (`python -m vidtok_jax.tokenize`): ArrayRecord shards of FSQ token
ids or KL latents, for training a downstream model.

    ds = TokenDataset("tokens/")                 # manifest.json + shards, random access
    rec = ds[0]                                  # {"tokens" or "latent", "path", "window", ...}
    it = iterate_batches("tokens/", global_batch_size=32, seed=0, start_step=0)
    batch = next(it)                             # {"tokens": (B_host, t, h, w) uint, "index": ...}

Plain numpy over `array_record` (no TensorFlow needed); `as_tf_dataset` wraps the same iterator
for tf.data users. Batches are a pure function of (seed, step): step s of a run started at
`start_step=s` equals step s of an uninterrupted run, as the training pipeline's. Each epoch is a
permutation of all records (the last partial global batch of an epoch is dropped); process p of P
takes rows [p*B/P, (p+1)*B/P) of every global batch.

Record format (one ArrayRecord record): `b"VTR1"`, a little-endian uint32 header length, the
header (UTF-8 JSON: `{"meta": {...}, "arrays": [[name, dtype, shape], ...]}`), then each array's
C-order bytes in that order. bfloat16 arrays use `ml_dtypes`.
"""

import json
import math
import os
import struct
from typing import Iterator, Optional

import numpy as np

MAGIC = b"VTR1"
FORMAT = "vidtok_jax.tokens/1"


def array_dtype(name: str) -> np.dtype:
  """numpy dtype of a dtype name (bfloat16 from ml_dtypes)."""
  if name == "bfloat16":
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def encode_record(meta: dict, arrays: dict) -> bytes:
  """One record's bytes (format in the module doc); `meta` must be JSON data."""
  arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
  header = {"meta": meta, "arrays": [[k, v.dtype.name, list(v.shape)] for k, v in arrays.items()]}
  h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  return b"".join([MAGIC, struct.pack("<I", len(h)), h] + [v.tobytes() for v in arrays.values()])


def decode_record(data: bytes) -> dict:
  """`encode_record`'s inverse: the meta fields and the arrays in one dict."""
  if data[:4] != MAGIC:
    raise ValueError(f"not a vidtok_jax token record (starts with {bytes(data[:4])!r})")
  (n,) = struct.unpack("<I", data[4:8])
  header = json.loads(data[8:8 + n])
  out, pos = dict(header["meta"]), 8 + n
  for name, dtype, shape in header["arrays"]:
    dt = array_dtype(dtype)
    size = dt.itemsize * math.prod(shape)
    out[name] = np.frombuffer(data, dt, math.prod(shape), pos).reshape(shape)
    pos += size
  if pos != len(data):
    raise ValueError(f"token record: {len(data) - pos} trailing bytes (corrupt record)")
  return out


def _local(path: str) -> str:
  if "://" in str(path):
    raise ValueError(f"{path}: reading needs a local path (copy the folder, e.g. `gsutil -m cp "
                     f"-r`, or mount it with gcsfuse)")
  return os.fspath(path)


class TokenDataset:
  """Random access to the records of a finished tokenization folder (its `manifest.json`)."""

  def __init__(self, directory):
    self.directory = _local(directory)
    path = os.path.join(self.directory, "manifest.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: not a finished tokenization folder (rerun "
                              f"`python -m vidtok_jax.tokenize` with the same flags to finish it)")
    with open(path) as f:
      self.manifest = json.load(f)
    if self.manifest.get("format") != FORMAT:
      raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
    self.shards = self.manifest["shards"]
    self._offsets = np.cumsum([0] + [s["records"] for s in self.shards])
    self._readers = {}
    stats = os.path.join(self.directory, "stats.json")
    self.stats = json.load(open(stats)) if os.path.exists(stats) else None

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _reader(self, s: int):
    if s not in self._readers:
      from array_record.python.array_record_module import ArrayRecordReader

      self._readers[s] = ArrayRecordReader(os.path.join(self.directory, self.shards[s]["name"]))
    return self._readers[s]

  def read(self, indices) -> list:
    """Decoded records at global `indices` (in that order)."""
    indices = [int(i) for i in indices]
    out = [None] * len(indices)
    by_shard = {}
    for j, i in enumerate(indices):
      if not 0 <= i < len(self):
        raise IndexError(f"record {i} out of range [0, {len(self)})")
      s = int(np.searchsorted(self._offsets, i, side="right")) - 1
      by_shard.setdefault(s, []).append((j, i - int(self._offsets[s])))
    for s, items in by_shard.items():
      raw = self._reader(s).read([k for _, k in items])
      for (j, _), data in zip(items, raw):
        out[j] = decode_record(data)
    return out

  def __getitem__(self, i: int) -> dict:
    return self.read([i])[0]

  def close(self):
    for r in self._readers.values():
      r.close()
    self._readers = {}


def normaliser(stats: dict):
  """`x -> (x - mean) / std` per channel (last axis), float32, from `stats.json`."""
  mean = np.asarray(stats["mean"], np.float32)
  std = np.asarray(stats["std"], np.float32)
  return lambda x: (np.asarray(x, np.float32) - mean) / np.maximum(std, 1e-12)


def iterate_batches(directory, global_batch_size: int, *, seed: int = 0, start_step: int = 0,
                    process_index: Optional[int] = None, process_count: Optional[int] = None,
                    shuffle: bool = True, normalize: bool = False,
                    num_steps: Optional[int] = None) -> Iterator[dict]:
  """Host batches from `start_step` on (module doc): `{"tokens"` (FSQ) or `"latent"` (KL; with
  `normalize`, `(x - mean) / std` from stats.json) stacked `(B_host, ...)`, `"index"` (global
  record ids), `"path"`, `"window"`, `"step"}`. Records must share one shape to batch (clips
  mode; long-mode records need a host batch of 1). Endless unless `num_steps`."""
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                     f"{process_count} processes")
  ds = TokenDataset(directory)
  n = len(ds)
  if n < global_batch_size:
    raise ValueError(f"{directory}: {n} records, fewer than one global batch of "
                     f"{global_batch_size}")
  norm = None
  if normalize:
    if ds.manifest["model"]["regularizer"] != "kl":
      raise ValueError("normalize applies to KL latents; this folder holds FSQ token ids")
    if ds.stats is None:
      raise FileNotFoundError(f"{directory}/stats.json not found (needed by normalize)")
    norm = normaliser(ds.stats)
  per_host, steps_per_epoch = global_batch_size // process_count, n // global_batch_size
  perm_epoch, perm = None, None
  step = int(start_step)
  while num_steps is None or step < start_step + num_steps:
    epoch, s = divmod(step, steps_per_epoch)
    if epoch != perm_epoch:
      perm = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
      perm_epoch = epoch
    lo = s * global_batch_size + process_index * per_host
    ids = perm[lo:lo + per_host]
    recs = ds.read(ids)
    key = "tokens" if "tokens" in recs[0] else "latent"
    shapes = {r[key].shape for r in recs}
    if len(shapes) > 1:
      raise ValueError(f"records {list(ids)} have different shapes {sorted(shapes)} (long-mode "
                       f"videos): use a host batch of 1")
    x = np.stack([r[key] for r in recs])
    yield {key: norm(x) if norm else x, "index": np.asarray(ids, np.int64),
           "path": [r["path"] for r in recs], "window": np.asarray([r["window"] for r in recs]),
           "step": step}
    step += 1


def as_tf_dataset(directory, global_batch_size: int, **kwargs):
  """`iterate_batches` as a `tf.data.Dataset` of `{tokens|latent, index}` (needs TensorFlow)."""
  import tensorflow as tf

  first = next(iterate_batches(directory, global_batch_size, **{**kwargs, "num_steps": 1}))
  key = "tokens" if "tokens" in first else "latent"
  spec = {key: tf.TensorSpec(first[key].shape, first[key].dtype),
          "index": tf.TensorSpec(first["index"].shape, tf.int64)}

  def gen():
    for b in iterate_batches(directory, global_batch_size, **kwargs):
      yield {key: b[key], "index": b["index"]}

  return tf.data.Dataset.from_generator(gen, output_signature=spec)
