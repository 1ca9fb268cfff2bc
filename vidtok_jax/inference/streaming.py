"""Whole videos of any length and size through a VidTok model, in bounded memory.

    codec = Streamer(config, params)                  # t_chunk_enc=16, use_overlap=True
    z, aux = codec.encode(video)                      # (B, T, H, W, 3) in [-1, 1], host numpy
    recon = codec.decode(z, num_frames=video.shape[1])
    recon = codec.reconstruct(video)                  # same frame count as `video`

Causal models stream: frame 0 alone, then chunks of `t_chunk_enc` frames through one jitted
chunk step that carries the per-module caches (`VidTok.encode_chunk` / `decode_chunk`); the
decoder runs latent 0 alone, then chunks of `t_chunk_enc // f` latents, each (with
`use_overlap`) with one look-ahead latent. This is the official v1.1 tiled inference,
so the results equal `model.apply(..., t_chunk_enc=...)`; only one chunk is on the device at a
time, so device memory does not grow with the video's length, and a video of any length
compiles at most three programs per direction (first, steady and last chunk).

Exact or not: v1.0 models stream exactly (equal to whole-clip processing); v1.1
encoding is exact for 1 + t_chunk_enc*k frames; v1.1 decoding is exact for nearest temporal
upsampling and for 2x models with overlap, and differs slightly (~1e-3) for 4x/8x trilinear models
with overlap, as the official tiling does. Non-causal models cannot stream: they run in
independent windows of `window` frames (a multiple of 4).

Frame-count rule (`reconstruct`, any T >= 1): the video is padded at the END with copies of its
last frame to the nearest length the model round-trips (v1.0 causal: 1 + f*k; non-causal: a
multiple of the window), reconstructed, and the padding trimmed; v1.1 pads inside the encoder (in
front of the short chunk) and keeps the last T frames, as the official forward does. The output
always has exactly T frames.

Large frames: `tile=(th, tw)` encodes and decodes overlapping spatial tiles (each streamed over
time on its own) and blends them with linear ramps over `tile_overlap` pixels (FSQ latents are
not blended but taken from the tile whose centre is nearest, so tokens stay valid). Tiles all
have one shape; `tile_batch` of them run in one call (a vmapped program, each tile with its own
sampling key, the one it has alone: equal up to float32 rounding), so memory grows with
`tile_batch`. `mesh`
shards each chunk's height over the mesh's devices instead (XLA exchanges the conv halos), which
is exact.

The device never waits on the host: chunk k+1 is dispatched before chunk k is read back
(double-buffered; its caches stay on the device), inputs go up with one explicit `device_put`
per chunk and results come back with one `device_get`, and sampling keys are derived on the
device, so a whole video runs under `jax.transfer_guard("disallow")`.
"""

import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.config import ModelSpec
from vidtok_jax.models.autoencoder import VidTok
from vidtok_jax.models.tiling import chunk_bounds
from vidtok_jax.sharding import height_sharding

log = logging.getLogger("vidtok_jax.inference.streaming")


def valid_length(spec: ModelSpec, t: int, window: int = 16) -> int:
  """The frame count `reconstruct` pads a `t`-frame video to (see the module docstring)."""
  f = spec.time_downsample_factor
  if not spec.causal:
    return -(-max(t, 1) // window) * window
  if spec.version == "v1.0":
    return 1 + f * (-(-(t - 1) // f))
  return t


def pad_frames(video, t_target: int):
  """Appends copies of the last frame (axis 1) up to `t_target` frames."""
  t = video.shape[1]
  if t_target <= t:
    return video
  return np.concatenate([video, np.repeat(video[:, -1:], t_target - t, axis=1)], axis=1)


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
  """Starts of tiles of `tile` covering `[0, n)`, neighbours sharing at least `overlap`."""
  if tile >= n:
    return [0]
  stride = tile - overlap
  count = -(-(n - overlap) // stride)
  return sorted({min(i * stride, n - tile) for i in range(count)})


def blend_weights(n: int, starts: Sequence[int], tile: int, ramp: int, hard: bool = False):
  """Per-tile 1-D weights over `[0, n)` summing to 1: linear ramps across each overlap (or, with
  `hard`, each position wholly to the tile whose centre is nearest)."""
  starts = np.asarray(starts)
  pos = np.arange(n)[None]
  inside = (pos >= starts[:, None]) & (pos < starts[:, None] + tile)
  if hard:
    dist = np.where(inside, np.abs(pos + 0.5 - (starts[:, None] + tile / 2)), np.inf)
    return (np.argmin(dist, axis=0)[None] == np.arange(len(starts))[:, None]).astype(np.float64)
  r = max(ramp, 1)
  up = np.where(starts[:, None] > 0, np.clip((pos - starts[:, None] + 0.5) / r, 0, 1), 1.0)
  down = np.where(starts[:, None] + tile < n,
                  np.clip((starts[:, None] + tile - pos - 0.5) / r, 0, 1), 1.0)
  w = np.where(inside, np.minimum(up, down), 0.0)
  return w / w.sum(0, keepdims=True)


class _RealFrames:
  """A progress bar fed frame counts of padded passes (`padded` frames each, the first `real`
  of them the video's own) that shows only the real ones. `update(frames, tiles)`: `frames`
  more frames of each of `tiles` tiles run side by side (one pass of a group of tiles)."""

  def __init__(self, bar, real: int, padded: int):
    self.bar, self.real, self.padded, self.pos = bar, real, padded, 0

  def update(self, frames: int, tiles: int = 1):
    done = 0
    while frames > 0:  # across the end of a pass: the rest belongs to the next one
      step = min(frames, self.padded - self.pos)
      done += tiles * (min(self.pos + step, self.real) - min(self.pos, self.real))
      self.pos, frames = (self.pos + step) % self.padded, frames - step
    self.bar.update(done)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.bar.close()


class Streamer:
  """Encode / decode / reconstruct host videos of any length chunk by chunk (see module doc).

  Args:
    config: a model ConfigDict (`vidtok_jax.load_config`) or `ModelSpec`.
    params: the VidTok params.
    t_chunk_enc: frames per encoder chunk (a multiple of f; official 16); decoder chunks are
      `t_chunk_enc // f` latents.
    use_overlap: feed each decoder chunk one look-ahead latent (official long-video recipe).
    window: frames per independent window of a non-causal model (a multiple of 4).
    tile: `(th, tw)` pixel tile for spatial tiling (multiples of the spatial factor), None: off.
    tile_overlap: pixels shared by neighbouring tiles (a multiple of the spatial factor).
    tile_batch: tiles per call (memory grows with it; results do not change).
    mesh: a `jax.sharding.Mesh` with one axis: shards each chunk's height over its devices.
    sample: KL models sample the latent as the official forward does (causal models per
      chunk, non-causal ones per window; each spatial tile draws its own noise, its key
      `fold_in(fold_in(key(seed), chunk), tile)` with `tile` its row-major grid position);
      default the posterior mode.
  """

  def __init__(self, config, params, *, t_chunk_enc: int = 16, use_overlap: bool = True,
               window: int = 16, tile: Optional[Sequence[int]] = None, tile_overlap: int = 64,
               tile_batch: int = 1, mesh=None, sample: bool = False, seed: int = 42):
    self.model = VidTok(config)
    spec = self.spec = self.model.config
    f, sf = spec.time_downsample_factor, spec.spatial_factor
    if spec.causal and (t_chunk_enc < f or t_chunk_enc % f):
      raise ValueError(f"t_chunk_enc must be a positive multiple of the time factor {f}, got "
                       f"{t_chunk_enc}")
    if not spec.causal and (window < f or window % f):
      raise ValueError(f"window must be a positive multiple of {f} for {spec.name}, got {window}")
    if tile is not None:
      tile = tuple(int(v) for v in tile)
      if len(tile) != 2 or any(v < sf or v % sf for v in tile):
        raise ValueError(f"tile must be (height, width), positive multiples of the spatial factor "
                         f"{sf}, got {tile}")
      if tile_overlap < 0 or tile_overlap % sf or tile_overlap >= min(tile):
        raise ValueError(f"tile_overlap must be a multiple of {sf} smaller than the tile, got "
                         f"{tile_overlap}")
    if tile_batch < 1:
      raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
    self.tile_batch = int(tile_batch)
    self.t_chunk_enc, self.t_chunk_dec = t_chunk_enc, max(t_chunk_enc // f, 1)
    self.use_overlap, self.window = use_overlap, window
    self.tile, self.tile_overlap = tile, tile_overlap
    self.sample = bool(sample) and spec.regularizer == "kl"
    self.seed = seed
    self.mesh = mesh
    if mesh is not None:
      if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must have one axis (height is sharded over it), got "
                         f"{mesh.axis_names}")
      params = jax.device_put(params, jax.sharding.NamedSharding(mesh,
                                                                 jax.sharding.PartitionSpec()))
    else:  # placed once: host (numpy) weights would otherwise be uploaded on every call
      params = jax.device_put(params)
    self.variables = {"params": params}
    model, sample = self.model, self.sample

    def enc(v, x, st, seed_k):
      return model.apply(v, x, st, sample, 0, False, rngs={"sample": _key(seed_k)},
                         method=VidTok.encode_chunk)

    def dec(v, z, st, ov, idx):
      return _clip(model.apply(v, z, st, ov, idx, method=VidTok.decode_chunk))

    def enc_window(v, x, seed_k):
      return model.apply(v, x, sample, compute_aux=False, rngs={"sample": _key(seed_k)},
                         method=VidTok.encode)

    def dec_window(v, z, idx):
      return jnp.clip(model.apply(
          v, z, method=VidTok.decode_indices if idx else VidTok.decode), -1.0, 1.0)

    # One program per chunk kind; a leading tile axis (vmapped) when tiles run together.
    # State is donated: a chunk's caches are dead once the next chunk's are computed.
    # Each tile has its own sampling key (`_seeds`): the vmapped seeds have a tile axis too.
    self._enc = {n: jax.jit(jax.vmap(enc, (None, 0, 0, 0)) if n else enc,
                            donate_argnums=(2,)) for n in (False, True)}
    self._dec = {n: jax.jit(jax.vmap(dec, (None, 0, 0, None, None)) if n else dec,
                            static_argnums=(3, 4), donate_argnums=(2,)) for n in (False, True)}
    self._enc_window = {n: jax.jit(jax.vmap(enc_window, (None, 0, 0)) if n else enc_window)
                        for n in (False, True)}
    self._dec_window = {n: jax.jit(jax.vmap(dec_window, (None, 0, None)) if n else dec_window,
                                   static_argnums=(2,)) for n in (False, True)}

  # -- device placement ---------------------------------------------------------------------

  def _put(self, x):
    """One explicit upload of a chunk `(B, T, h, w, C)` (or `(tiles, B, ...)`)."""
    if self.mesh is None:
      return jax.device_put(x)
    axis = self.mesh.axis_names[0]
    hax = x.ndim - 3  # height
    # Heights the mesh does not divide (small latents) are replicated instead of sharded.
    split = x.shape[hax] % self.mesh.shape[axis] == 0
    spec = jax.sharding.PartitionSpec(*([None] * hax), axis if split else None)
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

  # -- spatial tiles of one shape, `(n, B, T, h, w, C)`, n tiles per call ----------------------
  # Each loop dispatches chunk k+1 before it reads chunk k back (`_pipelined`).

  def _seeds(self, k: int, tiles):
    """The uint32 words of the sampling key of chunk (or window) `k`: `(seed, k)` for a whole
    frame; `(seed, k, tile)` per tile of `tiles` (grid positions), a row each when several run
    together, so neighbouring tiles never draw the same noise and a tile's draw does not depend
    on `tile_batch`. Built on the host, the key made on the device (one explicit upload)."""
    if tiles is None:
      return jax.device_put(np.array([self.seed, k], np.uint32))
    rows = np.array([[self.seed, k, t] for t in tiles], np.uint32)
    return jax.device_put(rows if len(tiles) > 1 else rows[0])

  def _encode_stream(self, x, bar, tiles=None):
    """Causal: `(z, indices or None)` of host tiles `x` (n, B, T, h, w, 3), chunk by chunk;
    `tiles`: their grid positions (None: `x` is the whole frame)."""
    n = x.shape[0]
    run, state = self._enc[n > 1], None

    def calls():
      nonlocal state
      for k, (s, e) in enumerate(chunk_bounds(x.shape[2], self.t_chunk_enc)):
        chunk = x[:, :, s:e] if n > 1 else x[0, :, s:e]
        z, aux, state = run(self.variables, self._put(chunk), state, self._seeds(k, tiles))
        yield (z, aux.get("indices")), e - s

    return _collect_latents(calls(), n, bar)

  def _decode_stream(self, z, indices, bar):
    """Causal: decoded tiles in [-1, 1] of latents (or FSQ indices) `z` (n, B, t, h, w[, C]),
    chunk by chunk."""
    src = z if indices is None else indices
    n, t, c, f = src.shape[0], src.shape[2], self.t_chunk_dec, self.spec.time_downsample_factor
    sf = self.spec.spatial_factor
    run, state = self._dec[n > 1], None
    # Written in place: a list of chunks plus their concatenation would hold the video twice.
    out = np.empty((n, src.shape[1], f * t, src.shape[3] * sf, src.shape[4] * sf,
                    self.spec.out_ch), np.float32)

    def calls():
      nonlocal state
      for s, e in chunk_bounds(t, c):
        overlap = self.use_overlap and e + 1 <= t
        zc = src[:, :, s: e + 1 if overlap else e]
        y, state = run(self.variables, self._put(zc if n > 1 else zc[0]), state, overlap,
                       indices is not None)
        yield y, (e - s) * f

    pos = 0
    for y, frames in _pipelined(calls()):
      y = y if n > 1 else y[None]
      out[:, :, pos: pos + y.shape[2]] = y
      pos += y.shape[2]
      bar.update(frames, n)
    return out[:, :, :pos]

  def _encode_windows(self, x, bar, tiles=None):
    n = x.shape[0]
    run = self._enc_window[n > 1]

    def calls():
      for k, s in enumerate(range(0, x.shape[2], self.window)):
        xc = x[:, :, s: s + self.window]
        z, aux = run(self.variables, self._put(xc if n > 1 else xc[0]), self._seeds(k, tiles))
        yield (z, aux.get("indices")), min(self.window, x.shape[2] - s)

    return _collect_latents(calls(), n, bar)

  def _decode_windows(self, z, indices, bar):
    src = z if indices is None else indices
    n, per = src.shape[0], self.window // self.spec.time_downsample_factor
    run = self._dec_window[n > 1]

    def calls():
      for s in range(0, src.shape[2], per):
        zc = src[:, :, s: s + per]
        yield run(self.variables, self._put(zc if n > 1 else zc[0]), indices is not None), None

    outs = []
    for y, _ in _pipelined(calls()):
      y = y if n > 1 else y[None]
      outs.append(y)
      bar.update(y.shape[2], n)
    return np.concatenate(outs, 2)

  def _tile_groups(self, tiles):
    return [tiles[i:i + self.tile_batch] for i in range(0, len(tiles), self.tile_batch)]

  # -- public API -----------------------------------------------------------------------------

  def _check(self, video):
    video = np.asarray(video)
    if video.ndim == 4:
      video = video[None]
    s = self.spec
    if video.ndim != 5 or video.shape[-1] != s.in_channels:
      raise ValueError(f"expected a video (B, T, H, W, {s.in_channels}) or (T, H, W, "
                       f"{s.in_channels}) in [-1, 1], got shape {video.shape}")
    if video.shape[2] % s.spatial_factor or video.shape[3] % s.spatial_factor:
      raise ValueError(f"H and W must be divisible by the spatial factor {s.spatial_factor}, got "
                       f"{video.shape[2]}x{video.shape[3]}")
    if min(video.shape[:2]) < 1:
      raise ValueError(f"empty video batch of shape {video.shape}")
    if not np.issubdtype(video.dtype, np.floating):
      raise ValueError(f"expected float pixels in [-1, 1], got dtype {video.dtype}")
    return video.astype(np.float32, copy=False)  # no copy of a float32 video

  def _bar(self, real, padded, passes, desc, progress):
    """A frame progress bar over `passes` passes (tiles) of `padded` frames each, of which the
    first `real` are the video's own: it counts those, not the padding."""
    from tqdm import tqdm

    return _RealFrames(tqdm(total=real * passes, desc=desc, unit="frame", disable=not progress,
                            leave=False), real, padded)

  def _spatial(self, n_h, n_w, unit):
    """Tile starts per axis, in units of `unit` pixels (1: pixels, s: latents)."""
    if self.tile is None:
      return [0], [0], n_h, n_w, 0
    th, tw = self.tile[0] // unit, self.tile[1] // unit
    o = self.tile_overlap // unit
    return (_tile_starts(n_h, th, o), _tile_starts(n_w, tw, o), min(th, n_h),
            min(tw, n_w), o)

  def encode(self, video, progress: bool = False):
    """`(z (B, T', h, w, C) float32, aux)` of a host video `(B, T, H, W, 3)` in [-1, 1]; FSQ aux
    has `indices`. Causal models stream; non-causal ones run window by window (T padded at the
    end to a multiple of `window`)."""
    video = self._check(video)
    real = video.shape[1]
    if not self.spec.causal:
      video = pad_frames(video, valid_length(self.spec, video.shape[1], self.window))
    elif self.spec.version == "v1.0":
      video = pad_frames(video, valid_length(self.spec, video.shape[1]))
    run = self._encode_stream if self.spec.causal else self._encode_windows
    sf = self.spec.spatial_factor
    hs, ws, th, tw, o = self._spatial(video.shape[2], video.shape[3], 1)
    fsq = self.spec.regularizer == "fsq"
    with self._bar(real, video.shape[1], len(hs) * len(ws), "encode", progress) as bar:
      if len(hs) * len(ws) == 1:
        z, idx = run(video[None], bar)
        z, idx = z[0], (None if idx is None else idx[0])
      else:
        wh = blend_weights(video.shape[2] // sf, [h // sf for h in hs], th // sf, o // sf, fsq)
        ww = blend_weights(video.shape[3] // sf, [w // sf for w in ws], tw // sf, o // sf, fsq)
        z = idx = None
        tiles = [(i, j, h0, w0) for i, h0 in enumerate(hs) for j, w0 in enumerate(ws)]
        for group in self._tile_groups(tiles):
          zg, ig = run(np.stack([video[:, :, h0:h0 + th, w0:w0 + tw]
                                 for _, _, h0, w0 in group]), bar,
                       [i * len(ws) + j for i, j, _, _ in group])
          for g, (i, j, h0, w0) in enumerate(group):
            zt, it = zg[g], (None if ig is None else ig[g])
            if z is None:
              z = np.zeros(zt.shape[:2] + (video.shape[2] // sf, video.shape[3] // sf,
                                           zt.shape[-1]), np.float64)
              idx = None if it is None else np.zeros(z.shape[:4], np.int64)
            hl = slice(h0 // sf, h0 // sf + zt.shape[2])
            wl = slice(w0 // sf, w0 // sf + zt.shape[3])
            wt = wh[i, hl][:, None] * ww[j, wl][None, :]
            z[:, :, hl, wl] += zt * wt[None, None, :, :, None]
            if it is not None:
              idx[:, :, hl, wl] += it * (wt > 0.5)[None, None].astype(np.int64)
        z = z.astype(np.float32)
        idx = None if idx is None else idx.astype(np.int32)
    return z, ({"indices": idx} if idx is not None else {})

  def decode(self, z, num_frames: Optional[int] = None, indices: bool = False,
             progress: bool = False):
    """Frames `(B, T_out, H, W, 3)` float32 in [-1, 1] (clamped) of latents `z`, or of FSQ token
    indices `(B, T', h, w)` with `indices=True`. `num_frames`: keep that many (v1.1 and the
    padding rule: the last ones for v1.1, the first ones otherwise)."""
    z = np.asarray(z)
    if indices:
      if self.spec.regularizer != "fsq":
        raise ValueError("indices=True needs an FSQ model")
      if z.ndim != 4:
        raise ValueError(f"expected token indices (B, T', h, w), got shape {z.shape}")
    elif z.ndim != 5 or z.shape[-1] != self.spec.z_channels:
      raise ValueError(f"expected latents (B, T', h, w, {self.spec.z_channels}), got shape "
                       f"{z.shape}")
    run = self._decode_stream if self.spec.causal else self._decode_windows
    lat, idx = (None, z) if indices else (z, None)
    sf, f = self.spec.spatial_factor, self.spec.time_downsample_factor
    hs, ws, th, tw, o = self._spatial(z.shape[2], z.shape[3], sf)
    padded = z.shape[1] * f  # frames counted per tile by the runners
    real = padded if num_frames is None else min(num_frames, padded)
    with self._bar(real, padded, len(hs) * len(ws), "decode", progress) as bar:
      if len(hs) * len(ws) == 1:
        y = run(None if lat is None else lat[None], None if idx is None else idx[None], bar)[0]
      else:
        hp, wp = z.shape[2] * sf, z.shape[3] * sf
        wh = blend_weights(hp, [h * sf for h in hs], th * sf, o * sf)
        ww = blend_weights(wp, [w * sf for w in ws], tw * sf, o * sf)
        y = None
        tiles = [(i, j, h0, w0) for i, h0 in enumerate(hs) for j, w0 in enumerate(ws)]
        for group in self._tile_groups(tiles):
          parts = [(slice(None), slice(None), slice(h0, h0 + th), slice(w0, w0 + tw))
                   for _, _, h0, w0 in group]
          yg = run(None if lat is None else np.stack([lat[p] for p in parts]),
                   None if idx is None else np.stack([idx[p] for p in parts]), bar)
          for g, (i, j, h0, w0) in enumerate(group):
            yt = yg[g]
            if y is None:
              y = np.zeros((yt.shape[0], yt.shape[1], hp, wp, yt.shape[-1]), np.float32)
            hl = slice(h0 * sf, h0 * sf + yt.shape[2])
            wl = slice(w0 * sf, w0 * sf + yt.shape[3])
            wt = (wh[i, hl][:, None] * ww[j, wl][None, :]).astype(np.float32)
            y[:, :, hl, wl] += yt * wt[None, None, :, :, None]
    if num_frames is not None and num_frames < y.shape[1]:
      keep_last = self.spec.causal and self.spec.version == "v1.1"
      y = y[:, y.shape[1] - num_frames:] if keep_last else y[:, :num_frames]
    return y

  def reconstruct(self, video, progress: bool = False):
    """`video` `(B, T, H, W, 3)` in [-1, 1] -> its reconstruction with exactly T frames."""
    video = self._check(video)
    z, aux = self.encode(video, progress=progress)
    return self.decode(z, video.shape[1], progress=progress)


def _collect_latents(calls, n, bar):
  """`(z, indices or None)` of the encode `calls` ((z, indices), frames) of n tiles (a single
  tile's outputs lack the tile axis), concatenated along time; the bar counts real frames."""
  zs, idx = [], []
  for (z, ind), frames in _pipelined(calls):
    zs.append(z if n > 1 else z[None])
    if ind is not None:
      idx.append(ind if n > 1 else ind[None])
    bar.update(frames, n)
  return np.concatenate(zs, 2), (np.concatenate(idx, 2) if idx else None)


def _pipelined(calls):
  """`(host result, tag)` of each `(device result, tag)` that `calls` yields, read back (one
  `jax.device_get`) only after the next call has been dispatched: the device runs chunk k+1
  while the host copies chunk k out."""
  prev = None
  for cur in calls:
    if prev is not None:
      yield jax.device_get(prev[0]), prev[1]
    prev = cur
  if prev is not None:
    yield jax.device_get(prev[0]), prev[1]


def _key(seed_k):
  """The sampling key of `Streamer._seeds`' words: `fold_in(key(seed), chunk)`, then the tile's
  grid position folded in when there is one (a static shape: 2 or 3 words)."""
  key = jax.random.fold_in(jax.random.key(seed_k[0]), seed_k[1])
  return key if seed_k.shape[0] == 2 else jax.random.fold_in(key, seed_k[2])


def _clip(out):
  y, state = out
  return jnp.clip(y, -1.0, 1.0), state


