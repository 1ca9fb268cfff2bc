"""Tokenize a video dataset once: FSQ token ids or KL latents to ArrayRecord shards.

    job = TokenizeJob(config, params, out="tokens/", mode="clips", store="mean")
    job.run(videos)            # videos: VideoItems (`evaluation.folder_videos` / `tfds_videos`)

Layout of `out` (local or any `etils.epath` URL such as gs://):
  job.json                                 what this folder holds (model, protocol, video list);
                                           a rerun with anything different is refused
  <split>-NNNNN-of-MMMMM.array_record      records (`vidtok_jax.data.tokens` format)
  <split>-NNNNN-of-MMMMM.array_record.json sidecar: record count, sha256, skipped videos,
                                           partial statistics (and FSQ token counts)
  manifest.json, stats.json                written once every shard is complete

Shard s holds videos [s*V, (s+1)*V) of the (sorted) video list, V = `videos_per_shard`, so its
bytes depend only on its videos: process p of P writes shards s = p (mod P), a rerun redoes only
shards without a valid sidecar, and any split of the work gives the same files as one
uninterrupted process. A shard is written under a temporary name and renamed when complete;
its sidecar is written (also atomically) after it. Every sampled latent is seeded per
(video index, window), never per batch.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

import vidtok_jax
from vidtok_jax.data import frames as frames_lib
from vidtok_jax.data import sampling
from vidtok_jax.data import tokens as token_format
from vidtok_jax.evaluation.evaluator import default_batch_size, params_sha256
from vidtok_jax.metrics import rate as rate_lib

log = logging.getLogger("vidtok_jax.tokenize")

SEED = 42
STORES = ("mean", "mean_logvar", "sample")
DTYPES = ("float32", "bfloat16", "float16")
_ENCODERS = {}  # (ModelSpec, store, devices) -> jitted window encoder; params are an argument


class JobMismatchError(ValueError):
  """`out` already holds a different job (another model, protocol or video list)."""


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


# ------------------------------------------------------------------ files


def _tmp_suffix() -> str:
  """Unique per process across hosts sharing one output folder."""
  return f"tmp-{socket.gethostname()}-{os.getpid()}"


def _atomic_write(path: epath.Path, data: bytes):
  tmp = path.parent / f".{path.name}.{_tmp_suffix()}"
  tmp.write_bytes(data)
  tmp.replace(path)


def _json_bytes(obj, compact: bool = False) -> bytes:
  if compact:  # sidecars: token counts can run to 2 x 262144 numbers
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()
  return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _sha256_file(path) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _diff(stored, wanted, prefix="") -> list:
  """Dotted fields whose values differ between two JSON-like dicts."""
  out = []
  for k in sorted(set(stored) | set(wanted)):
    a, b = stored.get(k), wanted.get(k)
    name = f"{prefix}{k}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: stored {a!r}, now {b!r}")
  return out


# ------------------------------------------------------------------ statistics


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


# ------------------------------------------------------------------ the job


class TokenizeJob:
  """Encodes videos to shards in `out` (module doc).

  Args:
    config: full config (`model`; `data.size`, `data.num_frames`, `data.eval_sample_fps`: the
      evaluation clip protocol), e.g. `configs/vidtok.py:VARIANT`.
    params: the VidTok params.
    out: output folder (local path or epath URL); None for `rate_of` only.
    split: shard name prefix.
    mode: "clips" (one record per window of num_frames, the last padded by repeating its last
      frame) or "long" (one record per video: the first 16k(+1) frames, streamed in chunks).
    store: KL models: "mean" (posterior mean), "mean_logvar" (also logvar; clips mode) or
      "sample" (a sample seeded per video and window).
    dtype: KL array dtype ("float32", "bfloat16", "float16"); FSQ ids use `token_dtype`.
    batch_size: windows per local device per call (the batch is sharded over local devices);
      None: `evaluation.default_batch_size()` (1 on CPU, 4 on GPU/TPU).
    videos_per_shard: videos per shard (fixes the shard layout: part of the job identity).
    process_index, process_count: this process's share (default: jax's).
  """

  def __init__(self, config, params, out, *, split: str = "train", mode: str = "clips",
               store: str = "mean", dtype: str = "float32", batch_size: Optional[int] = 1,
               seed: int = SEED, videos_per_shard: int = 100,
               process_index: Optional[int] = None, process_count: Optional[int] = None,
               source: Optional[dict] = None):
    if mode not in ("clips", "long"):
      raise ValueError(f"mode must be 'clips' or 'long', got {mode!r}")
    if store not in STORES:
      raise ValueError(f"store must be one of {STORES}, got {store!r}")
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size is None:  # as the evaluation: 1 on CPU, 4 on accelerators
      batch_size = default_batch_size()
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool):
      raise TypeError(f"batch_size must be an int (or None: the default), got {batch_size!r}")
    if batch_size < 1 or videos_per_shard < 1:
      raise ValueError(f"batch_size and videos_per_shard must be >= 1, got {batch_size}, "
                       f"{videos_per_shard}")
    self.config, self.out = config, (None if out is None else epath.Path(out))
    self.model = vidtok_jax.VidTok(config.model)
    spec = self.spec = self.model.config
    self.fsq = spec.regularizer == "fsq"
    if not self.fsq and store == "mean_logvar" and mode == "long":
      raise ValueError("store='mean_logvar' needs mode='clips' (long videos stream the latent "
                       "only)")
    self.split, self.mode, self.store, self.dtype = split, mode, store, dtype
    self.batch_size, self.seed, self.videos_per_shard = batch_size, seed, videos_per_shard
    size = config.data.size
    self.size = (size, size) if isinstance(size, int) else tuple(size)
    self.num_frames = int(config.data.num_frames)
    self.sample_fps = float(config.data.eval_sample_fps)
    h, w = self.size
    if h % spec.spatial_factor or w % spec.spatial_factor:
      raise ValueError(f"size {h}x{w} is not divisible by the model's spatial factor "
                       f"{spec.spatial_factor}")
    f = spec.time_downsample_factor
    if mode == "clips" and (self.num_frames - 1 if spec.causal else self.num_frames) % f:
      raise ValueError(f"num_frames={self.num_frames}: {spec.name} needs "
                       f"{'1 + %dk' % f if spec.causal else 'a multiple of %d' % f} frames")
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
    self.source = source or {}
    self.params = params
    self.params_sha256 = params_sha256(params)
    devices = jax.local_devices()
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.n_dev = len(devices)
    self._params_dev = jax.device_put(params, jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec()))
    self._enc = self._make_encoder()
    self._streamer = None
    self.stop_requested = False

  # -- identity -------------------------------------------------------------------------------

  @property
  def codebook_size(self) -> int:
    return int(np.prod(self.spec.levels)) if self.fsq else 0

  def identity(self, names: Sequence[str]) -> dict:
    """What makes two runs the same job: model, protocol and the video list."""
    model = {"variant": self.config.get("variant", self.spec.name),
             "params_sha256": self.params_sha256, "regularizer": self.spec.regularizer,
             "channels": len(self.spec.levels) if self.fsq else self.spec.z_channels}
    if self.fsq:
      model.update(codebook_size=self.codebook_size, levels=list(self.spec.levels))
    protocol = {
        "mode": self.mode, "size": list(self.size), "sample_fps": self.sample_fps,
        "num_frames": self.num_frames if self.mode == "clips" else
        ("16k+1" if self.spec.causal else "16k"),
        "frames": "ids 0, d, 2d, ... with d = round(fps / sample_fps)",
        "resize": "short side to height (antialiased bilinear), centre crop; pixels in [-1, 1]",
        "store": "token ids" if self.fsq else self.store,
        "dtype": token_dtype(self.codebook_size).name if self.fsq else self.dtype,
        "seed": self.seed, "videos_per_shard": self.videos_per_shard, "split": self.split,
    }
    digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()
    return {"format": token_format.FORMAT, "model": model, "protocol": protocol,
            "videos": {"count": len(names), "sha256": digest}}

  def _check_or_write_identity(self, ident: dict):
    path = self.out / "job.json"
    if path.exists():
      stored = json.loads(path.read_text())
      diffs = _diff({k: stored.get(k) for k in ident}, ident)
      if diffs:
        raise JobMismatchError(
            f"{self.out} already holds a different job; use a new --out or the same settings. "
            f"Differences: " + "; ".join(diffs))
      return
    self.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, _json_bytes({**ident, "source": self.source}))

  # -- encoding -------------------------------------------------------------------------------

  def _make_encoder(self):
    cache_key = (self.spec, self.store, tuple(self.mesh.devices.flat))
    if cache_key in _ENCODERS:  # reruns in one process (tests, notebooks) compile once
      return _ENCODERS[cache_key]
    model, fsq, store = self.model, self.fsq, self.store

    def enc(params, x01, keys):
      z, aux = model.apply({"params": params}, x01 * 2.0 - 1.0, False, 0, False,
                           method=model.encode)
      if fsq:
        return {"tokens": aux["indices"]}
      mean, logvar = aux["mean"].astype(jnp.float32), aux["logvar"].astype(jnp.float32)
      if store == "sample":
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
        return {"latent": mean + jnp.exp(0.5 * logvar) * noise}
      out = {"latent": mean}
      if store == "mean_logvar":
        out["logvar"] = logvar
      return out

    batch = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    _ENCODERS[cache_key] = jax.jit(enc, in_shardings=(None, batch, batch), out_shardings=batch)
    return _ENCODERS[cache_key]

  def _window_keys(self, video_index: int, window_ids):
    base = jax.random.fold_in(jax.random.key(self.seed), video_index)
    return jax.vmap(lambda w: jax.random.fold_in(base, w))(jnp.asarray(window_ids, jnp.uint32))

  def encode_windows(self, clips01, video_index: int = 0, first: int = 0) -> dict:
    """Arrays `{name: (K, ...)}` of windows (K, T, h, w, 3) in [0, 1], batched over devices;
    `first`: the video's window number of `clips01[0]` (KL samples are seeded by it)."""
    k, b = len(clips01), self.batch_size * self.n_dev
    parts = []
    for lo in range(0, k, b):
      chunk = clips01[lo:lo + b]
      ids = np.arange(first + lo, first + lo + b)
      pad = b - len(chunk)
      if pad:  # fixed batch shape: one compile
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      out = jax.device_get(self._enc(self._params_dev, jnp.asarray(chunk, jnp.float32),
                                     self._window_keys(video_index, ids)))
      parts.append({n: np.asarray(v)[:b - pad] for n, v in out.items()})
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

  def encode_long(self, clip01, video_index: int = 0) -> dict:
    """Arrays `{name: (1, ...)}` of one long clip (1, T, h, w, 3) in [0, 1], streamed."""
    from vidtok_jax.inference.streaming import Streamer

    if self._streamer is None:
      self._streamer = Streamer(self.spec, self.params, t_chunk_enc=sampling.LONG_CHUNK,
                                window=sampling.LONG_CHUNK, sample=self.store == "sample",
                                seed=self.seed)
    self._streamer.seed = self.seed + video_index
    z, aux = self._streamer.encode(np.asarray(clip01, np.float32) * 2.0 - 1.0)
    return {"tokens": aux["indices"]} if self.fsq else {"latent": z}

  def _cast(self, arrays: dict) -> dict:
    if self.fsq:
      return {"tokens": arrays["tokens"].astype(token_dtype(self.codebook_size))}
    return {n: v.astype(token_format.array_dtype(self.dtype)) for n, v in arrays.items()}

  # -- one shard ------------------------------------------------------------------------------

  def shard_name(self, s: int, m: int) -> str:
    return f"{self.split}-{s:05d}-of-{m:05d}.array_record"

  def _shard_done(self, name: str) -> bool:
    side, path = self.out / f"{name}.json", self.out / name
    if not (side.exists() and path.exists()):
      return False
    try:
      meta = json.loads(side.read_text())
    except ValueError:
      return False
    if meta.get("sha256") != _sha256_file(path):
      log.warning("%s: checksum does not match its sidecar; writing it again", name)
      return False
    return True

  def _write_shard(self, name: str, items, bar) -> dict:
    """Encode `items` [(video index, VideoItem)] into shard `name`; returns its sidecar."""
    from array_record.python.array_record_module import ArrayRecordWriter

    local = "://" not in self.out.as_posix()
    tmpdir = None if local else tempfile.mkdtemp(prefix="vidtok_tokenize_")
    tmp = (os.path.join(os.fspath(self.out), f".{name}.{_tmp_suffix()}") if local else
           os.path.join(tmpdir, name))
    writer = ArrayRecordWriter(tmp, "group_size:1")
    records, skipped, moments, counts, pixels = 0, [], None, None, 0
    try:
      for vi, item in items:
        recs, why = self._video_records(vi, item)
        if why is not None:
          log.warning("skip %s: %s", item.path, why["message"])
          skipped.append(why)
        for meta, arrays in recs or ():
          writer.write(token_format.encode_record(meta, arrays))
          records += 1
          x = arrays["latent"] if not self.fsq else fsq_codes(arrays["tokens"], self.spec.levels)
          m = Moments.of(x)
          moments = m if moments is None else moments.merge(m)
          if self.fsq:
            counts = rate_lib.token_counts(arrays["tokens"], self.codebook_size, counts)
          pixels += meta["input_frames"] * self.size[0] * self.size[1]
        bar.update(1)
        bar.set_postfix(shard=name.split("-of-")[0], refresh=False)
      writer.close()
      sha = _sha256_file(tmp)
      nbytes = os.path.getsize(tmp)
      final = self.out / name
      if local:
        os.replace(tmp, os.fspath(final))
      else:
        part = self.out / f".{name}.{_tmp_suffix()}"
        with open(tmp, "rb") as src, part.open("wb") as dst:  # local -> remote, streamed
          shutil.copyfileobj(src, dst, 1 << 24)
        part.replace(final)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
      if tmpdir:
        os.rmdir(tmpdir)
    side = {"name": name, "records": records, "sha256": sha, "bytes": nbytes,
            "videos": [items[0][0], items[-1][0] + 1] if items else [0, 0],
            "skipped": skipped, "pixels": pixels,
            "moments": (moments or Moments.zeros(self._channels())).to_json()}
    if self.fsq:
      c = np.zeros(self.codebook_size, np.int64) if counts is None else counts
      used = np.flatnonzero(c)
      side["token_counts"] = {"ids": used.tolist(), "counts": c[used].tolist()}
    _atomic_write(self.out / f"{name}.json", _json_bytes(side, compact=True))
    return side

  def _channels(self) -> int:
    return len(self.spec.levels) if self.fsq else self.spec.z_channels

  def _video_records(self, vi: int, item):
    """([(meta, arrays)], None) for one video, or (None, skipped entry). The video is decoded,
    resized and encoded as a stream (`vidtok_jax.data.frames`): host memory holds a batch of
    windows and the (small) encoded records, whatever its length; long mode holds the clip at
    the model's resolution (the streamer takes it whole)."""
    def skipped(reason, message):
      return None, {"path": item.path, "video_index": vi, "reason": reason, "message": message}

    try:
      source = frames_lib.open_frames(item)
    except Exception as e:  # unreadable / corrupt: report it, go on with the rest
      return skipped(getattr(e, "reason", type(e).__name__), str(e))
    try:
      fps = source.fps
      x01 = frames_lib.resized(source, self.size)
      if self.mode == "long":
        clip, n = frames_lib.long_clip(x01, self.spec.causal)
        clips, valid = (None, None) if clip is None else (clip, [clip.shape[1]])
        arrays = None if clip is None else self.encode_long(clip, vi)
      else:
        windows = frames_lib.Windows(x01, self.num_frames)
        valid, parts, batch = [], [], []
        for clip, n_valid in windows:
          valid.append(n_valid)
          batch.append(clip)
          if len(batch) == self.batch_size * self.n_dev:
            parts.append(self.encode_windows(np.stack(batch), vi, first=len(valid) - len(batch)))
            batch = []
        if batch:
          parts.append(self.encode_windows(np.stack(batch), vi, first=len(valid) - len(batch)))
        n, clips = windows.frames, valid
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
    except frames_lib.SourceError as e:  # damaged midway: nothing of this video is written
      return skipped(e.reason, str(e))
    finally:
      source.close()
    interval = sampling.frame_interval(fps, self.sample_fps) if fps > 0 else 1
    if n == 0:
      return skipped("no_frames", "no frames")
    if clips is None:
      need = f"> {sampling.LONG_CHUNK}" if self.spec.causal else f">= {sampling.LONG_CHUNK}"
      return skipped("too_short", f"{n} frames at {self.sample_fps:g} fps; long mode needs "
                     f"{need}")
    arrays = self._cast(arrays)
    input_frames = self.num_frames if self.mode == "clips" else valid[0]
    out = []
    for k, n_valid in enumerate(valid):
      meta = {"path": item.path, "video_index": vi, "window": k,
              "first_frame": int(k * self.num_frames * interval) if self.mode == "clips" else 0,
              "frame_interval": int(interval), "fps": float(fps),
              "frames": int(n_valid), "input_frames": int(input_frames),
              "size": list(self.size)}
      out.append((meta, {n: v[k] for n, v in arrays.items()}))
    return out, None

  def rate_of(self, videos, progress: bool = False) -> dict:
    """FSQ rate figures (`metrics.rate`, the coded size from one ANS stream, decoded back to
    check) of `videos` under this protocol, nothing written: what eval.py reports."""
    from tqdm import tqdm

    if not self.fsq:
      raise ValueError("rate figures need an FSQ model")
    ids, pixels = [], 0
    for vi, item in enumerate(tqdm(list(videos), desc="rate", unit="video", disable=not progress)):
      recs, _ = self._video_records(vi, item)
      for meta, arrays in recs or ():
        ids.append(np.asarray(arrays["tokens"], np.int64).reshape(-1))
        pixels += meta["input_frames"] * self.size[0] * self.size[1]
    if not ids:
      raise ValueError("no video could be encoded: no rate figures")
    return rate_lib.dataset_rate(np.concatenate(ids), self.codebook_size, pixels)

  # -- the run --------------------------------------------------------------------------------

  def run(self, videos, *, skipped_inputs: Sequence[dict] = (), progress: bool = True,
          handle_sigterm: bool = False, finalize: bool = True) -> dict:
    """Tokenize this process's shards of `videos` (VideoItems, in dataset order; their `.path`
    is the name recorded). Returns {"status": "done" | "interrupted" | "partial", ...};
    "partial": this process is done but other processes' shards are missing (process 0
    finishes with `finalize`). `skipped_inputs`: entries dropped before encoding (e.g. CSV
    lines naming missing files), listed in the manifest."""
    from tqdm import tqdm

    videos = list(videos)
    if not videos:
      raise ValueError("no videos to tokenize")
    if self.out is None:
      raise ValueError("TokenizeJob(out=None) cannot run: give an output folder")
    ident = self.identity([v.path for v in videos])
    ident["skipped_inputs"] = list(skipped_inputs)
    self._check_or_write_identity(ident)
    v = self.videos_per_shard
    m = -(-len(videos) // v)
    mine = [s for s in range(m) if s % self.process_count == self.process_index]
    todo = [s for s in mine if not self._shard_done(self.shard_name(s, m))]
    if len(todo) < len(mine):
      log.info("resuming: %d of this process's %d shards already complete", len(mine) - len(todo),
               len(mine))
    if "://" not in self.out.as_posix():  # leftovers of a killed run (only we write these)
      for s in todo:
        for stale in self.out.glob(f".{self.shard_name(s, m)}.tmp-*"):
          stale.unlink()
    previous = None
    if handle_sigterm:
      def on_term(signum, frame):
        del signum, frame
        self.stop_requested = True
        log.warning("SIGTERM: finishing the current shard, then stopping")
      previous = signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    n_todo = sum(len(range(s * v, min((s + 1) * v, len(videos)))) for s in todo)
    status = "done"
    try:
      with tqdm(total=n_todo, desc="tokenize", unit="video", disable=not progress) as bar:
        for s in todo:
          if self.stop_requested:
            status = "interrupted"
            break
          idx = range(s * v, min((s + 1) * v, len(videos)))
          self._write_shard(self.shard_name(s, m), [(i, videos[i]) for i in idx], bar)
    finally:
      if handle_sigterm:
        signal.signal(signal.SIGTERM, previous)
    seconds = time.monotonic() - t0
    result = {"status": status, "shards": m, "written": todo if status == "done" else None,
              "seconds": seconds, "videos_per_second": n_todo / seconds if seconds else None}
    if status == "interrupted":
      log.warning("stopped: rerun the same command to finish the remaining shards")
      return result
    if finalize and self.process_index == 0:
      fin = finalize_dir(self.out)
      if fin is None:
        result["status"] = "partial"
      else:
        result["manifest"] = fin
    elif finalize:
      result["status"] = "partial"
    return result


# ------------------------------------------------------------------ merging


def finalize_dir(out, verify_rate: bool = True) -> Optional[dict]:
  """Merge the shard sidecars of `out` into manifest.json and stats.json (and the FSQ rate
  figures); None (nothing written) while shards are missing. The merge runs in shard order, so
  the files do not depend on how the work was split."""
  out = epath.Path(out)
  job = json.loads((out / "job.json").read_text())
  count = job["videos"]["count"]
  v = job["protocol"]["videos_per_shard"]
  m = -(-count // v)
  split = job["protocol"]["split"]
  names = [f"{split}-{s:05d}-of-{m:05d}.array_record" for s in range(m)]
  sides = []
  missing = [n for n in names if not (out / f"{n}.json").exists()]
  if missing:
    log.info("%d of %d shards not complete yet (e.g. %s): manifest not written", len(missing), m,
             missing[0])
    return None
  for n in names:
    sides.append(json.loads((out / f"{n}.json").read_text()))
  moments = Moments.zeros(job["model"]["channels"])
  skipped = list(job.get("skipped_inputs", []))
  for s in sides:
    moments = moments.merge(Moments.from_json(s["moments"]))
    skipped += s["skipped"]
  records = sum(s["records"] for s in sides)
  stats = {"of": "FSQ codes" if job["model"]["regularizer"] == "fsq" else
           f"latent ({job['protocol']['store']}, stored {job['protocol']['dtype']})",
           "channels": job["model"]["channels"], "num_values": int(moments.n) * len(moments.mean),
           "values_per_channel": int(moments.n), "mean": moments.mean.tolist(),
           "std": np.sqrt(moments.m2 / max(moments.n, 1)).tolist(),
           "computed": "float64, exact pairwise merge of per-shard moments in shard order"}
  manifest = {k: job[k] for k in ("format", "model", "protocol", "videos")}
  manifest["source"] = job.get("source", {})
  encoded_videos = count - sum(1 for s in sides for _ in s["skipped"])
  manifest["counts"] = {"videos": count, "videos_encoded": encoded_videos,
                        "videos_skipped": count - encoded_videos,
                        "inputs_skipped": len(job.get("skipped_inputs", [])),
                        "records": records, "shards": m}
  manifest["skipped"] = skipped
  manifest["shards"] = [{k: s[k] for k in ("name", "records", "sha256", "bytes", "videos")}
                        for s in sides]
  if job["model"]["regularizer"] == "fsq" and records:
    manifest["rate"] = _rate(out, job, sides, verify_rate)
  _atomic_write(out / "stats.json", _json_bytes(stats))
  _atomic_write(out / "manifest.json", _json_bytes(manifest))
  return manifest


def _rate(out, job, sides, verify: bool) -> dict:
  """Rate figures over all shards: the order-0 model from the merged counts, each shard's ids
  ANS-coded with it (and decoded back when `verify`)."""
  from array_record.python.array_record_module import ArrayRecordReader

  k = job["model"]["codebook_size"]
  counts = np.zeros(k, np.int64)
  for s in sides:
    counts[np.asarray(s["token_counts"]["ids"], np.int64)] += np.asarray(
        s["token_counts"]["counts"], np.int64)
  bits = 0
  for s in sides:
    if not s["records"]:
      continue
    path, tmpdir = out / s["name"], None
    if "://" in out.as_posix():  # the reader opens local files only
      tmpdir = tempfile.mkdtemp(prefix="vidtok_rate_")
      path = epath.Path(tmpdir) / s["name"]
      with (out / s["name"]).open("rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    r = ArrayRecordReader(os.fspath(path))
    ids = np.concatenate([token_format.decode_record(d)["tokens"].reshape(-1)
                          for d in r.read_all()]).astype(np.int64)
    r.close()
    if tmpdir:
      path.unlink()
      os.rmdir(tmpdir)
    words = rate_lib.entropy_code(ids, counts)
    if verify and not np.array_equal(rate_lib.entropy_decode(words, counts, len(ids)), ids):
      raise RuntimeError(f"{s['name']}: entropy-coding round trip failed")
    bits += 32 * len(words)
  fig = rate_lib.rate_figures(counts, k, sum(s["pixels"] for s in sides), coded_bits=bits)
  fig["coder"] = ("constriction 0.5 ANS (stack) coder, order-0 categorical model of the "
                  "dataset's ids, one stream per shard; model side information not included")
  return fig
