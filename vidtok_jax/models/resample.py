"""Resamplers of the VidTok autoencoder: AlphaBlender, 2x spatial and temporal down/upsamplers.

Each works on channels-last videos `(B, T, H, W, C)` with the convs of `layers` (module and
parameter names mirror the official PyTorch module tree). The temporal ones stream like
`layers.CausalConv`: a `cache` from the previous chunk in, and with `return_cache` the new one out.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vidtok_jax.models.layers import Cache, CausalConv, Conv, at_least_f32
from vidtok_jax.models.platform import target_platform, tracing_for_training

Dtype = Any


class AlphaBlender(nn.Module):
  """`a * x1 + (1 - a) * x2` with `a = sigmoid(mix_factor)`, `mix_factor` learned (init 2.0)."""

  init_value: float = 2.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x1, x2):
    mix = self.param("mix_factor", nn.initializers.constant(self.init_value), (1,),
                     self.param_dtype)
    alpha = jax.nn.sigmoid(mix).astype(x1.dtype)
    return alpha * x1 + (1.0 - alpha) * x2


def _blend(parent: nn.Module, x1, x2):
  """AlphaBlender sharing `parent`'s scope, so `mix_factor` sits where the official key has it."""
  blender = AlphaBlender(param_dtype=parent.param_dtype)
  nn.share_scope(parent, blender)
  return blender(x1, x2)


class Downsample(nn.Module):
  """Per-frame 2x spatial downsample: pad right/bottom by 1, 3x3 stride-2 VALID conv.

  `(B, T, H, W, C) -> (B, T, H // 2, W // 2, C)`. `with_conv=False` is the (unused in releases)
  2x2 average pool.
  """

  features: int
  with_conv: bool = True
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    if not self.with_conv:
      b, t, h, w, c = x.shape
      x = x[:, :, : h // 2 * 2, : w // 2 * 2]
      return x.reshape(b, t, h // 2, 2, w // 2, 2, c).mean((3, 5))
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv(self.features, (1, 3, 3), (1, 2, 2), "VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)


class Upsample(nn.Module):
  """Per-frame 2x nearest spatial upsample then a 3x3 conv (padding 1).

  The repeat copies values, so it runs in the input's dtype: a float32 copy of a bf16 model's
  4x-sized upsampled activation would move twice its bytes for the same values."""

  features: int
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    return Conv(self.features, (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1)), dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)


def _avg_pool_time(x):
  """Mean over time windows of 3 with stride 2: `(B, T, ...) -> (B, (T - 3) // 2 + 1, ...)`."""
  n = (x.shape[1] - 3) // 2 + 1
  return (x[:, 0: 2 * n - 1: 2] + x[:, 1: 2 * n: 2] + x[:, 2: 2 * n + 1: 2]) / 3.0


class TimeDownsample(nn.Module):
  """2x temporal downsample `T -> floor(T / 2)` (T >= 2): AlphaBlender of avg-pool and conv.

  causal v1.0: pool over [zero frame, x]; conv = v1.0 CausalConv3d k3 stride (2,1,1).
  causal v1.1: pool over [frame 0, x]; conv = v1.1 CausalConv3d. Streaming (both causal
  versions): the pool's front frame is the cached last frame of the previous chunk.
  non-causal: pool and conv (k3, stride 2, H/W padding 1) over [x, zero frame].
  """

  features: int
  causal: bool = True
  version: str = "v1.0"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, return_cache: bool = False,
               cache_offset: Optional[int] = None):
    del cache_offset  # encoder modules keep their whole input as context
    if x.shape[1] < 2:
      raise ValueError(f"temporal downsampling needs at least 2 frames, got {x.shape[1]}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    if not self.causal:
      padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
      conv = Conv(self.features, (3, 3, 3), (2, 1, 1), ((0, 0), (1, 1), (1, 1)), name="conv",
                  **kw)(padded)
      return _blend(self, _avg_pool_time(padded), conv)
    conv_mod = CausalConv(self.features, (3, 3, 3), (2, 1, 1), version=self.version, name="conv",
                          **kw)
    if cache is not None:
      front = cache["pool"].astype(x.dtype)
    else:  # v1.0 pools over a zero frame, v1.1 over a copy of frame 0
      front = jnp.zeros_like(x[:, :1]) if self.version == "v1.0" else x[:, :1]
    pooled = _avg_pool_time(jnp.concatenate([front, x], axis=1))
    if not return_cache:
      return _blend(self, pooled, conv_mod(x, None if cache is None else cache["conv"]))
    conv, conv_cache = conv_mod(x, None if cache is None else cache["conv"], return_cache=True)
    return _blend(self, pooled, conv), {"pool": x[:, -1:], "conv": conv_cache}


def trilinear_time_2x(x):
  """Linear 2x interpolation along time, half-pixel centres, edge-clamped, in float32."""
  dtype = x.dtype
  x = x.astype(at_least_f32(dtype))
  prev = jnp.concatenate([x[:, :1], x[:, :-1]], axis=1)
  nxt = jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)
  even, odd = 0.25 * prev + 0.75 * x, 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=2).reshape(x.shape[0], 2 * x.shape[1], *x.shape[2:])
  return out.astype(dtype)


def nearest_time_2x(x):
  return jnp.repeat(x, 2, axis=1)


class TimeUpsample(nn.Module):
  """2x temporal upsample `T -> 2T`: AlphaBlender of an interpolation and a conv applied to it.

  v1.0 causal / non-causal: nearest interpolation (each frame twice). v1.1 causal: nearest or
  trilinear; trilinear interpolates the first `num_temp_upsample` (m) frames apart from the rest
  in a first chunk, and in later chunks interpolates [cache, x] and drops the first 2m outputs.
  """

  features: int
  causal: bool = True
  version: str = "v1.0"
  interpolation_mode: str = "nearest"
  num_temp_upsample: int = 1
  cache_offset: int = 0
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def _interpolate(self, x, cache):
    """Returns the interpolated frames and the interpolation cache (None for nearest)."""
    if self.interpolation_mode == "nearest" or self.version == "v1.0":
      return nearest_time_2x(x), None
    if self.interpolation_mode != "trilinear":
      raise ValueError(f"interpolation_mode must be 'nearest' or 'trilinear', "
                       f"got {self.interpolation_mode!r}")
    m = self.num_temp_upsample
    if cache is None:
      head, tail = x[:, :m], x[:, m:]
      parts = [trilinear_time_2x(head)] + ([trilinear_time_2x(tail)] if tail.shape[1] else [])
      return jnp.concatenate(parts, axis=1), x[:, -m:]
    cat = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return trilinear_time_2x(cat)[:, 2 * m:], cat[:, cat.shape[1] - 2 * m: cat.shape[1] - m]

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, return_cache: bool = False,
               cache_offset: Optional[int] = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    if not self.causal:
      up = nearest_time_2x(x)
      return _blend(self, up, Conv(self.features, (3, 3, 3), (1, 1, 1), ((1, 1),) * 3, name="conv",
                                   **kw)(up))
    conv_mod = CausalConv(self.features, (3, 3, 3), version=self.version,
                          cache_offset=self.cache_offset, name="conv", **kw)
    if (target_platform() == "tpu" and not tracing_for_training() and cache is None
        and not return_cache and (self.interpolation_mode == "nearest" or self.version == "v1.0")):
      # The conv of the repeated frames computed from the source frames (`Conv`'s
      # `time_repeat`), phase by phase, blended with the source frames before the phases are
      # put in time order: no 3-D conv (whose TPU lowering relayouts its input), no
      # materialised repeat, two thirds of the FLOPs. v5e decode of a 17x256^2 clip: 65.4 ->
      # 62.4 GB accessed, 14.69 -> 12.66 TFLOP. Inference only: in the stage-1 step (v5e,
      # 17x128^2 per chip) it measured 144.4 -> 148.0 GB, its backward moving more.
      y = _blend(self, x[:, :, None], conv_mod(x, time_repeat=2))
      return y.reshape(y.shape[0], -1, *y.shape[3:])
    up, interp_cache = self._interpolate(x, None if cache is None else cache["interp"])
    conv_cache_in = None if cache is None else cache["conv"]
    if not return_cache:
      return _blend(self, up, conv_mod(up, conv_cache_in))
    conv, conv_cache = conv_mod(up, conv_cache_in, return_cache=True, cache_offset=cache_offset)
    return _blend(self, up, conv), {"interp": interp_cache, "conv": conv_cache}
