"""Reconstruct a video with a VidTok model, as the official `inference_reconstruct.py` (SPEC 9.2).

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
"""

import collections
import concurrent.futures
import contextlib
import fractions
import json
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.data import frames as frames_lib
from vidtok_jax.data import sampling
from vidtok_jax.data.decode import FrameStream
from vidtok_jax.metrics.psnr import psnr
from vidtok_jax.models.autoencoder import output_frames
from vidtok_jax.files import atomic_path, refuse_existing, write_text

log = logging.getLogger("vidtok_jax.inference.reconstruct")

FORMAT = "vidtok_jax.inference.reconstruct/1"
SEED = 42
_META_KEYS = ("format", "variant", "fps", "size", "num_frames", "num_input_frames")


# ------------------------------------------------------------------ checks


def default_num_frames(model_config) -> int:
  """The official window: 17 frames for causal models (chunk_size + 1), 16 for non-causal."""
  return 17 if model_config.causal else 16


def _spec(model_config):
  from vidtok_jax.config import ModelSpec

  return model_config if isinstance(model_config, ModelSpec) else ModelSpec.from_config(
      model_config)


def check_window(model_config, num_frames: int, height: int, width: int):
  """ValueError unless windows of `num_frames` at `height x width` round-trip through the model
  (same frame count out as in; sizes divisible by the spatial factor; even for H.264)."""
  s = _spec(model_config)
  f, sf = s.time_downsample_factor, s.spatial_factor
  if height < 1 or width < 1 or height % sf or width % sf:
    raise ValueError(f"--height/--width must be positive multiples of {s.name}'s spatial factor "
                     f"{sf}, got {height}x{width}")
  if num_frames < 1 or (not s.causal and num_frames < f):
    raise ValueError(f"num_frames must be >= {1 if s.causal else f} for {s.name}, got "
                     f"{num_frames}")
  if output_frames(s, num_frames)[1] != num_frames:  # v1.0 causal: 1 + f*k; non-causal: f*k
    rule = f"1 + {f}k (e.g. 17)" if s.causal else f"a multiple of {f} (e.g. 16)"
    raise ValueError(f"{s.name} reconstructs {output_frames(s, num_frames)[1]} frames from a "
                     f"window of {num_frames}; use num_frames = {rule}")


# ------------------------------------------------------------------ video in


def lossy_crop(src_h: int, src_w: int, size) -> Optional[str]:
  """A sentence when resizing the short side to h and centre-cropping to `size` (h, w) keeps
  less than half of a `src_h x src_w` frame, or fills more than half of the output with
  padding; else None."""
  ch, cw = (size, size) if isinstance(size, int) else tuple(size)
  nh, nw = sampling.resized_size(src_h, src_w, ch)
  kept = min(ch, nh) * min(cw, nw)
  if kept < 0.5 * nh * nw:
    return (f"the {ch}x{cw} centre crop keeps {100 * kept / (nh * nw):.0f}% of each "
            f"{src_h}x{src_w} frame")
  if kept < 0.5 * ch * cw:
    return f"{100 * (1 - kept / (ch * cw)):.0f}% of each {ch}x{cw} output frame is zero padding"
  return None


def warn_lossy_crop(what, src_h: int, src_w: int, size):
  """Logs a warning with `lossy_crop`'s sentence, if any."""
  problem = lossy_crop(src_h, src_w, size)
  if problem:
    log.warning("%s: %s (the short side is resized to the height, then centre-cropped; choose "
                "--height/--width closer to the video's aspect)", what, problem)


def load_video(path, size, sample_fps: float = 30.0):
  """`(frames01 float32 (N, h, w, 3) in [0, 1], info)` of the frames sampled from `path`.

  `size`: (h, w) or an int. `info`: dict(path, fps, num_source_frames, frame_interval). Raises
  `VideoDecodeError` (a ValueError whose message starts with the path and says why) for a file
  that cannot be decoded. Decoded as a stream (`decode.FrameStream`): only the sampled frames,
  at `size`, are held.
  """
  if sample_fps <= 0:
    raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
  with FrameStream(path, sample_fps=sample_fps) as stream, _decode_errors():
    warn_lossy_crop(stream.path, stream.info.height, stream.info.width, size)
    frames01 = np.concatenate(list(frames_lib.resized(stream, size)))
  return frames01, _info(stream)


@contextlib.contextmanager
def _decode_errors():
  """A file damaged midway raises its VideoDecodeError, as one found on opening does."""
  try:
    yield
  except frames_lib.SourceError as e:
    raise e.original() from None


def _info(stream) -> dict:
  """`load_video`'s info of a FrameStream read to its end."""
  info = stream.info
  return dict(path=info.path, fps=info.fps, num_source_frames=info.num_frames,
              frame_interval=stream.interval, source_size=[info.height, info.width],
              stream=info.stream, video_streams=info.num_video_streams)


def split_windows(frames, num_frames: int, what: str = "the video", hint: str = "") -> np.ndarray:
  """`(N, ...)` -> `(K, num_frames, ...)`, K = N // num_frames: the incomplete tail is dropped
  (official). ValueError when not even one window fits (`what` and `hint` go in its message)."""
  n = len(frames)
  k = n // num_frames
  if k == 0:
    raise ValueError(f"{what} has {n} sampled frame(s); one window needs {num_frames}"
                     + (f" ({hint})" if hint else ""))
  if n % num_frames:
    log.info("%s: dropping the last %d of %d frames (incomplete window, as official)", what,
             n % num_frames, n)
  frames = np.asarray(frames)[:k * num_frames]
  return frames.reshape((k, num_frames) + frames.shape[1:])


# ------------------------------------------------------------------ model calls

_JIT_CACHE = {}  # (ModelSpec, what) -> jitted function; params are an argument, not a constant


def _clamp01(y):
  return (jnp.clip(y.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0


def _forward_fn(model):
  key = (model.config, "forward")
  if key not in _JIT_CACHE:
    fsq = model.config.regularizer == "fsq"

    def one(params, x01, window, seed):
      # One window at a time under vmap, so each window's KL sample uses its own key and does
      # not depend on the batching.
      rng = jax.random.fold_in(jax.random.key(seed), window)
      _, y, aux = model.apply({"params": params}, (x01 * 2.0 - 1.0)[None], not fsq, 0, False,
                              rngs={"sample": rng})
      return _clamp01(y[0]), (aux["indices"] if fsq else aux["mean"].astype(jnp.float32))[0]

    _JIT_CACHE[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, None)))
  return _JIT_CACHE[key]


def _decode_fn(model, num_frames: int):
  key = (model.config, "decode", num_frames)
  if key not in _JIT_CACHE:
    fsq = model.config.regularizer == "fsq"
    t_out = output_frames(model.config, num_frames)[1]

    def dec(params, tokens):
      method = model.decode_indices if fsq else model.decode
      y = model.apply({"params": params}, tokens, method=method)
      return _clamp01(y[:, y.shape[1] - t_out:])  # v1.1 causal: the forward's last T frames

    _JIT_CACHE[key] = jax.jit(dec)
  return _JIT_CACHE[key]


def _chunks(k: int, batch_size: int):
  for lo in range(0, k, batch_size):
    yield lo, min(lo + batch_size, k)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  """Pad axis 0 to n rows by repeating the last (so every call has the same shape: one jit)."""
  return x if len(x) == n else np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def _progress(total: int, desc: str, enabled: bool):
  try:
    from tqdm import tqdm
  except ImportError:  # progress bars are a nicety, not a dependency
    return None
  return tqdm(total=total, desc=desc, unit="window", disable=not enabled, leave=False)


def _reconstruct_batches(model, params, batches, seed: int, batch_size: int):
  """`(lo, x)` batches of consecutive windows (at most `batch_size`, `lo` the first window's
  number) -> `(lo, hi, x, recon01, tokens)` per batch, through the official forward. Every call
  has `batch_size` rows (the last batch padded) unless the first batch is also the last, which
  runs as it is. Batch k+1 is dispatched before batch k is read back."""
  fn = _forward_fn(model)
  pending = None

  def fetch(pending):
    (lo, x), out = pending
    r, t = jax.device_get(out)
    return lo, lo + len(x), x, r[:len(x)], t[:len(x)]

  batches = iter(batches)
  nxt = next(batches, None)
  while nxt is not None:
    lo, x = nxt
    nxt = next(batches, None)
    rows = len(x) if lo == 0 and nxt is None else batch_size
    ids = _pad_rows(np.arange(lo, lo + len(x), dtype=np.int32), rows)
    cur = (lo, x), fn(params, _pad_rows(x, rows), ids, seed)
    if pending is not None:
      yield fetch(pending)
    pending = cur
  if pending is not None:
    yield fetch(pending)


def _batched(windows, batch_size: int):
  """Windows (an iterable) -> `(lo, stacked float32 windows)` batches of `batch_size`."""
  batch, lo = [], 0
  for w in windows:
    batch.append(w)
    if len(batch) == batch_size:
      yield lo, np.stack(batch).astype(np.float32, copy=False)
      lo, batch = lo + len(batch), []
  if batch:
    yield lo, np.stack(batch).astype(np.float32, copy=False)


def reconstruct_windows(model, params, windows01, seed: int = SEED, batch_size: int = 1,
                        progress: bool = False, on_batch=None):
  """`windows01 (K, T, H, W, 3)` in [0, 1] -> `(recon01 (K, T, H, W, 3) float32 in [0, 1],
  tokens)` through the official forward (KL: sampled latent, window k seeded with
  `fold_in(key(seed), k)`), `batch_size` windows per call (the last call padded).
  tokens: FSQ indices int32 `(K, t, h, w)` or KL posterior means float32 `(K, t, h, w, C)`.

  Batch k+1 is dispatched before batch k is read back, so the device works while the host
  copies (and `on_batch(lo, hi, recon01[lo:hi])`, e.g. a video writer, runs)."""
  windows01 = np.asarray(windows01, np.float32)
  k = len(windows01)
  batch_size = max(1, min(batch_size, k))
  recon, tokens = [], []
  bar = _progress(k, "reconstruct", progress)
  batches = ((lo, windows01[lo:hi]) for lo, hi in _chunks(k, batch_size))
  for lo, hi, _, r, t in _reconstruct_batches(model, params, batches, seed, batch_size):
    recon.append(r)
    tokens.append(t)
    if on_batch is not None:
      on_batch(lo, hi, r)
    if bar is not None:
      bar.update(hi - lo)
  if bar is not None:
    bar.close()
  return np.concatenate(recon), np.concatenate(tokens)


_LONG_DEFAULTS = dict(t_chunk_enc=16, use_overlap=True, tile=None, tile_overlap=64)


def reconstruct_long(model_config, params, frames01, *, progress: bool = False, **options):
  """The whole video `(N, H, W, 3)` in [0, 1] -> `(recon01 (N, H, W, 3), tokens)`, streamed
  chunk by chunk in bounded memory (official `--read_long_video`: v1.1 tiled inference with
  16-frame chunks and overlap), see `vidtok_jax.inference.streaming.Streamer` for `options` (t_chunk_enc,
  use_overlap, tile, tile_overlap, mesh). Every frame comes back (the padding rule of
  `Streamer.reconstruct`). tokens: FSQ indices `(1, T', h, w)` or the KL posterior mode
  `(1, T', h, w, C)` (deterministic: no sampling in long mode)."""
  from vidtok_jax.inference.streaming import Streamer

  options = dict(_LONG_DEFAULTS, **options)
  codec = Streamer(model_config, params, **options)
  x = np.asarray(frames01, np.float32)[None] * 2.0 - 1.0
  z, aux = codec.encode(x, progress=progress)
  tokens = aux.get("indices", z)
  recon = codec.decode(tokens, len(frames01), indices="indices" in aux, progress=progress)
  return (recon[0] + 1.0) / 2.0, tokens


def decode_long_tokens(model_config, params, tok: dict, progress: bool = False, **options):
  """A long-video tokens dict (`load_tokens`, `long_video` set) -> video `(N, H, W, 3)` [0, 1]."""
  from vidtok_jax.inference.streaming import Streamer

  opts = dict(_LONG_DEFAULTS, t_chunk_enc=int(tok.get("t_chunk_enc", 16)),
              use_overlap=bool(tok.get("use_overlap", True)))
  opts.update(options)
  codec = Streamer(model_config, params, **opts)
  fsq = "indices" in tok
  y = codec.decode(tok["indices"] if fsq else tok["latents"], tok["num_input_frames"],
                   indices=fsq, progress=progress)
  return (y[0] + 1.0) / 2.0


def reconstruct_video(model, params, frames01, num_frames: int, seed: int = SEED,
                      batch_size: int = 1, progress: bool = False):
  """Sampled frames `(N, H, W, 3)` in [0, 1] -> `(recon01 (K * num_frames, H, W, 3), tokens)`:
  K = N // num_frames windows (tail dropped), see `reconstruct_windows`."""
  check_window(model.config, num_frames, frames01.shape[1], frames01.shape[2])
  windows = split_windows(frames01, num_frames)
  recon, tokens = reconstruct_windows(model, params, windows, seed, batch_size, progress)
  return recon.reshape((-1,) + recon.shape[2:]), tokens


def decode_tokens(model, params, tokens, num_frames: Optional[int] = None, batch_size: int = 1,
                  progress: bool = False) -> np.ndarray:
  """Tokens of K windows -> video `(K * num_frames, H, W, 3)` float32 in [0, 1] (clamped).

  `tokens`: a dict from `load_tokens` (then `num_frames` defaults to its metadata) or an array
  (FSQ indices `(K, t, h, w)` / KL latents `(K, t, h, w, C)`). Each window is decoded and, as
  the forward does, trimmed to its last `num_frames` frames (only v1.1 causal decodes more).
  """
  if isinstance(tokens, dict):
    num_frames = num_frames or int(tokens["num_frames"])
    tokens = tokens["indices"] if "indices" in tokens else tokens["latents"]
  if num_frames is None:
    raise ValueError("decode_tokens needs num_frames for a bare tokens array")
  s = model.config
  tokens = _check_tokens(s, np.asarray(tokens), num_frames)
  k = len(tokens)
  batch_size = max(1, min(batch_size, k))
  fn = _decode_fn(model, num_frames)
  out = []
  bar = _progress(k, "decode", progress)
  for lo, hi in _chunks(k, batch_size):
    out.append(np.asarray(fn(params, _pad_rows(tokens[lo:hi], batch_size)))[:hi - lo])
    if bar is not None:
      bar.update(hi - lo)
  if bar is not None:
    bar.close()
  video = np.concatenate(out)
  return video.reshape((-1,) + video.shape[2:])


def _check_tokens(spec, tokens: np.ndarray, num_frames: int) -> np.ndarray:
  """Shape / dtype / range checks of a tokens array against the model (ValueError)."""
  t_lat = output_frames(spec, num_frames)[0]
  if spec.regularizer == "fsq":
    if tokens.ndim != 4 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"{spec.name} (FSQ) decodes integer indices (K, t, h, w), got "
                       f"{tokens.dtype} {tokens.shape}")
    n = int(np.prod(spec.levels))
    if tokens.size and (tokens.min() < 0 or tokens.max() >= n):  # checked here: jit cannot
      raise ValueError(f"token indices must be in [0, {n}) for {spec.name}, got values in "
                       f"[{tokens.min()}, {tokens.max()}]")
    tokens = tokens.astype(np.int32)
  else:
    if tokens.ndim != 5 or tokens.shape[-1] != spec.z_channels:
      raise ValueError(f"{spec.name} (KL) decodes latents (K, t, h, w, {spec.z_channels}), got "
                       f"{tokens.dtype} {tokens.shape}")
    tokens = tokens.astype(np.float32)
  if len(tokens) == 0 or tokens.shape[1] != t_lat:
    raise ValueError(f"windows of {num_frames} frames have {t_lat} latent frames in {spec.name}, "
                     f"got tokens of shape {tokens.shape}")
  return tokens


# ------------------------------------------------------------------ tokens files


def save_tokens(path, tokens, *, variant: str, fps: float, size, num_frames: int,
                num_input_frames: int, source: str = "", **extra):
  """Writes a tokens `.npz`: FSQ indices (integer array) under `indices`, KL latents (float)
  under `latents`, and the metadata (plain numpy scalars/strings: no pickle on load)."""
  tokens = np.asarray(tokens)
  key = "indices" if np.issubdtype(tokens.dtype, np.integer) else "latents"
  arrays = {key: tokens.astype(np.int32 if key == "indices" else np.float32),
            "format": np.str_(FORMAT), "variant": np.str_(variant), "fps": np.float64(fps),
            "size": np.asarray(size, np.int32).reshape(2), "num_frames": np.int32(num_frames),
            "num_input_frames": np.int32(num_input_frames), "source": np.str_(source)}
  arrays.update({k: np.asarray(v) for k, v in extra.items()})
  path = os.fspath(path)
  if not path.endswith(".npz"):  # numpy would append it to the temporary name
    path += ".npz"
  with atomic_path(path) as tmp:  # never a half-written file under the final name
    np.savez_compressed(tmp, **arrays)


def load_tokens(path, *, variant: Optional[str] = None, model_config=None) -> dict:
  """A tokens `.npz` -> dict (`indices` or `latents`, and the metadata as Python values).

  With `variant` / `model_config`, checks that the file was made for that variant and that the
  tokens fit the model (kind, latent channels, frame and spatial sizes). ValueError names the
  problem (missing keys, another variant, ...); FileNotFoundError for a missing file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokens file {path} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      d = {k: z[k] for k in z.files}
  except Exception as e:  # a truncated zip, another format, pickled objects ...
    raise ValueError(f"{path} is not a tokens .npz written by save_tokens: {e}") from e
  missing = [k for k in _META_KEYS if k not in d]
  if not ("indices" in d or "latents" in d):
    missing.insert(0, "indices or latents")
  if missing:
    raise ValueError(f"{path} is not a tokens file of vidtok_jax.inference.reconstruct: missing key(s) "
                     f"{', '.join(missing)}")
  if str(d["format"]) != FORMAT:
    raise ValueError(f"{path}: unknown tokens format {str(d['format'])!r} (expected {FORMAT!r})")
  out = {k: v for k, v in d.items() if k in ("indices", "latents")}
  out.update(format=str(d["format"]), variant=str(d["variant"]), fps=float(d["fps"]),
             size=tuple(int(v) for v in d["size"]), num_frames=int(d["num_frames"]),
             num_input_frames=int(d["num_input_frames"]),
             source=str(d["source"]) if "source" in d else "")
  for k, v in d.items():  # extra metadata, as Python values
    if k not in out:
      out[k] = v.item() if v.ndim == 0 else v
  if variant is not None and out["variant"] != variant:
    raise ValueError(f"{path} holds tokens of {out['variant']}, not of {variant} (the --config "
                     "variant); decode it with the model that made it")
  if model_config is not None:
    s = _spec(model_config)
    kind = "indices" if s.regularizer == "fsq" else "latents"
    if kind not in out:
      raise ValueError(f"{path} holds {'latents' if kind == 'indices' else 'indices'}, but "
                       f"{s.name} decodes {kind}")
    h, w = out["size"]
    if out.get("long_video"):  # one streamed video: any latent length
      tokens = out[kind]
      if tokens.ndim != (4 if kind == "indices" else 5) or len(tokens) != 1:
        raise ValueError(f"{path}: long-video tokens must be one video, got shape {tokens.shape}")
    else:
      check_window(s, out["num_frames"], h, w)
      tokens = _check_tokens(s, out[kind], out["num_frames"])
    sf = s.spatial_factor
    if tokens.shape[2:4] != (h // sf, w // sf):
      raise ValueError(f"{path}: tokens of spatial size {tokens.shape[2:4]} do not match the "
                       f"stated frame size {h}x{w} (factor {sf})")
  return out


# ------------------------------------------------------------------ outputs


def to_uint8(frames01) -> np.ndarray:
  """[0, 1] float -> uint8 by `x * 255` truncation (the official `(x + 1) / 2 * 255` cast)."""
  return (np.clip(np.asarray(frames01, np.float32), 0.0, 1.0) * np.float32(255.0)).astype(
      np.uint8)


def side_by_side(left, right) -> np.ndarray:
  """Two `(T, H, W, C)` videos -> `(T, H, 2W, C)` (left | right), as `--concate_input`."""
  left, right = np.asarray(left), np.asarray(right)
  if left.shape != right.shape:
    raise ValueError(f"side_by_side needs equal shapes, got {left.shape} and {right.shape}")
  return np.concatenate([left, right], axis=2)


class VideoWriter:
  """Writes uint8 `(T, H, W, 3)` RGB frames as H.264 (libx264, yuv420p) at `fps`, appended batch
  by batch (`write`), under a temporary name renamed to `path` by `close()` (`abort()` or an
  exception inside `with` deletes it instead: no half file under the final name).

  yuv420p needs even H and W. `crf` 18: visually near-lossless (x264's default is 23).
  """

  def __init__(self, path, height: int, width: int, fps: float, crf: int = 18):
    import av

    if height % 2 or width % 2:
      raise ValueError(f"H.264 yuv420p needs even sizes, got {height}x{width}")
    if not fps > 0:
      raise ValueError(f"fps must be > 0, got {fps}")
    self.shape = (height, width, 3)
    self._rate = fractions.Fraction(fps).limit_denominator(1001)  # 29.97... -> 30000/1001
    self._stack = contextlib.ExitStack()
    tmp = self._stack.enter_context(atomic_path(path))
    self._container = self._stack.enter_context(av.open(tmp, mode="w"))
    self._stream = self._container.add_stream("libx264", rate=self._rate)
    self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
    self._stream.options = {"crf": str(crf)}
    self.frames = 0

  def write(self, frames):
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.shape[1:] != self.shape:
      raise ValueError(f"VideoWriter expects uint8 frames (T, {', '.join(map(str, self.shape))}),"
                       f" got {frames.dtype} {frames.shape}")
    for frame in frames:
      vf = _av_frame(frame)
      vf.pts = self.frames
      vf.time_base = fractions.Fraction(1) / self._rate
      self._container.mux(self._stream.encode(vf))
      self.frames += 1

  def close(self):
    if not self.frames:
      self.abort()
      raise ValueError("VideoWriter: no frames were written")
    self._container.mux(self._stream.encode())  # flush the encoder's delayed frames
    self._stack.close()  # closes the container, then renames it over the final name

  def abort(self):
    self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self._stack.__exit__(exc_type, exc, tb)


def _av_frame(frame):
  import av

  return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")


def write_video(path, frames, fps: float, crf: int = 18):
  """Writes uint8 `(T, H, W, 3)` RGB frames as H.264 (libx264, yuv420p) at `fps` (see
  `VideoWriter`), atomically."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise ValueError(f"write_video expects uint8 frames (T>0, H, W, 3), got {frames.dtype} "
                     f"{frames.shape}")
  with VideoWriter(path, frames.shape[1], frames.shape[2], fps, crf) as w:
    w.write(frames)


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
  if long is None:
    check_window(model.config, num_frames, h, w)
  else:
    check_window(model.config, 1 + model.config.time_downsample_factor if model.config.causal
                 else model.config.time_downsample_factor, h, w)
  if sample_fps <= 0:
    raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
  stem = _stem(input_path)
  out = {k: os.path.join(output_dir, f"{stem}_{k}")
         for k in ("recon.mp4", "side_by_side.mp4", "psnr.png", "psnr.json", "tokens.npz")}
  if long is not None:  # the whole video, streamed through the model
    frames01, info = load_video(input_path, (h, w), sample_fps)
    recon, tokens = reconstruct_long(model.config, params, frames01, progress=progress, **long)
    num_windows, num_input, num_output, num_frames = 1, len(frames01), len(recon), len(frames01)
    os.makedirs(output_dir, exist_ok=True)
    recon_u8 = to_uint8(recon)
    write_video(out["recon.mp4"], recon_u8, sample_fps)
    if concat_input:
      write_video(out["side_by_side.mp4"], side_by_side(to_uint8(frames01), recon_u8), sample_fps)
    values = psnr_per_frame(frames01, recon)
    del frames01, recon, recon_u8
  else:
    with FrameStream(input_path, sample_fps=sample_fps) as stream, _decode_errors():
      warn_lossy_crop(stream.path, stream.info.height, stream.info.width, (h, w))
      windows = frames_lib.Windows(frames_lib.resized(stream, (h, w)), num_frames,
                                   pad_last=False)
      stated = stream.stated_frames // stream.interval // num_frames
      values, tokens = _reconstruct_writing(model, params, (x for x, _ in windows), seed,
                                            batch_size, progress, out, concat_input, sample_fps,
                                            total=stated or None)
    info = _info(stream)
    num_input = windows.frames
    num_windows = len(tokens)
    num_output = num_windows * num_frames
    what = (f"{info['path']} (at sample_fps {sample_fps:g}: every {info['frame_interval']} of "
            f"{info['num_source_frames']} frames)")
    if not num_windows:  # nothing was written
      hint = "a shorter --num_frames" + (" or a higher --sample_fps"
                                         if info["frame_interval"] > 1 else "")
      raise ValueError(f"{what} has {num_input} sampled frame(s); one window needs "
                       f"{num_frames} ({hint})")
    if num_input > num_output:
      log.info("%s: dropping the last %d of %d frames (incomplete window, as official)", what,
               num_input - num_output, num_input)
  mean = float(np.mean(values))
  fsq = model.config.regularizer == "fsq"
  latent = "FSQ codes" if fsq else (
      "KL posterior mode" if long is not None else
      f"sampled KL latent (seed {seed}, fold_in per window)")
  plot_psnr(out["psnr.png"], values, f"{stem}: {variant}, {h}x{w}, {num_windows} x "
            f"{num_frames} frames — mean PSNR {mean:.2f} dB", window=num_frames)
  summary = dict(input=info["path"], variant=variant, size=[h, w], sample_fps=sample_fps,
                 frame_interval=info["frame_interval"], source_fps=info["fps"],
                 num_source_frames=info["num_source_frames"], num_input_frames=num_input,
                 stream=info["stream"], video_streams=info["video_streams"],
                 num_frames=num_frames, num_windows=num_windows, num_output_frames=num_output,
                 dropped_frames=num_input - num_output, latent=latent, seed=seed,
                 psnr_definition="-10 log10(mse + 1e-8) per frame, [0,1], clamped float recon",
                 mean=mean, psnr=[float(v) for v in values])
  if long is not None:
    summary.update(streaming=dict(_LONG_DEFAULTS, **{k: v for k, v in long.items()
                                                      if k != "mesh"}))
  write_text(out["psnr.json"], json.dumps(summary, indent=1))
  if save:
    extra = {} if long is None else dict(long_video=np.int32(1), t_chunk_enc=np.int32(
        long.get("t_chunk_enc", 16)), use_overlap=np.int32(long.get("use_overlap", True)))
    save_tokens(out["tokens.npz"], tokens, variant=variant, fps=sample_fps, size=(h, w),
                num_frames=num_frames, num_input_frames=num_input, source=info["path"],
                **extra)
  written = [out["recon.mp4"]] + ([out["side_by_side.mp4"]] if concat_input else []) + [
      out["psnr.png"], out["psnr.json"]] + ([out["tokens.npz"]] if save else [])
  return dict(summary, written=written)


def _reconstruct_writing(model, params, windows, seed, batch_size, progress, out, concat_input,
                         fps, total=None):
  """Windows `(T, H, W, 3)` in [0, 1] (any iterable: a stream, or an array's rows) through the
  official forward, `batch_size` per call, each batch's frames H.264-encoded into the output
  videos on a writer thread while the device reconstructs the next batches (the encoder
  releases the GIL). At most two batches wait for the writer, so memory does not grow with the
  video. The files (and their folder) are created with the first batch. Returns (per-frame PSNR
  float64 (K * T,), tokens (K, ...)), both empty when there is no window."""
  flat = lambda v: v.reshape((-1,) + v.shape[2:])  # noqa: E731  windows -> frames
  bar = _progress(total, "reconstruct", progress)
  values, tokens = [], []
  with contextlib.ExitStack() as stack:
    writes, pool = collections.deque(), None
    batches = _reconstruct_batches(model, params, _batched(windows, batch_size), seed,
                                   batch_size)
    for lo, hi, x, r, t in batches:
      if pool is None:  # writers first: leaving the stack joins the pool before they close
        h, w = x.shape[2:4]
        os.makedirs(os.path.dirname(out["recon.mp4"]) or ".", exist_ok=True)
        recon_w = stack.enter_context(VideoWriter(out["recon.mp4"], h, w, fps))
        side_w = (stack.enter_context(VideoWriter(out["side_by_side.mp4"], h, 2 * w, fps))
                  if concat_input else None)
        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))

      def job(x=x, r=r):
        r = to_uint8(flat(r))
        recon_w.write(r)
        if side_w is not None:
          side_w.write(side_by_side(to_uint8(flat(x)), r))

      values.append(psnr_per_frame(flat(x), flat(r)))
      tokens.append(t)
      while writes and (writes[0].done() or len(writes) >= 2):  # errors surface early
        writes.popleft().result()
      writes.append(pool.submit(job))
      if bar is not None:
        bar.update(hi - lo)
    while writes:
      writes.popleft().result()  # in order; an encoder error raises here: files discarded
  if bar is not None:
    bar.close()
  if not tokens:
    return np.zeros((0,)), np.zeros((0,))
  return np.concatenate(values), np.concatenate(tokens)


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
