"""VidTok encoders: `EncoderCausal3DPadding` (v1.0 / v1.1) and the non-causal `Encoder3D`.

`(B, T, H, W, in_channels) -> (B, T', H / s, W / s, 2*z_channels or z_channels)` with s the spatial
factor (2 per `spatial_ds` level). Causal models first pad copies of frame 0 in front (v1.0: f-1
frames iff T % f != 0; v1.1: f - T % f frames iff T % f != 0), so T' = floor(T_pad / f); the
non-causal encoder takes T >= 4 frames and gives T' = floor(T / 4).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vidtok_jax.config import REMAT_POLICIES
from vidtok_jax.models.blocks import (
  AttnBlock,
  ResnetBlock2D,
  ResnetBlock3D,
  TemporalBlock,
  streamed,
)
from vidtok_jax.models.layers import Cache, CausalConv, Conv, time_pad_front
from vidtok_jax.models.norms import normalize
from vidtok_jax.models.resample import Downsample, TimeDownsample, TimeUpsample, Upsample

Dtype = Any


def conv3(features, causal, version, name, **kw):
  """The 3x3x3 `conv_in` / `conv_out`: CausalConv3d (causal) or Conv3d with padding 1."""
  if causal:
    return CausalConv(features, (3, 3, 3), version=version, name=name, **kw)
  return Conv(features, (3, 3, 3), padding=((1, 1),) * 3, name=name, **kw)


def block_classes(remat: str):
  """The 2-D, temporal and 3-D block classes, rematerialised per block to save memory:
  "blocks" keeps only each block's input for the backward pass, "convs" also its conv outputs
  (recomputing only norms and activations), "none" keeps everything."""
  if remat not in REMAT_POLICIES:  # modules built without a validated config
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
  if remat == "none":
    return ResnetBlock2D, TemporalBlock, ResnetBlock3D
  policy = jax.checkpoint_policies.dots_saveable if remat == "convs" else None
  # (return_cache, cache_offset) of the streaming call are static.
  return (nn.remat(ResnetBlock2D, policy=policy),
          nn.remat(TemporalBlock, static_argnums=(3, 4), policy=policy),
          nn.remat(ResnetBlock3D, static_argnums=(3, 4), policy=policy))


class Mid(nn.Module):
  """`mid`: 3-D res block, attention, 3-D res block at constant width."""

  features: int
  causal: bool = True
  version: str = "v1.0"
  norm_type: str = "layernorm"
  remat: str = "none"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, h, cache: Optional[Cache] = None, return_cache: bool = False,
               cache_offset: Optional[int] = None):
    kw = dict(causal=self.causal, norm_type=self.norm_type, dtype=self.dtype,
              param_dtype=self.param_dtype, precision=self.precision)
    new = {}
    block_3d = block_classes(self.remat)[2]

    def block(name):
      mod = block_3d(self.features, version=self.version, name=name, **kw)
      return streamed(mod, cache, new, name, return_cache, cache_offset)

    h = block("block_1")(h)
    h = AttnBlock(name="attn_1", **kw)(h)  # per frame: nothing to carry
    h = block("block_2")(h)
    return (h, new) if return_cache else h


class SpatialLevel(nn.Module):
  """`down.<i>` / `up.<i>`: the level's 2-D blocks and its optional spatial resampler."""

  features: int
  num_blocks: int
  resample: Optional[str] = None  # "down" | "up" | None
  resamp_with_conv: bool = True
  norm_type: str = "layernorm"
  remat: str = "none"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    block_2d = block_classes(self.remat)[0]
    self.block = [block_2d(self.features, self.norm_type, **kw) for _ in range(self.num_blocks)]
    if self.resample == "down":
      self.downsample = Downsample(self.features, self.resamp_with_conv, **kw)
    elif self.resample == "up":
      self.upsample = Upsample(self.features, **kw)


class TemporalLevel(nn.Module):
  """`down_temporal.<i>` / `up_temporal.<i>`: the level's temporal blocks and time resampler."""

  features: int
  num_blocks: int
  resample: Optional[str] = None  # "down" | "up" | None
  causal: bool = True
  version: str = "v1.0"
  interpolation_mode: str = "nearest"
  num_temp_upsample: int = 1
  norm_type: str = "layernorm"
  remat: str = "none"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def setup(self):
    kw = dict(causal=self.causal, version=self.version, dtype=self.dtype,
              param_dtype=self.param_dtype, precision=self.precision)
    block_1d = block_classes(self.remat)[1]
    self.block = [block_1d(self.features, norm_type=self.norm_type, **kw)
                  for _ in range(self.num_blocks)]
    if self.resample == "down":
      self.downsample = TimeDownsample(self.features, **kw)
    elif self.resample == "up":
      self.upsample = TimeUpsample(self.features, interpolation_mode=self.interpolation_mode,
                                   num_temp_upsample=self.num_temp_upsample, **kw)


class Encoder(nn.Module):
  """Causal (`EncoderCausal3DPadding`) or non-causal (`Encoder3D`) VidTok encoder.

  Schedules (`spatial_ds`, `tempo_ds`) are the resolved level lists; a temporal downsample exists
  only at levels that are also in `spatial_ds`.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  double_z: bool = True
  causal: bool = True
  version: str = "v1.0"
  time_downsample_factor: int = 4
  init_pad_mode: str = "replicate"
  spatial_ds: Sequence[int] = (0, 1, 2)
  tempo_ds: Sequence[int] = (2, 1)
  norm_type: str = "layernorm"
  resamp_with_conv: bool = True
  remat: str = "none"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    n = len(self.ch_mult)
    widths = [self.ch * m for m in self.ch_mult]
    self.conv_in = conv3(self.ch, self.causal, self.version, None, **kw)
    self.down = [
        SpatialLevel(widths[i], self.num_res_blocks, "down" if i in self.spatial_ds else None,
                     self.resamp_with_conv, self.norm_type, self.remat, **kw) for i in range(n)]
    self.down_temporal = [
        TemporalLevel(widths[i], self.num_res_blocks,
                      "down" if (i in self.spatial_ds and i in self.tempo_ds) else None,
                      self.causal, self.version, norm_type=self.norm_type, remat=self.remat, **kw)
        for i in range(n)]
    self.mid = Mid(widths[-1], self.causal, self.version, self.norm_type, self.remat, **kw)
    self.norm_out = normalize(self.norm_type, "frame" if self.causal else "clip", None,
                              self.param_dtype, silu=True)
    out = 2 * self.z_channels if self.double_z else self.z_channels
    self.conv_out = conv3(out, self.causal, self.version, None, **kw)

  def pad_frames(self, x):
    """The causal padding wrapper: copies of frame 0 in front so time divides evenly."""
    f, t = self.time_downsample_factor, x.shape[1]
    if not self.causal or t % f == 0:
      return x
    n = f - 1 if self.version == "v1.0" else f - t % f
    return time_pad_front(x, n, "replicate" if self.init_pad_mode == "replicate" else "constant")

  def __call__(self, x, cache: Optional[Cache] = None, return_cache: bool = False):
    """Streaming (causal): `cache` is the previous chunk's returned cache (None: first chunk);
    with `return_cache` the call returns `(h, cache)`. Each chunk gets its own frame padding."""
    new = {}

    def run(mod, name, h):
      return streamed(mod, cache, new, name, return_cache)(h)

    h = run(self.conv_in, "conv_in", self.pad_frames(x))
    for i in range(len(self.ch_mult)):
      for j in range(self.num_res_blocks):
        h = run(self.down_temporal[i].block[j], f"down_temporal.{i}.block.{j}",
                self.down[i].block[j](h))
      if i in self.spatial_ds:
        h = self.down[i].downsample(h)
        if i in self.tempo_ds:
          h = run(self.down_temporal[i].downsample, f"down_temporal.{i}.downsample", h)
    h = run(self.mid, "mid", h)
    h = run(self.conv_out, "conv_out", self.norm_out(h))  # norm_out includes the SiLU
    return (h, new) if return_cache else h
