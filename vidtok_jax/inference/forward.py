"""The official forward and decode of a VidTok model, window by window (`inference_reconstruct.py`).

    check_window(model.config, 17, 256, 256)                      # ValueError if it cannot fit
    recon01, tokens = reconstruct_video(model, params, frames01, num_frames=17, seed=42)
    video01 = decode_tokens(model, params, tokens, num_frames=17)
    recon01, tokens = reconstruct_long(model.config, params, frames01)  # streamed, any length

Windows: each through `model(x)`, `clamp(-1, 1)` mapped to [0, 1]; the KL sample of window k is
drawn with `fold_in(key(seed), k)`, so it does not depend on how windows are batched; the tokens
returned are FSQ indices or the KL posterior MODE (deterministic). Calls are jitted once per
(model, what) with params as an argument; every call of a run has the same batch shape.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.inference.video_io import split_windows
from vidtok_jax.models.autoencoder import output_frames

SEED = 42


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


__all__ = ["SEED", "check_window", "decode_long_tokens", "decode_tokens", "default_num_frames",
           "reconstruct_long", "reconstruct_video", "reconstruct_windows"]
