"""Layers of the VidTok autoencoder: (causal) convolutions and the platform they are lowered for.

Every module works on channels-last videos `(B, T, H, W, C)`. Per-frame 2-D convs are 3-D convs
with kernel `(1, kh, kw)` and per-pixel temporal convs are 3-D convs with kernel `(k, 1, 1)`, so
no layout changes are needed (`conv3d` picks the fastest lowering per platform). Module and
parameter names mirror the official PyTorch module tree (see `vidtok_jax.weights.keys`), e.g. a
causal conv is a module holding a child named `conv`.

Platform: the forms `conv3d` picks are chosen when the model is traced, for the platform the
program is lowered for: `target_platform()`, which is the innermost `lowering_platform(name)`
block (whoever builds a program for other devices sets it: the train step from its mesh, the
ahead-of-time planner from the TPU topology) and otherwise JAX's default backend.

Versions: "v1.0" causal convs pad time with zeros; "v1.1" causal convs pad time with copies of
the first frame (or, when streaming, with frames cached from the previous chunk).

The norms live in `models.norms` and the resamplers in `models.resample`; their names are still
importable from here.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.models.norms import STATS_AXES, LayerNorm, NormCore, normalize  # noqa: F401
from vidtok_jax.models.platform import (  # noqa: F401
    lowering_platform, target_platform, training_forms, tracing_for_training)

Dtype = Any
Cache = Any  # pytree of arrays carried between chunks in streaming (v1.1) inference

def at_least_f32(dtype):
  """The dtype statistics/interpolations run in: float32, or float64 for a float64 model."""
  return jnp.promote_types(dtype, jnp.float32)


def torch_uniform_init():
  """PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """A 3-D conv with explicit padding and PyTorch's default init (kernel `(kt, kh, kw)`)."""

  features: int
  kernel_size: Sequence[int] = (3, 3, 3)
  strides: Sequence[int] = (1, 1, 1)
  padding: Any = "VALID"
  zero_init: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x, padding=None, time_repeat: int = 1):
    """`padding` (per-axis pairs) overrides the field for this call (a zero pad of the input).

    `time_repeat=2`: the conv of `jnp.repeat(x, 2, axis=1)` (nearest 2x upsampling in time; time
    padding counted in the upsampled frames), computed from `x` by `conv3d_time_repeated` and
    returned phase by phase, `(B, T', 2, H', W', O)` (its `phases=True`)."""
    padding = self.padding if padding is None else padding
    fan_in = x.shape[-1] * int(np.prod(self.kernel_size))
    zeros = nn.initializers.zeros_init()
    kshape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", zeros if self.zero_init else torch_uniform_init(), kshape,
                        self.param_dtype)
    bias = self.param("bias", zeros if self.zero_init else torch_bias_init(fan_in),
                      (self.features,), self.param_dtype)
    dtype = self.dtype or x.dtype
    if time_repeat != 1:  # the kernel's frames are summed before the cast
      return conv3d_time_repeated(x.astype(dtype), kernel, time_repeat, tuple(self.strides),
                                  padding, self.precision, phases=True) + bias.astype(dtype)
    x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
    if padding != "VALID" and all(tuple(p) == (0, 0) for p in padding):
      padding = "VALID"
    if (tuple(self.kernel_size) == (1, 1, 1) and tuple(self.strides) == (1, 1, 1)
        and padding == "VALID"):
      # A pointwise conv is a matmul; skip the conv machinery.
      return jnp.einsum("...i,io->...o", x, kernel[0, 0, 0], precision=self.precision) + bias
    return conv3d(x, kernel, tuple(self.strides), padding, self.precision) + bias


# `(B, T, H, W, C)` convs with W as the batch axis and (B, T, H) as the spatial ones (input, kernel
# `(1, kt, 1, C, O)` and output as `ConvDimensionNumbers` tuples: batch/out, feature/in, spatial).
_W_BATCH_5D = jax.lax.ConvDimensionNumbers((3, 4, 0, 1, 2), (4, 3, 0, 1, 2), (3, 4, 0, 1, 2))


def conv3d(x, kernel, strides=(1, 1, 1), padding="VALID", precision=None,
           platform: Optional[str] = None):
  """A 3-D conv `(B, T, H, W, C) * (kt, kh, kw, C, O)`, `padding` "VALID" or per-axis pairs.

  Zero padding is the conv's own (no padded copy of `x` is made). A one-tap (per-frame) kernel
  runs as a 2-D conv over `B*T` frames and a one-pixel temporal kernel `(kt, 1, 1)` as a 2-D conv
  over `(T, H*W)` "images": 2-D convs are the best-tuned kernels of cuDNN and XLA:CPU (whose 2-D
  convs are about twice as fast as its 3-D ones; the same sums either way). On CPU a kernel
  with few outputs (taps x outputs <= inputs, e.g. the decoder's 128 -> 3 `conv_out`) runs as
  `conv_by_taps`; accelerators run it as a conv. On TPU a multi-frame kernel over at most
  `128 / kt` channels runs as `time_taps_conv`. On TPU (inference and training) a temporal
  kernel runs instead as one 5-D conv over the video as it is, W the batch axis and kernel
  `(1, kt, 1)`: no reshape or layout copy around it (v5e, 17x256^2 clip: encode 51.1 -> 38.6 GB
  accessed, decode 87.7 -> 72.3 GB; stage-1 step, 17x64^2 per chip: 78.5 -> 57.8 GB; FLOPs
  unchanged). `platform`: the one the program is lowered for (default `target_platform()`);
  only "cpu" gets the CPU forms (also `early_weight_grad`).
  """
  platform = platform or target_platform()
  taps = int(np.prod(kernel.shape[:3]))
  if (taps > 1 and tuple(strides) == (1, 1, 1) and taps * kernel.shape[-1] <= kernel.shape[-2]
      and platform == "cpu"):
    if padding != "VALID":
      x = jnp.pad(x, ((0, 0), *(tuple(p) for p in padding), (0, 0)))
    return conv_by_taps(x, kernel, precision, platform)
  if kernel.shape[1:3] == (1, 1) and strides[1:] == (1, 1) and (
      padding == "VALID" or tuple(map(tuple, padding[1:])) == ((0, 0), (0, 0))):
    time_pad = "VALID" if padding == "VALID" else (tuple(padding[0]), (0, 0))
    temporal_5d = platform == "tpu"

    def time_conv(x, kernel):
      b, t, h, w, c = x.shape
      if temporal_5d:
        # The video as it is, `W` the batch and `(B, T, H)` the spatial axes, the kernel
        # `(1, kt, 1)`: XLA's TPU layouts then need no reshape of H and W or layout copy around
        # the conv. v5e decode of a 17x256^2 clip: 87.7 -> 72.3 GB accessed, FLOPs unchanged.
        return jax.lax.conv_general_dilated(
            x, kernel[None, :, :, 0], window_strides=(1, strides[0], 1),
            padding="VALID" if time_pad == "VALID" else ((0, 0), time_pad[0], (0, 0)),
            dimension_numbers=_W_BATCH_5D, precision=precision)
      y = jax.lax.conv_general_dilated(
          x.reshape(b, t, h * w, c), kernel[:, 0], window_strides=(strides[0], 1),
          padding=time_pad, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
      return y.reshape(b, y.shape[1], h, w, y.shape[-1])

    return early_weight_grad(time_conv, platform)(x, kernel)
  if (kernel.shape[0] > 1 or strides[0] != 1) and platform == "tpu" and (
      kernel.shape[0] * kernel.shape[3] <= TPU_LANES):
    return time_taps_conv(x, kernel, strides, padding, precision)
  if kernel.shape[0] > 1 or strides[0] != 1:
    def conv(x, kernel):
      return jax.lax.conv_general_dilated(
          x, kernel, window_strides=strides, padding=padding,
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=precision)
    return early_weight_grad(conv, platform)(x, kernel)
  if padding != "VALID" and tuple(padding[0]) != (0, 0):  # a one-tap kernel over padded time
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), (0, 0), (0, 0), (0, 0)))
  spatial = "VALID" if padding == "VALID" else tuple(tuple(p) for p in padding[1:])

  def frames_conv(x, kernel):
    b, t = x.shape[:2]
    y = jax.lax.conv_general_dilated(
        x.reshape(b * t, *x.shape[2:]), kernel[0], window_strides=tuple(strides[1:]),
        padding=spatial, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return y.reshape(b, t, *y.shape[1:])

  return early_weight_grad(frames_conv, platform)(x, kernel)


# A TPU array's minor dimension is padded to a multiple of 128 lanes in HBM (`T(8,128)` tiles).
TPU_LANES = 128


def time_taps_conv(x, kernel, strides=(1, 1, 1), padding="VALID", precision=None):
  """A 3-D conv as one 2-D conv over frames whose channels are the `kt` input frames it reads.

  Output frame `i` reads input frames `s*i .. s*i + kt - 1` (after the time padding): those
  frames stacked on channels make one `(H, W, kt*C)` image, and the kernel folded to
  `(kh, kw, kt*C, O)` gives the same sum with one accumulation. `conv3d` takes it on a TPU when
  `kt*C` fits in one 128-lane tile (the encoder's `conv_in` over RGB, the decoder's over the
  latent): there the stacked frames take no more HBM than the input, where XLA's TPU lowering of
  a 3-D conv relayouts its output three times (v5e encode of a 17x256^2 clip: `conv_in` 2.44 ->
  1.15 GB accessed, the encode 34.3 -> 33.3 GB). Wider inputs keep the 3-D conv: their stacked
  copy costs more than the relayouts (all `(kt, 3, 3)` convs stacked: decode 65.4 -> 73.5 GB).
  """
  kt, kh, kw, c, o = kernel.shape
  st = strides[0]
  tpad, spatial = ((0, 0), "VALID") if padding == "VALID" else (
      tuple(padding[0]), tuple(tuple(p) for p in padding[1:]))
  if tpad != (0, 0):
    x = jnp.pad(x, ((0, 0), tpad) + ((0, 0),) * (x.ndim - 2))
  b, t = x.shape[:2]
  n = (t - kt) // st + 1
  if n < 1:
    raise ValueError(f"a {kt}-frame kernel needs at least {kt} frames, got {t} (after padding)")
  stacked = jnp.concatenate([x[:, d: d + st * (n - 1) + 1: st] for d in range(kt)], axis=-1)
  folded = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, o)
  y = jax.lax.conv_general_dilated(
      stacked.reshape(b * n, *stacked.shape[2:]), folded, window_strides=tuple(strides[1:]),
      padding=spatial, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
  return y.reshape(b, n, *y.shape[1:])


def conv3d_time_repeated(x, kernel, repeat: int = 2, strides=(1, 1, 1), padding="VALID",
                         precision=None, phases: bool = False):
  """`conv3d(jnp.repeat(x, repeat, axis=1), kernel, strides, padding)` without the repeat.

  Every upsampled frame is a copy of a source frame, so output phase `p` (frames `repeat*i + p`)
  is a conv over a few source frames `i + k` whose kernels are sums of the kernel's frames (for
  `repeat=2`, `kt=3` and 2 frames of causal padding: phase 0 takes `(W0 + W1, W2)` over source
  frames `(i - 1, i)`, phase 1 `(W0, W1 + W2)`). The source frames `i + k` stacked on channels are
  one image, and both phases' folded kernels stacked on the outputs make one per-frame 2-D conv,
  whose output channels are then put back in time. Two thirds of the FLOPs of the conv over the
  upsampled frames, and on a TPU no 3-D conv, whose lowering pads, slices and relayouts its input
  several times. Zero time padding only (`padding[0]`, in upsampled frames); time stride 1. The
  kernel's frames are summed in float32 (or wider), then cast to `x`'s dtype. `phases=True`
  returns `(B, T', repeat, H', W', O)`, output frame `repeat*i + p` at `[:, i, p]`, for callers
  that add to it something whose frames repeat too (one fusion instead of a layout copy and a
  materialised repeat; needs a whole number of output frames per source frame).
  """
  kt, kh, kw, c, o = kernel.shape
  if strides[0] != 1:
    raise ValueError(f"a time-repeated conv needs a time stride of 1, got {strides[0]}")
  tpad, spatial = ((0, 0), "VALID") if padding == "VALID" else (
      tuple(padding[0]), tuple(tuple(p) for p in padding[1:]))
  b, t = x.shape[:2]
  n_out = repeat * t + tpad[0] + tpad[1] - kt + 1
  if n_out < 1:
    raise ValueError(f"a {kt}-frame kernel over {repeat} x {t} frames (+{tpad} padding) gives no "
                     "output frame")
  # Output frame `repeat*i + p` reads upsampled frame `repeat*i + p + d - tpad[0]` for tap `d`:
  # source frame `i + (p + d - tpad[0]) // repeat`, or a padding zero outside `[0, t)`.
  shift = lambda p, d: (p + d - tpad[0]) // repeat
  ks = range(min(shift(0, 0), 0), max(shift(repeat - 1, kt - 1), 0) + 1)
  wide = kernel.astype(at_least_f32(kernel.dtype))
  zeros = jnp.zeros_like(wide[0])
  folded = jnp.stack([jnp.stack([sum((wide[d] for d in range(kt) if shift(p, d) == k), zeros)
                                 for k in ks]) for p in range(repeat)])  # (repeat, nk, kh, kw, C, O)
  folded = jnp.transpose(folded, (2, 3, 1, 4, 0, 5)).reshape(kh, kw, len(ks) * c, repeat * o)
  n_src = -(-n_out // repeat)
  lo, hi = -ks[0], max(0, ks[-1] + n_src - t)
  xp = jnp.pad(x, ((0, 0), (lo, hi)) + ((0, 0),) * (x.ndim - 2))
  stacked = jnp.concatenate([xp[:, lo + k: lo + k + n_src] for k in ks], axis=-1)
  y = jax.lax.conv_general_dilated(
      stacked.reshape(b * n_src, *stacked.shape[2:]), folded.astype(x.dtype),
      window_strides=tuple(strides[1:]), padding=spatial,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
  y = jnp.moveaxis(y.reshape(b, n_src, *y.shape[1:-1], repeat, o), -2, 2)
  if phases:
    if n_out != repeat * n_src:
      raise ValueError(f"phases=True needs {repeat} output frames per source frame, got {n_out} "
                       f"output frames from {t}")
    return y
  return y.reshape(b, repeat * n_src, *y.shape[3:])[:, :n_out]


def conv_by_taps(x, kernel, precision=None, platform: Optional[str] = None):
  """A stride-1 VALID 3-D conv as one matmul to every tap's outputs, then a shifted sum.

  For kernels with few output channels, XLA:CPU's conv runs at a small fraction of its usual
  speed (the decoder's 3x3x3 128 -> 3 `conv_out` took 0.33 s on a 17x64x64 clip); the matmul
  `x @ K` with `K (C, taps*O)` runs at full speed and the shifted sum touches only
  `taps*O <= C` channels (0.011 s). The backward is written out the same way: the cotangent is
  spread to every tap (padding), then two matmuls. Sums accumulate in at least float32. On a
  "cpu" `platform` (default `target_platform()`) `dx` is tied to `dk` (`early_weight_grad`).
  Its ops run under the name scope "conv_by_taps" (visible in the HLO's op names).
  """
  tie = (platform or target_platform()) == "cpu"  # chosen here, not when the backward is traced
  kt, kh, kw, c, o = kernel.shape
  b, t, h, w, _ = x.shape
  out_shape = (b, t - kt + 1, h - kh + 1, w - kw + 1)
  acc = at_least_f32(x.dtype)
  offsets = [(i, j, l) for i in range(kt) for j in range(kh) for l in range(kw)]

  def flat(kernel):  # (C, taps*O), taps in `offsets` order
    return kernel.transpose(3, 0, 1, 2, 4).reshape(c, kt * kh * kw * o)

  @jax.named_scope("conv_by_taps")
  def forward(x, kernel):
    z = jnp.einsum("bthwc,cq->bthwq", x, flat(kernel), precision=precision,
                   preferred_element_type=acc).reshape(b, t, h, w, len(offsets), o)
    y = sum(z[:, i:i + out_shape[1], j:j + out_shape[2], l:l + out_shape[3], n]
            for n, (i, j, l) in enumerate(offsets))
    return y.astype(x.dtype)

  @jax.custom_vjp
  def conv(x, kernel):
    return forward(x, kernel)

  def fwd(x, kernel):
    return forward(x, kernel), (x, kernel)

  @jax.named_scope("conv_by_taps")
  def bwd(res, dy):
    x, kernel = res
    dy = dy.astype(acc)
    dz = jnp.stack([jnp.pad(dy, ((0, 0), (i, kt - 1 - i), (j, kh - 1 - j), (l, kw - 1 - l),
                                 (0, 0))) for i, j, l in offsets], axis=-2)
    dz = dz.reshape(b, t, h, w, len(offsets) * o)
    dx = jnp.einsum("bthwq,cq->bthwc", dz, flat(kernel).astype(acc), precision=precision)
    dk = jnp.einsum("bthwc,bthwq->cq", x.astype(acc), dz, precision=precision)
    dk = dk.reshape(c, kt, kh, kw, o).transpose(1, 2, 3, 0, 4)
    if tie:
      dx = tie_to(dx, dk)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)

  conv.defvjp(fwd, bwd)
  return conv(x, kernel)


@jax.named_scope("tie_to")
def tie_to(dx, dk):
  """`dx + 0 * dk[0]`: dx now waits for dk (see `early_weight_grad`). Named scope "tie_to"."""
  return dx + jax.lax.stop_gradient(dk.reshape(-1)[0]).astype(dx.dtype) * 0


def early_weight_grad(f, platform: Optional[str] = None):
  """`f(x, kernel)` whose backward pass makes the input cotangent depend on the kernel's.

  XLA:CPU defers weight-gradient convs to the end of the backward pass (they only feed outputs),
  which keeps every layer's input alive until then: the released decoder's backward holds
  3.3 GB of temporaries with parameter gradients and 1.2 GB without. Tying `dx` to `dk`
  (`dx + 0 * dk[0]`, which XLA may not fold: 0 * NaN is NaN) frees each input once its layer is
  done. For any `platform` (default `target_platform()`) but "cpu", `f` is returned unchanged.
  """
  if (platform or target_platform()) != "cpu":
    return f

  @jax.custom_vjp
  def g(x, kernel):
    return f(x, kernel)

  def fwd(x, kernel):
    return f(x, kernel), (x, kernel)

  def bwd(res, ct):
    _, vjp = jax.vjp(f, *res)
    dx, dk = vjp(ct)
    return tie_to(dx, dk), dk

  g.defvjp(fwd, bwd)
  return g


def time_pad_front(x, n: int, mode: str):
  """Pads `n` frames in front of axis 1: zeros (`constant`) or copies of frame 0 (`replicate`)."""
  if n == 0:
    return x
  if mode == "replicate":
    front = jnp.repeat(x[:, :1], n, axis=1)
  else:
    front = jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
  return jnp.concatenate([front, x], axis=1)


def _spatial_pads(kh: int, kw: int, sh: int, sw: int):
  ph, pw = (kh - 1) + (1 - sh), (kw - 1) + (1 - sw)
  return (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)


class CausalConv(nn.Module):
  """Causal conv over `(B, T, H, W, C)`: time padded in front only, then a VALID conv.

  Covers the official `CausalConv3d` (kernel `(kt, kh, kw)`) and `CausalConv1d` (kernel
  `(k, 1, 1)`), v1.0 and v1.1. Time pad `pt = (kt - 1) + (1 - st)` frames; spatial pad split
  floor/ceil. Output frames: `(T + pt - kt) // st + 1`.

  * v1.0: `pad_mode="constant"` zero-pads every axis; `pad_mode="replicate"` replicate-pads every
    axis, falling back to zeros on all axes when `pt >= T` (as the official code does).
  * v1.1: time is always padded with copies of frame 0 (first chunk) or with the last `pt` frames
    of `cache` (later chunks); space uses `pad_mode`.

  Streaming (both versions): with `return_cache=True` the call also returns the new cache, the
  last `pt` frames of the time-padded input once its last `cache_offset` frames (the overlap
  frames of v1.1 tiled decoding; a call argument overrides the attribute) are dropped. A v1.0
  conv given a cache continues its zero-padded whole-clip computation exactly.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3, 3)
  strides: Sequence[int] = (1, 1, 1)
  version: str = "v1.0"
  pad_mode: str = "constant"
  cache_offset: int = 0
  zero_init: bool = False
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @property
  def time_pad(self) -> int:
    return (self.kernel_size[0] - 1) + (1 - self.strides[0])

  @nn.compact
  def __call__(self, x, cache: Optional[Cache] = None, return_cache: bool = False,
               cache_offset: Optional[int] = None, time_repeat: int = 1):
    """`time_repeat=2` (whole clips only: no `cache`, no `return_cache`): the conv of
    `jnp.repeat(x, 2, axis=1)`, computed from `x` and returned phase by phase, `(B, T, 2, H, W,
    O)` (`Conv`'s `time_repeat`)."""
    kt, kh, kw = self.kernel_size
    _, sh, sw = self.strides
    pt = self.time_pad
    if self.version == "v1.0":
      # v1.0 derives the width pad from the height kernel (identical for square kernels).
      hpad, wpad = _spatial_pads(kh, kh, sh, sw)
      mode = self.pad_mode if (self.pad_mode == "constant" or pt < x.shape[1]) else "constant"
      first_mode = mode
    else:
      hpad, wpad = _spatial_pads(kh, kw, sh, sw)
      mode, first_mode = self.pad_mode, "replicate"
    conv = Conv(self.features, tuple(self.kernel_size), tuple(self.strides), "VALID",
                zero_init=self.zero_init, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision, name="conv")
    if time_repeat != 1:
      if (cache is not None or return_cache or mode != "constant"
          or (first_mode != "constant" and pt % time_repeat)):
        raise ValueError("time_repeat needs a whole clip (no cache), zero spatial padding and, "
                         "with replicated front frames, a time pad that is a whole number of "
                         f"source frames (got pad {pt}, repeat {time_repeat})")
      if first_mode != "constant":  # copies of frame 0: whole source frames in front
        x, pt = time_pad_front(x, pt // time_repeat, first_mode), 0
      return conv(x, padding=((pt, 0), hpad, wpad), time_repeat=time_repeat)
    if cache is None and not return_cache and mode == "constant":
      # Zeros in front (v1.0) and around: the conv pads, so no padded copy of x is written.
      tpad = (pt, 0) if first_mode == "constant" else (0, 0)
      if first_mode != "constant":
        x = time_pad_front(x, pt, first_mode)
      return conv(x, padding=(tpad, hpad, wpad))
    if cache is None:
      padded = time_pad_front(x, pt, first_mode)
    else:
      padded = jnp.concatenate([cache.astype(x.dtype), x], axis=1) if pt else x
    if hpad != (0, 0) or wpad != (0, 0):
      pads = ((0, 0), (0, 0), hpad, wpad, (0, 0))
      padded = jnp.pad(padded, pads, mode="edge" if mode == "replicate" else "constant")
    y = conv(padded)
    if not return_cache:
      return y
    offset = self.cache_offset if cache_offset is None else cache_offset
    kept = padded[:, : padded.shape[1] - offset]
    kept = kept[:, :, hpad[0]: kept.shape[2] - hpad[1], wpad[0]: kept.shape[3] - wpad[1]]
    if kept.shape[1] < pt:
      raise ValueError(f"a chunk of {x.shape[1]} frames is too short to leave a cache of {pt} "
                       f"frames after dropping {offset} overlap frames")
    return y, kept[:, kept.shape[1] - pt:]


_RESAMPLE = ("AlphaBlender", "Downsample", "Upsample", "TimeDownsample", "TimeUpsample",
             "trilinear_time_2x", "nearest_time_2x")


def __getattr__(name):
  """The resamplers, moved to `models.resample` (which imports this module: resolved lazily)."""
  if name in _RESAMPLE:
    from vidtok_jax.models import resample

    return getattr(resample, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
