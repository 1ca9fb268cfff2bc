"""VidTok decoders: `DecoderCausal3DPadding` (v1.0 / v1.1) and the non-causal `Decoder3D`.

`(B, T', H', W', z_channels) -> (B, T_out, H' * s, W' * s, out_ch)`, unbounded (no tanh). With f
the time factor: v1.0 causal gives `f*T' - (f-1)` frames (the first f-1 are dropped), v1.1 causal
and non-causal give `f*T'` frames.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vidtok_jax.models.blocks import streamed
from vidtok_jax.models.encoder import Mid, SpatialLevel, TemporalLevel, conv3
from vidtok_jax.models.layers import Cache
from vidtok_jax.models.norms import normalize

Dtype = Any


class Decoder(nn.Module):
  """Causal or non-causal VidTok decoder; `num_res_blocks + 1` units per level.

  `temp_upsample_m[i]` is the trilinear split size m of level i's temporal upsampler (v1.1).
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  out_ch: int = 3
  causal: bool = True
  version: str = "v1.0"
  time_downsample_factor: int = 4
  spatial_us: Sequence[int] = (1, 2, 3)
  tempo_us: Sequence[int] = (1, 2)
  interpolation_mode: str = "nearest"
  temp_upsample_m: Sequence[int] = (1, 2, 1, 1)
  norm_type: str = "layernorm"
  remat: str = "none"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    n = len(self.ch_mult)
    widths = [self.ch * m for m in self.ch_mult]
    self.conv_in = conv3(widths[-1], self.causal, self.version, None, **kw)
    self.mid = Mid(widths[-1], self.causal, self.version, self.norm_type, self.remat, **kw)
    self.up = [
        SpatialLevel(widths[i], self.num_res_blocks + 1, "up" if i in self.spatial_us else None,
                     norm_type=self.norm_type, remat=self.remat, **kw) for i in range(n)]
    self.up_temporal = [
        TemporalLevel(widths[i], self.num_res_blocks + 1,
                      "up" if (i in self.spatial_us and i in self.tempo_us) else None,
                      self.causal, self.version, self.interpolation_mode,
                      self.temp_upsample_m[i], self.norm_type, self.remat, **kw)
        for i in range(n)]
    self.norm_out = normalize(self.norm_type, "frame" if self.causal else "clip", None,
                              self.param_dtype, silu=True)
    self.conv_out = conv3(self.out_ch, self.causal, self.version, None, **kw)

  def __call__(self, z, cache: Optional[Cache] = None, return_cache: bool = False,
               overlap: bool = False):
    """Streaming (causal): as `Encoder`. `overlap=True` marks the last latent of `z` as the
    look-ahead latent of v1.1 tiled decoding: every cache then leaves out the frames that latent
    occupies at its module's frame rate (the official cache offsets 1/2/4/8)."""
    new = {}
    rate = 1  # output frames per latent at the current depth

    def run(mod, name, h, frames_per_latent):
      offset = frames_per_latent if overlap else 0
      return streamed(mod, cache, new, name, return_cache, offset)(h)

    h = run(self.mid, "mid", run(self.conv_in, "conv_in", z, rate), rate)
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = run(self.up_temporal[i].block[j], f"up_temporal.{i}.block.{j}",
                self.up[i].block[j](h), rate)
      if i in self.spatial_us:
        h = self.up[i].upsample(h)
        if i in self.tempo_us:
          rate *= 2  # the upsampler's conv already runs at the doubled rate
          h = run(self.up_temporal[i].upsample, f"up_temporal.{i}.upsample", h, rate)
    h = run(self.conv_out, "conv_out", self.norm_out(h), rate)  # norm_out includes the SiLU
    if self.causal and self.version == "v1.0" and cache is None:
      h = h[:, self.time_downsample_factor - 1:]  # only the first chunk holds the padding frames
    return (h, new) if return_cache else h
