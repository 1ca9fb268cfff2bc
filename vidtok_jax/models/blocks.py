"""Residual and attention blocks of the VidTok encoder/decoder, on `(B, T, H, W, C)`.

Norm statistics follow the official reshapes (they only matter for GroupNorm): 2-D blocks and
everything in causal models normalise per frame; causal temporal blocks per (pixel, time)
position; non-causal mid blocks / attention per clip and non-causal temporal blocks per pixel over
time.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vidtok_jax.models.layers import Cache, CausalConv, Conv
from vidtok_jax.models.norms import normalize

Dtype = Any


def streamed(mod, cache, new: dict, name: str, return_cache: bool, cache_offset=None):
  """`h -> mod(h)` that reads `cache[name]` and, when `return_cache`, stores the new one in
  `new[name]`: how every container threads the per-module caches of streaming inference."""

  def apply(h):
    if isinstance(mod, Conv):  # a non-causal conv has nothing to carry
      return mod(h)
    c = None if cache is None else cache[name]
    # Always positional: a rematerialised block marks (return_cache, cache_offset) static.
    out = mod(h, c, return_cache, cache_offset)
    if not return_cache:
      return out
    y, new[name] = out
    return y

  return apply


def residual_branch(block: nn.Module, x, stats: str, conv):
  """`conv2(silu(norm2(conv1(silu(norm1(x))))))`, the shared body of every residual block.

  `conv(name)` builds the block's conv; called inside `block`'s compact method, so the
  submodules are `block`'s own (`norm1`, `conv1`, `norm2`, `conv2`). Each norm includes its
  SiLU (`normalize(..., silu=True)`: the backward pass keeps only the norm's input).
  """
  h = normalize(block.norm_type, stats, "norm1", block.param_dtype, silu=True)(x)
  h = conv("conv1")(h)
  h = normalize(block.norm_type, stats, "norm2", block.param_dtype, silu=True)(h)
  return conv("conv2")(h)


class ResnetBlock2D(nn.Module):
  """`ResnetBlock`: per-frame 3x3 convs, `out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1 x)))))`.

  `(B, T, H, W, Cin) -> (B, T, H, W, features)`; 1x1 `nin_shortcut` iff Cin != features.
  """

  features: int
  norm_type: str = "layernorm"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    h = residual_branch(self, x, "frame", lambda name: Conv(
        self.features, (1, 3, 3), padding=((0, 0), (1, 1), (1, 1)), name=name, **kw))
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1, 1), name="nin_shortcut", **kw)(x)
    return x.astype(h.dtype) + h


class TemporalBlock(nn.Module):
  """`ResnetCausalBlock1D` / `ResnetBlock1D`: the same residual formula with k=3 convs along T.

  Width-preserving `(B, T, H, W, C) -> (B, T, H, W, C)`; conv2 is zero-initialised so a fresh
  block is the identity. Causal: CausalConv (v1.0 zeros / v1.1 replicate) and per-position norms.
  """

  features: int
  causal: bool = True
  version: str = "v1.0"
  norm_type: str = "layernorm"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, return_cache: bool = False,
               cache_offset: Optional[int] = None):
    """Streaming (causal): `cache` holds the convs' caches; `return_cache` also returns them."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    stats = "position" if self.causal else "pixel"
    new = {}

    def conv(name):
      zero_init = name == "conv2"  # the block starts as the identity
      if self.causal:
        return streamed(CausalConv(self.features, (3, 1, 1), version=self.version,
                                   zero_init=zero_init, name=name, **kw),
                        cache, new, name, return_cache, cache_offset)
      return Conv(self.features, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), zero_init=zero_init,
                  name=name, **kw)

    h = residual_branch(self, x, stats, conv)
    y = x.astype(h.dtype) + h
    return (y, new) if return_cache else y


class ResnetBlock3D(nn.Module):
  """Mid-level `ResnetCausalBlock` / `ResnetNoncausalBlock`: 3x3x3 convs, width-preserving."""

  features: int
  causal: bool = True
  version: str = "v1.0"
  norm_type: str = "layernorm"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, return_cache: bool = False,
               cache_offset: Optional[int] = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    stats = "frame" if self.causal else "clip"
    new = {}

    def conv(name):
      if self.causal:
        return streamed(CausalConv(self.features, (3, 3, 3), version=self.version, name=name, **kw),
                        cache, new, name, return_cache, cache_offset)
      return Conv(self.features, (3, 3, 3), padding=((1, 1),) * 3, name=name, **kw)

    h = residual_branch(self, x, stats, conv)
    y = x.astype(h.dtype) + h
    return (y, new) if return_cache else y


# Query rows per attention block: a frame's (H*W)^2 logits are built `ATTN_QUERY_BLOCK` rows at a
# time, so a 1080p frame at the latent of an 8x8 model (32400 positions) needs ~0.25 GB of float32
# logits instead of ~4 GB; frames with at most this many positions take one block (no loop).
ATTN_QUERY_BLOCK = 2048


def attention(q, k, v, precision=None, query_block: Optional[int] = None):
  """Single-head `softmax(q k^T / sqrt(C)) v` of `(N, L, C)` arrays, via
  `jax.nn.dot_product_attention`, in blocks of at most `query_block` (default
  `ATTN_QUERY_BLOCK`) query rows.

  Each query row's softmax is over all L keys, so blocking the queries is exact (no online
  softmax), and only one `(N, block, L)` logits block is alive at a time (a `lax.map`).
  """
  n, l, c = q.shape
  query_block = query_block or ATTN_QUERY_BLOCK

  def rows(qb):  # (N, Lq, C) -> (N, Lq, C); heads axis of 1
    if jnp.dtype(q.dtype).itemsize > 4:  # float64: dot_product_attention's softmax is float32
      logits = jnp.einsum("nqc,nkc->nqk", qb, k, precision=precision) * (c ** -0.5)
      return jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1), v, precision=precision)
    with jax.default_matmul_precision(precision):  # f32 dots; bf16 ones use BF16_BF16_F32
      o = jax.nn.dot_product_attention(qb[:, :, None], k[:, :, None], v[:, :, None],
                                       implementation="xla")
    return o[:, :, 0]

  if l <= query_block:
    return rows(q)
  nb = -(-l // query_block)
  size = -(-l // nb)  # equal blocks, at most nb - 1 padded rows
  qp = jnp.pad(q, ((0, 0), (0, nb * size - l), (0, 0)))
  out = jax.lax.map(rows, qp.reshape(n, nb, size, c).swapaxes(0, 1))
  return out.swapaxes(0, 1).reshape(n, nb * size, c)[:, :l]


class AttnBlock(nn.Module):
  """`AttnBlockWrapper`: single-head softmax attention over the H*W positions of each frame.

  `out = x + proj_out(softmax(q k^T / sqrt(C)) v)`, q/k/v/proj_out 1x1x1 convs; the norm is per
  frame (causal) or per clip (non-causal). No attention across time in either family. The
  attention runs in query blocks (`attention`), so high-resolution frames fit without tiling.
  """

  causal: bool = True
  norm_type: str = "layernorm"
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    b, t, hh, ww, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def proj(name):
      if self.causal:  # official causal wrapper: CausalConv3d k=1 (no padding)
        return CausalConv(c, (1, 1, 1), name=name, **kw)
      return Conv(c, (1, 1, 1), name=name, **kw)

    h = normalize(self.norm_type, "frame" if self.causal else "clip", "norm", self.param_dtype)(x)
    q, k, v = (proj(n)(h).reshape(b * t, hh * ww, c) for n in ("q", "k", "v"))
    o = attention(q, k, v, self.precision)
    o = proj("proj_out")(o.reshape(b, t, hh, ww, c))
    return x.astype(o.dtype) + o
