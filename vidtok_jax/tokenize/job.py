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

The pieces: `encoder` (the model on the devices), `stats` (dtypes, moments, a shard's tally),
`output` (the folder's files, written atomically), `manifest` (`finalize_dir`); this module
holds the job: its identity, the shards it writes and the loop over them.
"""


import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from typing import Optional, Sequence

import jax
import numpy as np
from etils import epath

import vidtok_jax
from vidtok_jax.data import frames as frames_lib
from vidtok_jax.data import sampling
from vidtok_jax.data import tokens as token_format
from vidtok_jax.evaluation.evaluator import default_batch_size, params_sha256
from vidtok_jax.metrics import rate as rate_lib
from vidtok_jax.tokenize import output
from vidtok_jax.tokenize.encoder import Encoder
from vidtok_jax.tokenize.manifest import finalize_dir
from vidtok_jax.tokenize.stats import Moments, ShardTally, fsq_codes, token_dtype

log = logging.getLogger("vidtok_jax.tokenize")

SEED = 42
STORES = ("mean", "mean_logvar", "sample")
DTYPES = ("float32", "bfloat16", "float16")


class JobMismatchError(ValueError):
  """`out` already holds a different job (another model, protocol or video list)."""


def _check_options(mode, store, dtype, batch_size, videos_per_shard) -> int:
  """`TokenizeJob`'s option checks (ValueError / TypeError); returns the batch size (None: the
  evaluation's default)."""
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
  return batch_size


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
    batch_size = _check_options(mode, store, dtype, batch_size, videos_per_shard)
    self.config, self.out = config, (None if out is None else epath.Path(out))
    self.model = vidtok_jax.VidTok(config.model)
    self.spec = self.model.config
    self.fsq = self.spec.regularizer == "fsq"
    if not self.fsq and store == "mean_logvar" and mode == "long":
      raise ValueError("store='mean_logvar' needs mode='clips' (long videos stream the latent "
                       "only)")
    self.split, self.mode, self.store, self.dtype = split, mode, store, dtype
    self.batch_size, self.seed, self.videos_per_shard = batch_size, seed, videos_per_shard
    size = config.data.size
    self.size = (size, size) if isinstance(size, int) else tuple(size)
    self.num_frames = int(config.data.num_frames)
    self.sample_fps = float(config.data.eval_sample_fps)
    self._check_protocol()
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
    self.source = source or {}
    self.params = params
    self.params_sha256 = params_sha256(params)
    self._encoder = Encoder(self.model, params, store=store, dtype=dtype, batch_size=batch_size,
                            seed=seed)
    self.mesh, self.n_dev = self._encoder.mesh, self._encoder.n_dev
    self.stop_requested = False

  def _check_protocol(self):
    """ValueError unless the model can encode windows of this size and length."""
    spec, (h, w) = self.spec, self.size
    if h % spec.spatial_factor or w % spec.spatial_factor:
      raise ValueError(f"size {h}x{w} is not divisible by the model's spatial factor "
                       f"{spec.spatial_factor}")
    f = spec.time_downsample_factor
    if self.mode == "clips" and (self.num_frames - 1 if spec.causal else self.num_frames) % f:
      raise ValueError(f"num_frames={self.num_frames}: {spec.name} needs "
                       f"{'1 + %dk' % f if spec.causal else 'a multiple of %d' % f} frames")

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
      diffs = output.diff({k: stored.get(k) for k in ident}, ident)
      if diffs:
        raise JobMismatchError(
            f"{self.out} already holds a different job; use a new --out or the same settings. "
            f"Differences: " + "; ".join(diffs))
      return
    self.out.mkdir(parents=True, exist_ok=True)
    output.write_json(path, {**ident, "source": self.source})

  # -- encoding -------------------------------------------------------------------------------

  def encode_windows(self, clips01, video_index: int = 0, first: int = 0) -> dict:
    """Arrays `{name: (K, ...)}` of windows (K, T, h, w, 3) in [0, 1], batched over devices;
    `first`: the video's window number of `clips01[0]` (KL samples are seeded by it)."""
    return self._encoder.windows(clips01, video_index, first)

  def encode_long(self, clip01, video_index: int = 0) -> dict:
    """Arrays `{name: (1, ...)}` of one long clip (1, T, h, w, 3) in [0, 1], streamed."""
    return self._encoder.long(clip01, video_index)

  # -- one shard ------------------------------------------------------------------------------

  def shard_name(self, s: int, m: int) -> str:
    return output.shard_name(self.split, s, m)

  def _shard_done(self, name: str) -> bool:
    side, path = self.out / f"{name}.json", self.out / name
    if not (side.exists() and path.exists()):
      return False
    try:
      meta = json.loads(side.read_text())
    except ValueError:
      return False
    if meta.get("sha256") != output.sha256_file(path):
      log.warning("%s: checksum does not match its sidecar; writing it again", name)
      return False
    return True

  def _write_shard(self, name: str, items, bar) -> dict:
    """Encode `items` [(video index, VideoItem)] into shard `name`; returns its sidecar."""
    from array_record.python.array_record_module import ArrayRecordWriter

    with output.shard_file(self.out, name) as tmp:
      writer = ArrayRecordWriter(tmp, "group_size:1")
      tally = self._encode_into(writer, name, items, bar)
      writer.close()
      sha, nbytes = output.sha256_file(tmp), os.path.getsize(tmp)
    side = tally.sidecar(name, sha, nbytes, items)
    output.write_json(self.out / f"{name}.json", side, compact=True)
    return side

  def _encode_into(self, writer, name: str, items, bar) -> ShardTally:
    """The records of `items` written with `writer`, tallied for the sidecar."""
    tally = ShardTally(self.fsq, self.spec.levels, self.codebook_size, self._channels(),
                       self.size[0] * self.size[1])
    for vi, item in items:
      recs, why = self._video_records(vi, item)
      if why is not None:
        log.warning("skip %s: %s", item.path, why["message"])
        tally.skipped.append(why)
      for meta, arrays in recs or ():
        writer.write(token_format.encode_record(meta, arrays))
        tally.add(meta, arrays)
      bar.update(1)
      bar.set_postfix(shard=name.split("-of-")[0], refresh=False)
    return tally

  def _channels(self) -> int:
    return len(self.spec.levels) if self.fsq else self.spec.z_channels

  # -- one video ------------------------------------------------------------------------------

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
      encode = self._encode_long_video if self.mode == "long" else self._encode_video_windows
      n, valid, arrays = encode(x01, vi)
    except frames_lib.SourceError as e:  # damaged midway: nothing of this video is written
      return skipped(e.reason, str(e))
    finally:
      source.close()
    interval = sampling.frame_interval(fps, self.sample_fps) if fps > 0 else 1
    if n == 0:
      return skipped("no_frames", "no frames")
    if valid is None:
      need = f"> {sampling.LONG_CHUNK}" if self.spec.causal else f">= {sampling.LONG_CHUNK}"
      return skipped("too_short", f"{n} frames at {self.sample_fps:g} fps; long mode needs "
                     f"{need}")
    return self._records(item, vi, fps, interval, valid, self._encoder.cast(arrays)), None

  def _encode_long_video(self, x01, vi: int):
    """`(frames, [clip length] or None when too short, arrays)` of one long-mode video."""
    clip, n = frames_lib.long_clip(x01, self.spec.causal)
    if clip is None:
      return n, None, None
    return n, [clip.shape[1]], self.encode_long(clip, vi)

  def _encode_video_windows(self, x01, vi: int):
    """`(frames, valid frames per window, arrays)` of one clips-mode video, encoded a batch of
    windows at a time as they are decoded."""
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
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
    return windows.frames, valid, arrays

  def _records(self, item, vi: int, fps, interval, valid, arrays) -> list:
    """`[(meta, arrays)]`, one per window (long mode: one)."""
    input_frames = self.num_frames if self.mode == "clips" else valid[0]
    out = []
    for k, n_valid in enumerate(valid):
      meta = {"path": item.path, "video_index": vi, "window": k,
              "first_frame": int(k * self.num_frames * interval) if self.mode == "clips" else 0,
              "frame_interval": int(interval), "fps": float(fps),
              "frames": int(n_valid), "input_frames": int(input_frames),
              "size": list(self.size)}
      out.append((meta, {n: v[k] for n, v in arrays.items()}))
    return out

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
    videos = list(videos)
    if not videos:
      raise ValueError("no videos to tokenize")
    if self.out is None:
      raise ValueError("TokenizeJob(out=None) cannot run: give an output folder")
    ident = self.identity([v.path for v in videos])
    ident["skipped_inputs"] = list(skipped_inputs)
    self._check_or_write_identity(ident)
    m = -(-len(videos) // self.videos_per_shard)
    todo = self._shards_to_do(m)
    with self._sigterm_stops(handle_sigterm):
      t0 = time.monotonic()
      n_todo = sum(len(self._shard_videos(s, len(videos))) for s in todo)
      status = self._write_shards(todo, m, videos, n_todo, progress)
    seconds = time.monotonic() - t0
    result = {"status": status, "shards": m, "written": todo if status == "done" else None,
              "seconds": seconds, "videos_per_second": n_todo / seconds if seconds else None}
    if status == "interrupted":
      log.warning("stopped: rerun the same command to finish the remaining shards")
      return result
    return self._finalize(result, finalize)

  def _shard_videos(self, s: int, count: int) -> range:
    """Indices of the videos of shard `s` (of `count` videos)."""
    v = self.videos_per_shard
    return range(s * v, min((s + 1) * v, count))

  def _shards_to_do(self, m: int) -> list:
    """This process's shards of `m` without a valid sidecar; their leftover temporaries (a
    killed run's: only this process writes them) removed."""
    mine = [s for s in range(m) if s % self.process_count == self.process_index]
    todo = [s for s in mine if not self._shard_done(self.shard_name(s, m))]
    if len(todo) < len(mine):
      log.info("resuming: %d of this process's %d shards already complete", len(mine) - len(todo),
               len(mine))
    for s in todo:
      output.remove_stale(self.out, self.shard_name(s, m))
    return todo

  @contextlib.contextmanager
  def _sigterm_stops(self, enabled: bool):
    """With `enabled`, SIGTERM sets `stop_requested` (the shard being written is finished)
    inside the block; the previous handler is restored after it."""
    if not enabled:
      yield
      return

    def on_term(signum, frame):
      del signum, frame
      self.stop_requested = True
      log.warning("SIGTERM: finishing the current shard, then stopping")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, previous)

  def _write_shards(self, todo, m: int, videos, n_todo: int, progress: bool) -> str:
    """Writes shards `todo` in order; "interrupted" when a stop was requested, else "done"."""
    from tqdm import tqdm

    with tqdm(total=n_todo, desc="tokenize", unit="video", disable=not progress) as bar:
      for s in todo:
        if self.stop_requested:
          return "interrupted"
        idx = self._shard_videos(s, len(videos))
        self._write_shard(self.shard_name(s, m), [(i, videos[i]) for i in idx], bar)
    return "done"

  def _finalize(self, result: dict, finalize: bool) -> dict:
    """Process 0 merges the sidecars (`finalize_dir`) when every shard is there; else the
    result says "partial"."""
    if finalize and self.process_index == 0:
      fin = finalize_dir(self.out)
      if fin is None:
        result["status"] = "partial"
      else:
        result["manifest"] = fin
    elif finalize:
      result["status"] = "partial"
    return result


__all__ = ["DTYPES", "JobMismatchError", "Moments", "SEED", "STORES", "TokenizeJob",
           "finalize_dir", "fsq_codes", "token_dtype"]
