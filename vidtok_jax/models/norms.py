"""Norms of the VidTok autoencoder: LayerNorm / GroupNorm over channels-last `(B, T, H, W, C)`.

Statistics are computed in float32 (float64 for a float64 model); the output is cast back to the
input's dtype. The optional SiLU after the norm (every use in the model but the attention's) is
applied to that output, so `normalize(..., silu=True)(x)` is exactly `silu(normalize(...)(x))`.

Measured and kept out (2026-12-07, TPU v5e program of the stage-1 train step, 17x64^2 per chip,
bf16): a `custom_vjp` norm + SiLU whose backward pass keeps only the bf16 input and recomputes
the rest raised XLA's bytes accessed from 80.5 to 82.1 GB per chip-step: the recomputation adds
passes over the activation that JAX's own derivative, fused by XLA, does not make.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vidtok_jax.models.platform import target_platform, tracing_for_training

Dtype = Any

STATS_AXES = {"frame": (2, 3), "clip": (1, 2, 3), "pixel": (1,), "position": ()}


class NormCore(nn.Module):
  """Group/Layer norm with explicit statistics axes (biased variance, float32 statistics).

  `groups=1, reduce_axes=()` is LayerNorm over channels. `reduce_axes` are axes of the
  `(B, T, H, W, C)` input, besides the channels of a group, that share statistics: `(2, 3)` per
  frame, `(1, 2, 3)` per clip, `(1,)` per pixel over time, `()` per position. `silu=True`
  applies SiLU to the output (after the cast to the input's dtype).
  """

  groups: int = 1
  reduce_axes: Sequence[int] = ()
  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.groups:
      raise ValueError(f"GroupNorm needs channels ({c}) divisible by groups ({self.groups})")
    scale = self.param("scale", nn.initializers.ones_init(), (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (c,), self.param_dtype)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    if acc != x.dtype and target_platform() == "tpu" and not tracing_for_training():
      # Inference on TPU (measured there only; GPU and CPU programs are left as they were):
      # XLA fused the cast below into the conv that produces `x`, which then wrote its whole
      # output in float32 (twice the bytes) for the norm's reads. Behind the barrier the conv
      # writes the compute dtype and the cast stays in the norm's own fusions: HBM bytes of the
      # v5e decode of a 17x128^2 clip 13.2 -> 11.7 GB (measured with two-pass statistics). In
      # a train step the barrier (and its transpose in the backward pass) blocked more fusions
      # than it saved: v5e stage-1 step, 2 clips/chip, 176.0 -> 181.5 GB of HBM, so training
      # traces (`training_forms`) do without it. Float32 models never have it.
      x = jax.lax.optimization_barrier(x)
    xg = x.astype(acc).reshape(*x.shape[:-1], self.groups, c // self.groups)
    axes = tuple(self.reduce_axes) + (xg.ndim - 1,)
    mean = xg.mean(axes, keepdims=True)
    if target_platform() == "tpu":
      # One pass over the activation for both statistics (E[x^2] - E[x]^2 in float32, floored at
      # 0, as flax's `use_fast_variance`): XLA fuses the two sibling reductions into one read,
      # where the two-pass variance needs the mean first and then reads the whole activation
      # again. v5e encode / decode of a 17x128^2 clip: 12.9 -> 11.5 / 21.9 -> 19.7 GB accessed;
      # stage-1 step, 17x64^2 per chip: 80.4 -> 78.5 GB (hence in training traces too).
      # Its rounding grows with (mean / std)^2 of a group (float32: ~1e-7 of it, relative);
      # the official vectors are met at the same tolerances (autoencoder_test). Measured and
      # kept out: shifting the data by one of their values per group (the usual cure for that
      # cancellation) raised the encode to 23.2 GB (its full-resolution blocks 3.6 -> 9.2 GB).
      # GPU and CPU programs keep the two-pass form (not measured there).
      var = jnp.maximum(jnp.square(xg).mean(axes, keepdims=True) - jnp.square(mean), 0)
    else:
      var = jnp.square(xg - mean).mean(axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    y = (y * scale + bias).astype(x.dtype)
    return nn.silu(y) if self.silu else y


class LayerNorm(nn.Module):
  """The official `LayerNorm` wrapper (params under a child named `norm`), over channels."""

  param_dtype: Dtype = jnp.float32
  silu: bool = False

  @nn.compact
  def __call__(self, x):
    return NormCore(1, (), param_dtype=self.param_dtype, silu=self.silu, name="norm")(x)


def normalize(norm_type: str, stats: str, name: Optional[str], param_dtype=jnp.float32,
              silu: bool = False) -> nn.Module:
  """`Normalize(C, norm_type)`; `stats` picks GroupNorm's statistics (see STATS_AXES);
  `silu=True` is `silu(Normalize(x))` as one function (see the module docstring)."""
  if norm_type == "layernorm":
    return LayerNorm(param_dtype=param_dtype, silu=silu, name=name)
  if norm_type == "groupnorm":
    return NormCore(32, STATS_AXES[stats], param_dtype=param_dtype, silu=silu, name=name)
  raise ValueError(f"norm_type must be 'layernorm' or 'groupnorm', got {norm_type!r}")
