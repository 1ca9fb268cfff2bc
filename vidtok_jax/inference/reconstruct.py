"""Reconstruct a video with a VidTok model, as the official `inference_reconstruct.py`.

    frames01, info = load_video("clip.mp4", (256, 256), sample_fps=30)
    recon01, tokens = reconstruct_video(model, params, frames01, num_frames=17, seed=42)
    write_video("clip_recon.mp4", to_uint8(recon01), fps=30)
    save_tokens("clip_tokens.npz", tokens, variant=..., fps=30, size=(256, 256), num_frames=17,
                num_input_frames=len(frames01))
    video01 = decode_tokens(model, params, load_tokens("clip_tokens.npz", variant=...))

Protocol (official): frames 0, d, 2d, ... with d = round(fps / sample_fps); short side resized to
the height (antialiased bilinear), centre crop; consecutive windows of `num_frames` (17 causal,
16 non-causal), the incomplete tail DROPPED; each window through the official forward
`model(x)`; `clamp(-1, 1)`, `(x + 1) / 2 * 255` truncated to uint8; written at `sample_fps`.

Latents: the video comes from the official forward, which SAMPLES the KL posterior; the sample of
window k is drawn with `fold_in(key(seed), k)`, so it does not depend on how windows are batched.
The saved KL tokens are the posterior MODE (mean) instead, so a tokens file is deterministic;
decoding it therefore gives the mean reconstruction, not the sampled video. FSQ has no sampling:
its indices decode to exactly the forward's reconstruction (v1.1 causal: the last `num_frames`
frames of each decoded window, as the forward trims).

Tokens files (`save_tokens`) are `.npz`: `indices` int32 `(K, t, h, w)` (FSQ) or `latents` float32
`(K, t, h, w, C)` (KL), K windows, plus metadata (`format`, `variant`, `fps`, `size`, `num_frames`,
`num_input_frames`, `source`), loadable without pickle.

The pieces: `video_io` (video files in and out), `forward` (the model calls, window by window or
streamed), `token_files` (save / load tokens); this module runs a whole `--input` or `--tokens`
job and re-exports their names.
"""


import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
from typing import Optional

import numpy as np

from vidtok_jax.data import frames as frames_lib
from vidtok_jax.data.decode import FrameStream
from vidtok_jax.files import atomic_path, refuse_existing, write_text
from vidtok_jax.inference.forward import (
  _LONG_DEFAULTS,
  SEED,
  _batched,
  _progress,
  _reconstruct_batches,
  check_window,
  decode_long_tokens,
  decode_tokens,
  default_num_frames,
  reconstruct_long,
  reconstruct_video,
  reconstruct_windows,
)
from vidtok_jax.inference.token_files import FORMAT, load_tokens, save_tokens
from vidtok_jax.inference.video_io import (
  VideoWriter,
  decode_errors,
  load_video,
  lossy_crop,
  side_by_side,
  split_windows,
  stream_info,
  to_uint8,
  warn_lossy_crop,
  write_video,
)
from vidtok_jax.metrics.psnr import psnr

log = logging.getLogger("vidtok_jax.inference.reconstruct")


# ------------------------------------------------------------------ PSNR report


def psnr_per_frame(frames01, recon01) -> np.ndarray:
  """Per-frame PSNR (official `compute_psnr`, [0, 1] data) as float64 `(N,)`."""
  return np.asarray(psnr(np.asarray(frames01, np.float32), np.asarray(recon01, np.float32)),
                    np.float64)


def plot_psnr(path, values, title: str, window: Optional[int] = None):
  """Saves a PNG of per-frame PSNR (dashed lines at window boundaries)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  values = np.asarray(values)
  fig, ax = plt.subplots(figsize=(8, 3.5))
  ax.plot(np.arange(len(values)), values, marker=".", lw=1)
  if window:
    for b in range(window, len(values), window):
      ax.axvline(b - 0.5, color="0.7", ls="--", lw=0.8)
  ax.set_xlabel("frame")
  ax.set_ylabel("PSNR (dB)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)


# ------------------------------------------------------------------ the --input job


def _stem(path) -> str:
  return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def output_paths(source, output_dir, *, tokens: bool = False, concat_input: bool = True,
                 save: bool = False) -> list:
  """The files `run_video` (`tokens=False`) or `run_tokens` (`tokens=True`) writes for `source`
  in `output_dir`, in the order of their summaries' `written`."""
  stem = _stem(source)
  if tokens:
    stem = stem[:-len("_tokens")] if stem.endswith("_tokens") and stem != "_tokens" else stem
    return [os.path.join(output_dir, f"{stem}_decoded.mp4")]
  names = ["recon.mp4"] + (["side_by_side.mp4"] if concat_input else []) + [
      "psnr.png", "psnr.json"] + (["tokens.npz"] if save else [])
  return [os.path.join(output_dir, f"{stem}_{n}") for n in names]


@dataclasses.dataclass
class _Pass:
  """What one reconstruction pass over the video gave: per-frame PSNR, tokens, counts."""
  values: np.ndarray
  tokens: np.ndarray
  info: dict
  num_windows: int
  num_input: int
  num_output: int
  num_frames: int


def run_video(model, params, input_path, output_dir, *, variant: str, size=(256, 256),
              sample_fps: float = 30.0, num_frames: Optional[int] = None,
              concat_input: bool = True, save: bool = False, seed: int = SEED,
              batch_size: int = 1, progress: bool = True, long: Optional[dict] = None,
              force: bool = False) -> dict:
  """The whole `--input` path: read, reconstruct, write videos, PSNR plot/JSON and tokens.

  Existing outputs (`output_paths`) are refused (`OutputExistsError`) before any work unless
  `force`; each file is written under a temporary name and renamed when complete.

  Windows (`long` None) are decoded, resized, reconstructed and written batch by batch, so host
  memory holds a few batches whatever the video's length. `long`: a dict of `reconstruct_long`
  options (possibly empty) to stream the whole video instead (all its frames come back; the
  streamer takes the sampled clip whole, at `size`). Returns a summary dict (paths written,
  window counts, mean PSNR).
  """
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  num_frames = num_frames or default_num_frames(model.config)
  refuse_existing(output_paths(input_path, output_dir, concat_input=concat_input, save=save),
                  force)
  _check_run(model.config, num_frames, h, w, sample_fps, long)
  stem = _stem(input_path)
  out = {k: os.path.join(output_dir, f"{stem}_{k}")
         for k in ("recon.mp4", "side_by_side.mp4", "psnr.png", "psnr.json", "tokens.npz")}
  if long is not None:  # the whole video, streamed through the model
    done = _run_long(model, params, input_path, output_dir, out, (h, w), sample_fps,
                     concat_input, progress, long)
  else:
    done = _run_windows(model, params, input_path, out, (h, w), sample_fps, num_frames,
                        concat_input, seed, batch_size, progress)
  summary = _summary(model.config, done, variant, (h, w), sample_fps, seed, long)
  plot_psnr(out["psnr.png"], done.values, f"{stem}: {variant}, {h}x{w}, {done.num_windows} x "
            f"{done.num_frames} frames — mean PSNR {summary['mean']:.2f} dB",
            window=done.num_frames)
  write_text(out["psnr.json"], json.dumps(summary, indent=1))
  if save:
    _save_run_tokens(out["tokens.npz"], done, variant, sample_fps, (h, w), long)
  written = [out["recon.mp4"]] + ([out["side_by_side.mp4"]] if concat_input else []) + [
      out["psnr.png"], out["psnr.json"]] + ([out["tokens.npz"]] if save else [])
  return dict(summary, written=written)


def _check_run(model_config, num_frames: int, h: int, w: int, sample_fps: float, long):
  """`run_video`'s argument checks, before any work (ValueError)."""
  if long is None:
    check_window(model_config, num_frames, h, w)
  else:
    check_window(model_config, 1 + model_config.time_downsample_factor if model_config.causal
                 else model_config.time_downsample_factor, h, w)
  if sample_fps <= 0:
    raise ValueError(f"sample_fps must be > 0, got {sample_fps}")


def _run_long(model, params, input_path, output_dir, out, size, sample_fps, concat_input,
              progress, long) -> _Pass:
  """The whole sampled video streamed through the model (`reconstruct_long`), then written."""
  frames01, info = load_video(input_path, size, sample_fps)
  recon, tokens = reconstruct_long(model.config, params, frames01, progress=progress, **long)
  os.makedirs(output_dir, exist_ok=True)
  recon_u8 = to_uint8(recon)
  write_video(out["recon.mp4"], recon_u8, sample_fps)
  if concat_input:
    write_video(out["side_by_side.mp4"], side_by_side(to_uint8(frames01), recon_u8), sample_fps)
  values = psnr_per_frame(frames01, recon)
  return _Pass(values, tokens, info, num_windows=1, num_input=len(frames01),
               num_output=len(recon), num_frames=len(frames01))


def _run_windows(model, params, input_path, out, size, sample_fps, num_frames, concat_input,
                 seed, batch_size, progress) -> _Pass:
  """Windows decoded, reconstructed and written batch by batch (`_reconstruct_writing`);
  ValueError when not one window fits."""
  with FrameStream(input_path, sample_fps=sample_fps) as stream, decode_errors():
    warn_lossy_crop(stream.path, stream.info.height, stream.info.width, size)
    windows = frames_lib.Windows(frames_lib.resized(stream, size), num_frames, pad_last=False)
    stated = stream.stated_frames // stream.interval // num_frames
    values, tokens = _reconstruct_writing(model, params, (x for x, _ in windows), seed,
                                          batch_size, progress, out, concat_input, sample_fps,
                                          total=stated or None)
  done = _Pass(values, tokens, stream_info(stream), num_windows=len(tokens),
               num_input=windows.frames, num_output=len(tokens) * num_frames,
               num_frames=num_frames)
  info, sampled = done.info, done.num_input
  what = (f"{info['path']} (at sample_fps {sample_fps:g}: every {info['frame_interval']} of "
          f"{info['num_source_frames']} frames)")
  if not done.num_windows:  # nothing was written
    hint = "a shorter --num_frames" + (" or a higher --sample_fps"
                                       if info["frame_interval"] > 1 else "")
    raise ValueError(f"{what} has {sampled} sampled frame(s); one window needs "
                     f"{num_frames} ({hint})")
  if sampled > done.num_output:
    log.info("%s: dropping the last %d of %d frames (incomplete window, as official)", what,
             sampled - done.num_output, sampled)
  return done


def _summary(model_config, done: _Pass, variant, size, sample_fps, seed, long) -> dict:
  """The `psnr.json` summary of a `run_video` pass."""
  info, (h, w) = done.info, size
  fsq = model_config.regularizer == "fsq"
  latent = "FSQ codes" if fsq else (
      "KL posterior mode" if long is not None else
      f"sampled KL latent (seed {seed}, fold_in per window)")
  summary = dict(input=info["path"], variant=variant, size=[h, w], sample_fps=sample_fps,
                 frame_interval=info["frame_interval"], source_fps=info["fps"],
                 num_source_frames=info["num_source_frames"], num_input_frames=done.num_input,
                 stream=info["stream"], video_streams=info["video_streams"],
                 num_frames=done.num_frames, num_windows=done.num_windows,
                 num_output_frames=done.num_output,
                 dropped_frames=done.num_input - done.num_output, latent=latent, seed=seed,
                 psnr_definition="-10 log10(mse + 1e-8) per frame, [0,1], clamped float recon",
                 mean=float(np.mean(done.values)), psnr=[float(v) for v in done.values])
  if long is not None:
    summary.update(streaming=dict(_LONG_DEFAULTS, **{k: v for k, v in long.items()
                                                      if k != "mesh"}))
  return summary


def _save_run_tokens(path, done: _Pass, variant, sample_fps, size, long):
  """`--save_tokens`: the pass's tokens (long mode: with its streaming options)."""
  extra = {} if long is None else dict(long_video=np.int32(1), t_chunk_enc=np.int32(
      long.get("t_chunk_enc", 16)), use_overlap=np.int32(long.get("use_overlap", True)))
  save_tokens(path, done.tokens, variant=variant, fps=sample_fps, size=size,
              num_frames=done.num_frames, num_input_frames=done.num_input,
              source=done.info["path"], **extra)


def _reconstruct_writing(model, params, windows, seed, batch_size, progress, out, concat_input,
                         fps, total=None):
  """Windows `(T, H, W, 3)` in [0, 1] (any iterable: a stream, or an array's rows) through the
  official forward, `batch_size` per call, each batch's frames H.264-encoded into the output
  videos on a writer thread while the device reconstructs the next batches (the encoder
  releases the GIL). At most two batches wait for the writer, so memory does not grow with the
  video. The files (and their folder) are created with the first batch. Returns (per-frame PSNR
  float64 (K * T,), tokens (K, ...)), both empty when there is no window."""
  bar = _progress(total, "reconstruct", progress)
  values, tokens = [], []
  with contextlib.ExitStack() as stack:
    writes, write = collections.deque(), None
    batches = _reconstruct_batches(model, params, _batched(windows, batch_size), seed,
                                   batch_size)
    for lo, hi, x, r, t in batches:
      if write is None:  # writers first: leaving the stack joins the pool before they close
        write = _open_writers(stack, out, x.shape[2:4], fps, concat_input)
      values.append(psnr_per_frame(_flat(x), _flat(r)))
      tokens.append(t)
      while writes and (writes[0].done() or len(writes) >= 2):  # errors surface early
        writes.popleft().result()
      writes.append(write(x, r))
      if bar is not None:
        bar.update(hi - lo)
    while writes:
      writes.popleft().result()  # in order; an encoder error raises here: files discarded
  if bar is not None:
    bar.close()
  if not tokens:
    return np.zeros((0,)), np.zeros((0,))
  return np.concatenate(values), np.concatenate(tokens)


def _flat(v):
  """Windows `(K, T, ...)` -> frames `(K * T, ...)`."""
  return v.reshape((-1,) + v.shape[2:])


def _open_writers(stack, out, hw, fps, concat_input):
  """Opens the output videos (and one writer thread) in `stack`; returns `write(x, r)`, which
  submits a batch of windows and their reconstructions to the thread (a Future)."""
  h, w = hw
  os.makedirs(os.path.dirname(out["recon.mp4"]) or ".", exist_ok=True)
  recon_w = stack.enter_context(VideoWriter(out["recon.mp4"], h, w, fps))
  side_w = (stack.enter_context(VideoWriter(out["side_by_side.mp4"], h, 2 * w, fps))
            if concat_input else None)
  pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))

  def job(x, r):
    r = to_uint8(_flat(r))
    recon_w.write(r)
    if side_w is not None:
      side_w.write(side_by_side(to_uint8(_flat(x)), r))

  return lambda x, r: pool.submit(job, x, r)


# ------------------------------------------------------------------ the --tokens job


def run_tokens(model, params, tokens_path, output_dir, *, variant: str, batch_size: int = 1,
               progress: bool = True, force: bool = False) -> dict:
  """The `--tokens` path: decode a tokens file to `<stem>_decoded.mp4` at its stored fps
  (refused before any work if that file exists, unless `force`)."""
  (path,) = output_paths(tokens_path, output_dir, tokens=True)
  refuse_existing([path], force)
  tok = load_tokens(tokens_path, variant=variant, model_config=model.config)
  if tok.get("long_video"):
    video = decode_long_tokens(model.config, params, tok, progress=progress)
  else:
    video = decode_tokens(model, params, tok, batch_size=batch_size, progress=progress)
  write_video(path, to_uint8(video), tok["fps"])
  key = "indices" if "indices" in tok else "latents"
  return dict(tokens=os.fspath(tokens_path), variant=variant, num_windows=len(tok[key]),
              num_frames=tok["num_frames"], num_output_frames=len(video), size=list(tok["size"]),
              fps=tok["fps"], written=[path])


__all__ = ["FORMAT", "check_window", "decode_long_tokens", "decode_tokens", "default_num_frames", "load_tokens",
           "load_video", "lossy_crop", "output_paths", "plot_psnr", "psnr_per_frame", "reconstruct_long", "reconstruct_video", "reconstruct_windows",
           "run_tokens", "run_video", "save_tokens", "side_by_side", "split_windows", "to_uint8",
           "write_video"]
