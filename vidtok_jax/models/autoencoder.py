"""`VidTok`: the autoencoding engine (encoder + regularizer + decoder) of every release.

Videos are channels-last `(B, T, H, W, 3)` in [-1, 1]; a `(B, H, W, 3)` image batch is a 1-frame
video (causal models). Frame arithmetic (f = time factor, the official arithmetic):

| family | latents T' | `decode` frames | forward frames |
| v1.0 causal | floor(T_pad / f), T_pad = T + (f-1 if T % f else 0) | f*T' - (f-1) | = decode |
| v1.1 causal | ceil(T / f) | f*T' | the last T of decode |
| non-causal (f=4, T >= 4) | floor(T / 4) | 4*T' | = decode |

So v1.0 reproduces T frames only for T = 1 (mod f) and non-causal only for T = 0 (mod 4); other
counts are accepted (as officially) and a warning says how many frames come back.
"""

import logging
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.config import ModelSpec
from vidtok_jax.models.decoder import Decoder
from vidtok_jax.models.encoder import Encoder
from vidtok_jax.models.regularizers import DiagonalGaussianRegularizer, FSQRegularizer
from vidtok_jax.models.tiling import check_chunk, tiled_decode, tiled_encode

log = logging.getLogger("vidtok_jax")


def output_frames(spec: ModelSpec, t: int) -> tuple[int, int]:
  """`(latent frames, forward output frames)` for an input of `t` frames."""
  f = spec.time_downsample_factor
  if not spec.causal:
    return t // f, f * (t // f)
  if spec.version == "v1.0":
    t_pad = t + (f - 1 if t % f else 0)
    return t_pad // f, f * (t_pad // f) - (f - 1)
  return -(-t // f), t


class VidTok(nn.Module):
  """The VidTok autoencoder. `config`: a model ConfigDict (`load_config`) or a `ModelSpec`.

  Methods (use with `model.apply({"params": p}, ..., method=model.<name>)`):
  `encode(x, sample=False, step=0, compute_aux=True) -> (z, aux)`, `decode(z) -> video`,
  `decode_indices(indices) -> video` (FSQ), and the forward `__call__(x) -> (z, video, aux)`.

  Chunked inference of causal models (the official v1.1 tiling): `encode(...,
  t_chunk_enc=16)`, `decode(..., t_chunk_dec=4, use_overlap=True)` (also `decode_indices` and
  the forward) run the official chunk schedule with the per-module caches carried between
  chunks, the steady chunks under one `lax.scan`. The explicit-state steps behind them are
  `encode_chunk(x, state) -> (z, aux, state)` and `decode_chunk(z, state, use_overlap) ->
  (video, state)` (state None for the first chunk), for streaming a video of any length with one
  compiled step (`vidtok_jax.inference.streaming`).
  """

  config: Any

  def __post_init__(self):
    if not isinstance(self.config, ModelSpec):
      object.__setattr__(self, "config", ModelSpec.from_config(self.config))
    super().__post_init__()

  @property
  def is_causal(self) -> bool:
    return self.config.causal

  @property
  def is_fsq(self) -> bool:
    return self.config.regularizer == "fsq"

  def setup(self):
    s = self.config
    precision = None if s.precision == "default" else s.precision
    kw = dict(dtype=jnp.dtype(s.dtype), param_dtype=jnp.dtype(s.param_dtype), remat=s.remat,
              precision=precision,
              ch=s.ch, ch_mult=s.ch_mult, num_res_blocks=s.num_res_blocks, z_channels=s.z_channels,
              causal=s.causal, version=s.version, time_downsample_factor=s.time_downsample_factor,
              norm_type=s.norm_type)
    self.encoder = Encoder(double_z=s.double_z, init_pad_mode=s.init_pad_mode,
                           spatial_ds=s.spatial_ds, tempo_ds=s.tempo_ds,
                           resamp_with_conv=s.resamp_with_conv, **kw)
    self.decoder = Decoder(out_ch=s.out_ch, spatial_us=s.spatial_us, tempo_us=s.tempo_us,
                           interpolation_mode=s.interpolation_mode,
                           temp_upsample_m=s.temp_upsample_m, **kw)
    if self.is_fsq:
      self.regularization = FSQRegularizer(
          s.levels, s.dim, s.entropy_loss_weight, s.entropy_loss_annealing_steps,
          s.entropy_loss_annealing_factor, s.commitment_loss_weight, s.diversity_gamma,
          param_dtype=jnp.dtype(s.param_dtype))
    else:
      self.regularization = DiagonalGaussianRegularizer()

  # -- input checks (static shapes only, so they run once per trace) --------------------------

  def _check_video(self, x, warn: bool = True):
    s = self.config
    x = jnp.asarray(x)
    if x.ndim == 4 and s.causal:
      x = x[:, None]
    if x.ndim != 5:
      raise ValueError(f"expected a video (B, T, H, W, {s.in_channels})"
                       f"{' or an image batch (B, H, W, C)' if s.causal else ''}, "
                       f"got shape {tuple(x.shape)}")
    b, t, h, w, c = x.shape
    if c != s.in_channels:
      raise ValueError(f"expected {s.in_channels} channels (channels-last), got shape "
                       f"{tuple(x.shape)}")
    if h % s.spatial_factor or w % s.spatial_factor:
      raise ValueError(f"H and W must be divisible by the spatial factor {s.spatial_factor}, "
                       f"got H={h}, W={w}")
    if not s.causal and t < s.time_downsample_factor:
      raise ValueError(f"the non-causal model needs at least {s.time_downsample_factor} frames, "
                       f"got {t}")
    if t < 1 or b < 1:
      raise ValueError(f"empty video batch of shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"expected float pixels in [-1, 1], got dtype {x.dtype}")
    _, t_out = output_frames(s, t)
    if warn and t_out != t:
      log.warning("%s: %d input frames give %d output frames (%s)", s.name, t, t_out,
                  "use 1 + %dk frames" % s.time_downsample_factor if s.causal else
                  "use a multiple of %d frames" % s.time_downsample_factor)
    return x

  def _check_latent(self, z):
    s = self.config
    z = jnp.asarray(z)
    if z.ndim != 5 or z.shape[-1] != s.z_channels:
      raise ValueError(f"expected latents (B, T', H', W', {s.z_channels}), got shape "
                       f"{tuple(z.shape)}")
    if min(z.shape[:4]) < 1:
      raise ValueError(f"empty latent of shape {tuple(z.shape)}")
    return z

  def _check_indices(self, indices):
    if not self.is_fsq:
      raise ValueError("decode_indices needs an FSQ model; this one uses the KL regularizer")
    indices = jnp.asarray(indices)
    if indices.ndim != 4:
      raise ValueError(f"expected token indices (B, T', H', W'), got shape {indices.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
      raise ValueError(f"token indices must be integers, got dtype {indices.dtype}")
    k = int(np.prod(self.config.levels))
    if not isinstance(indices, jax.core.Tracer):  # value checks need concrete indices
      lo, hi = int(indices.min()), int(indices.max())
      if lo < 0 or hi >= k:
        raise ValueError(f"token indices must be in [0, {k}), got values in [{lo}, {hi}]")
    return indices.astype(jnp.int32)

  # -- the engine -----------------------------------------------------------------------------

  def _regularize(self, h, sample, step, compute_aux):
    if self.is_fsq:
      return self.regularization(h, step, compute_aux)
    return self.regularization(h, sample)

  def encode(self, x, sample: bool = False, step=0, compute_aux: bool = True,
             t_chunk_enc: Optional[int] = None):
    """`x (B, T, H, W, 3) -> (z (B, T', H', W', z_channels), aux)`.

    KL: z = posterior mean (or a sample with `sample=True` and a "sample" rng);
    aux = {mean, logvar, kl_loss}. FSQ: z = quantised codes; aux = {indices (B, T', H', W')
    int32, aux_loss, per_sample_entropy, codebook_entropy, commit_loss} with the entropy weight
    annealed to `step` (training iteration); `compute_aux=False` keeps only the indices.

    `t_chunk_enc` (causal models, a multiple of the time factor f): the official tiled encode,
    frame 0 alone then chunks of `t_chunk_enc` frames with the caches carried; a final chunk
    whose length is not a multiple of f is front-padded with copies of its own first frame
    (v1.1; v1.0 needs T = 1 + f*k). Losses are the mean over chunks, as officially.
    """
    if t_chunk_enc is None:
      h = self.encoder(self._check_video(x).astype(jnp.dtype(self.config.dtype)))
      return self._regularize(h, sample, step, compute_aux)
    check_chunk(self.config, t_chunk_enc, "t_chunk_enc")
    x = self._check_video(x, warn=False)
    f = self.config.time_downsample_factor
    if self.config.version == "v1.0" and (x.shape[1] - 1) % f:
      raise ValueError(f"chunked v1.0 encoding needs 1 + {f}k frames, got {x.shape[1]} (pad the "
                       f"end with vidtok_jax.inference.streaming.pad_frames)")
    model, variables = self.clone(parent=None), self.variables

    def step_fn(xc, state, key, kind):
      del kind
      rngs = None if key is None else {"sample": key}
      z, aux, state = model.apply(variables, xc, state, sample, step, compute_aux, rngs=rngs,
                                  method=VidTok.encode_chunk)
      seq = {"z": z, **{k: v for k, v in aux.items() if jnp.ndim(v) >= 2}}
      return seq, {k: v for k, v in aux.items() if jnp.ndim(v) < 2}, state

    keys_fn = None
    if sample and not self.is_fsq:
      keys_fn = lambda n: list(jax.random.split(self.make_rng("sample"), n))  # noqa: E731
    seq, scalars, _ = tiled_encode(step_fn, x, t_chunk_enc, keys_fn)
    z = seq.pop("z")
    return z, {**seq, **scalars}

  def encode_chunk(self, x, state=None, sample: bool = False, step=0, compute_aux: bool = True):
    """One chunk of streaming encoding: `(z, aux, state)`. `state` is the previous chunk's (None
    for the first chunk: frame 0 alone in the official schedule). The chunk is padded as a clip
    (copies of its own first frame in front when its length is not a multiple of f)."""
    if not self.config.causal:
      raise ValueError(f"streaming needs a causal model; {self.config.name} is non-causal")
    x = self._check_video(x, warn=False)
    h, state = self.encoder(x.astype(jnp.dtype(self.config.dtype)), state, True)
    z, aux = self._regularize(h, sample, step, compute_aux)
    return z, aux, state

  def decode_chunk(self, z, state=None, use_overlap: bool = False, indices: bool = False):
    """One chunk of streaming decoding: `(video, state)`. With `use_overlap`, the last latent of
    `z` is the next chunk's first (look-ahead) latent: the caches leave it out and its f frames
    are dropped from the output (official v1.1 `use_overlap`). `indices=True`: `z` holds FSQ
    token indices `(B, t, h, w)`."""
    if not self.config.causal:
      raise ValueError(f"streaming needs a causal model; {self.config.name} is non-causal")
    if indices:
      z = self.regularization.indices_to_codes(self._check_indices(z))
    z = self._check_latent(z).astype(jnp.dtype(self.config.dtype))
    if use_overlap and z.shape[1] < 2:
      raise ValueError("use_overlap needs a chunk of at least 2 latents (the last is look-ahead)")
    y, state = self.decoder(z, state, True, overlap=use_overlap)
    if use_overlap:
      y = y[:, : y.shape[1] - self.config.time_downsample_factor]
    return y, state

  def _tiled_decode(self, z, t_chunk_dec, use_overlap, indices=False):
    check_chunk(self.config, t_chunk_dec, "t_chunk_dec")
    model, variables = self.clone(parent=None), self.variables

    def step_fn(zc, state, overlap):
      return model.apply(variables, zc, state, overlap, indices, method=VidTok.decode_chunk)

    return tiled_decode(step_fn, z, t_chunk_dec, use_overlap)

  def decode(self, z, t_chunk_dec: Optional[int] = None, use_overlap: bool = False):
    """`z (B, T', H', W', z_channels) -> video (B, T_out, H, W, 3)`, unclamped.

    `t_chunk_dec` (causal models): the official tiled decode, latent 0 alone then chunks of
    `t_chunk_dec` latents; `use_overlap` feeds each chunk but the last the next latent too."""
    z = self._check_latent(z)
    if t_chunk_dec is None:
      if use_overlap:
        raise ValueError("use_overlap applies to tiled decoding: also give t_chunk_dec")
      return self.decoder(z.astype(jnp.dtype(self.config.dtype)))
    return self._tiled_decode(z, t_chunk_dec, use_overlap)

  def decode_indices(self, indices, t_chunk_dec: Optional[int] = None, use_overlap: bool = False):
    """FSQ token indices `(B, T', H', W')` -> video, via the implicit codebook (tiled as
    `decode` when `t_chunk_dec` is given)."""
    indices = self._check_indices(indices)
    if t_chunk_dec is not None:
      return self._tiled_decode(indices, t_chunk_dec, use_overlap, indices=True)
    if use_overlap:
      raise ValueError("use_overlap applies to tiled decoding: also give t_chunk_dec")
    codes = self.regularization.indices_to_codes(indices)
    return self.decoder(codes.astype(jnp.dtype(self.config.dtype)))

  def __call__(self, x, sample: bool = False, step=0, compute_aux: bool = True,
               t_chunk_enc: Optional[int] = None, t_chunk_dec: Optional[int] = None,
               use_overlap: bool = False):
    """The official forward: `(z, reconstruction, aux)`; v1.1 keeps the last T frames.

    `t_chunk_enc` turns on the official tiling (`use_tiling`): chunked encoding and chunked
    decoding with `t_chunk_dec` (default `t_chunk_enc // f`) and `use_overlap`."""
    if t_chunk_enc is None and (t_chunk_dec is not None or use_overlap):
      raise ValueError("t_chunk_dec / use_overlap apply to tiling: also give t_chunk_enc")
    image = jnp.ndim(x) == 4
    video = self._check_video(x)
    z, aux = self.encode(video, sample, step, compute_aux, t_chunk_enc=t_chunk_enc)
    if t_chunk_enc is not None:
      t_chunk_dec = t_chunk_dec or t_chunk_enc // self.config.time_downsample_factor
      y = self._tiled_decode(z, t_chunk_dec, use_overlap)
    else:
      y = self.decoder(z.astype(jnp.dtype(self.config.dtype)))
    if self.config.causal and self.config.version == "v1.1":
      y = y[:, y.shape[1] - video.shape[1]:]
    return z, (y[:, 0] if image else y), aux


def _dummy_input(spec: ModelSpec):
  t = 1 if spec.causal else spec.time_downsample_factor
  s = spec.spatial_factor
  return jnp.zeros((1, t, s, s, spec.in_channels), jnp.float32)


def abstract_params(config) -> Any:
  """The params tree of `VidTok(config)` as `jax.ShapeDtypeStruct`s (no compute, no memory)."""
  model = VidTok(config)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), _dummy_input(model.config), compute_aux=False))
  return variables["params"]


def init_params(config, rng) -> Any:
  """Freshly initialised params (PyTorch's default init; temporal conv2 zeros, mix_factor 2)."""
  model = VidTok(config)
  init = jax.jit(lambda r: model.init(r, _dummy_input(model.config), compute_aux=False))
  return init(rng)["params"]
