"""VidTok decoders: `DecoderCausal3DPadding` (v1.0 / v1.1) and the non-causal `Decoder3D`.

`(B, T', H', W', z_channels) -> (B, T_out, H' * s, W' * s, out_ch)`, unbounded (no tanh). With f
the time factor: v1.0 causal gives `f*T' - (f-1)` frames (the first f-1 are dropped), v1.1 causal
and non-causal give `f*T'` frames.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vidtok_jax.models.encoder import Mid, SpatialLevel, TemporalLevel, conv3
from vidtok_jax.models.layers import normalize

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
  remat: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    n = len(self.ch_mult)
    widths = [self.ch * m for m in self.ch_mult]
    self.conv_in = conv3(widths[-1], self.causal, self.version, None, **kw)
    self.mid = Mid(widths[-1], self.causal, self.version, self.norm_type, **kw)
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
                              self.param_dtype)
    self.conv_out = conv3(self.out_ch, self.causal, self.version, None, **kw)

  def __call__(self, z):
    h = self.mid(self.conv_in(z))
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = self.up_temporal[i].block[j](self.up[i].block[j](h))
      if i in self.spatial_us:
        h = self.up[i].upsample(h)
        if i in self.tempo_us:
          h = self.up_temporal[i].upsample(h)
    h = self.conv_out(nn.silu(self.norm_out(h)))
    if self.causal and self.version == "v1.0":
      h = h[:, self.time_downsample_factor - 1:]
    return h
