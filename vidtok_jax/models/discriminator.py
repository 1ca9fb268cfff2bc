"""PatchGAN discriminators of the training, channels-last, with PyTorch BatchNorm semantics.

`PatchDiscriminator(dims=2)` (taming-transformers PatchGAN) on frames `(N, H, W, C)` and
`PatchDiscriminator(dims=3)` on clips `(B, T, H, W, C)`. Submodule names mirror the torch
`nn.Sequential` indices (`main.<i>.weight` -> `main_<i>/kernel`), so
`disc_params_from_torch` is a pure re-layout.

Layer plan for `n_layers = L` (torch index in brackets; LeakyReLU(0.2) after every conv but
the last):
  [0]          conv ndf, stride 2, bias
  [3n-1, 3n]   conv ndf*min(2^n, 8), no bias + BatchNorm, for n = 1 .. L-1 (2-D stride 2;
               3-D stride (2,2,2) for n = 1, else (1,2,2))
  [3L-1, 3L]   conv ndf*min(2^L, 8), stride 1, no bias + BatchNorm
  [3L+2]       conv 1 channel, stride 1, bias
Kernels 4 (2-D) / 3 (3-D), zero padding 1 on every spatial/temporal side.
"""

import math
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LEAKY_SLOPE = 0.2


def layer_plan(ndf, n_layers, dims):
  """[(torch_index, out_channels, strides, use_bias, has_batchnorm)] for the convs, in order."""
  if dims not in (2, 3):
    raise ValueError(f"dims must be 2 or 3, got {dims}")
  if n_layers < 1:
    raise ValueError(f"n_layers must be >= 1, got {n_layers}")

  def stride(n):  # n = 0 for the first conv, 1..L-1 for the middle ones
    if dims == 2:
      return (2, 2)
    return (2 if n <= 1 else 1, 2, 2)

  plan = [(0, ndf, stride(0), True, False)]
  for n in range(1, n_layers):
    plan.append((3 * n - 1, ndf * min(2**n, 8), stride(n), False, True))
  plan.append((3 * n_layers - 1, ndf * min(2**n_layers, 8), (1,) * dims, False, True))
  plan.append((3 * n_layers + 2, 1, (1,) * dims, True, False))
  return plan


def _torch_bias_init(fan_in):
  # weights_init leaves conv biases at PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _bn_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class TorchBatchNorm(nn.Module):
  """BatchNorm over every axis but the last, exactly as `torch.nn.BatchNorm{2,3}d`.

  Train mode normalises with the biased batch variance and updates the running variance with
  the UNBIASED one (n/(n-1)); flax `nn.BatchNorm` stores the biased one, hence this module.
  Statistics and normalisation are at least float32 (bf16 compute is promoted).

  Input `(..., C)`; output same shape in `dtype`. Running stats: `batch_stats/{mean,var}`.
  """

  momentum: float = 0.9  # flax convention: new = momentum * old + (1 - momentum) * batch
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    stat_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    scale = self.param("scale", _bn_scale_init, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), stat_dtype)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), stat_dtype)
    xf = x.astype(jnp.promote_types(x.dtype, stat_dtype))
    if train:
      n = xf.size // c
      if n < 2:
        raise ValueError(
            f"BatchNorm in train mode needs > 1 value per channel, got input {x.shape}")
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)  # two-pass: no E[x^2]-E[x]^2 cancellation
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var) * (n / (n - 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale.astype(xf.dtype))
    return (y + bias.astype(xf.dtype)).astype(self.dtype)


class PatchDiscriminator(nn.Module):
  """PatchGAN of `dims` 2 (frames) or 3 (clips); logits float32 (float64 with float64 params).

  dims=2: `(N, H, W, C)` -> `(N, H', W', 1)`; 128x128 -> 14x14 and 256x256 -> 30x30 for
  n_layers=3. dims=3: `(B, T, H, W, C)` -> `(B, T', H', W', 1)`; 17x128x128 -> 5x16x16.
  `train=True` uses batch statistics and updates `batch_stats` (apply with
  `mutable=["batch_stats"]`). The params tree does not depend on the class name, only on the
  layer plan: `main_<torch index>`.
  """

  dims: int
  ndf: int = 64
  n_layers: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    plan = layer_plan(self.ndf, self.n_layers, self.dims)  # validates dims and n_layers
    if x.ndim != self.dims + 2:
      layout = "(N, H, W, C)" if self.dims == 2 else "(B, T, H, W, C)"
      raise ValueError(f"PatchDiscriminator(dims={self.dims}) expects {layout}, got {x.shape}")
    kernel = (4 if self.dims == 2 else 3,) * self.dims  # taming 2-D: 4; VidTok 3-D: 3
    h = x.astype(self.dtype)
    for j, (idx, feats, strides, use_bias, has_bn) in enumerate(plan):
      fan_in = h.shape[-1] * math.prod(kernel)
      h = nn.Conv(
          feats,
          kernel,
          strides=strides,
          padding=((1, 1),) * self.dims,
          use_bias=use_bias,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          kernel_init=nn.initializers.normal(0.02),
          bias_init=_torch_bias_init(fan_in),
          name=f"main_{idx}",
      )(h)
      if has_bn:
        h = TorchBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f"main_{idx + 1}")(h, train)
      if j < len(plan) - 1:
        h = nn.leaky_relu(h, LEAKY_SLOPE)
    # logits feed f32 loss reductions
    return h.astype(jnp.promote_types(self.param_dtype, jnp.float32))


def _deprecated(old, dims):
  def make(*args, **kwargs):
    warnings.warn(f"{old}(...) is deprecated; use PatchDiscriminator(dims={dims}, ...) "
                  "(same params tree)", DeprecationWarning, stacklevel=2)
    return PatchDiscriminator(dims, *args, **kwargs)

  make.__name__ = make.__qualname__ = old
  make.__doc__ = f"Deprecated: `PatchDiscriminator(dims={dims}, ...)`; kept for one release."
  return make


# Old names (one release): same arguments as before, they return a `PatchDiscriminator`.
NLayerDiscriminator = _deprecated("NLayerDiscriminator", 2)
NLayerDiscriminator3D = _deprecated("NLayerDiscriminator3D", 3)


def _to_numpy(v):
  if hasattr(v, "detach"):  # torch tensor, without importing torch
    v = v.detach().cpu().numpy()
  return np.asarray(v)


def disc_params_from_torch(state_dict, prefix="loss.discriminator."):
  """Torch discriminator state_dict -> `{"params": ..., "batch_stats": ...}` for our modules.

  The structure (2-D/3-D, ndf, n_layers, input channels) is read from the weights and every
  expected key is checked; errors name the torch key. `num_batches_tracked` is ignored
  (momentum is fixed, so torch never reads it). Leaves are host numpy float32 arrays (the
  caller places them, e.g. with `jax.device_put` and its shardings).
  """
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  first = "main.0.weight"
  if first not in sd:
    raise KeyError(f"missing discriminator key {prefix}{first}")
  w0 = _to_numpy(sd[first])
  dims = w0.ndim - 2
  if dims not in (2, 3):
    raise ValueError(f"{prefix}{first}: expected a 4-D or 5-D conv weight, got shape {w0.shape}")
  ndf, c_in, ksize = w0.shape[0], w0.shape[1], w0.shape[2]
  parts = [k.split(".") for k in sd]
  indices = {int(p[1]) for p in parts if len(p) > 2 and p[0] == "main" and p[1].isdigit()}
  if not indices or any(p[0] != "main" for p in parts):
    raise ValueError(f"unexpected discriminator keys: "
                     f"{sorted(prefix + k for k in sd if not k.startswith('main.'))}")
  last = max(indices)
  if (last - 2) % 3 or last < 5:
    raise ValueError(f"{prefix}main.{last}: last layer index does not fit an n-layer PatchGAN")
  n_layers = (last - 2) // 3
  perm = (2, 3, 1, 0) if dims == 2 else (2, 3, 4, 1, 0)
  kernel = (ksize,) * dims

  used = set()

  def take(key, shape):
    if key not in sd:
      raise KeyError(f"missing discriminator key {prefix}{key}")
    v = _to_numpy(sd[key])
    if v.shape != tuple(shape):
      raise ValueError(f"{prefix}{key}: shape {v.shape}, expected {tuple(shape)}")
    used.add(key)
    return v.astype(np.float32)

  params, stats = {}, {}
  prev = c_in
  for idx, feats, _, use_bias, has_bn in layer_plan(ndf, n_layers, dims):
    w = take(f"main.{idx}.weight", (feats, prev) + kernel)
    conv = {"kernel": np.ascontiguousarray(np.transpose(w, perm))}
    if use_bias:
      conv["bias"] = take(f"main.{idx}.bias", (feats,))
    params[f"main_{idx}"] = conv
    if has_bn:
      b = idx + 1
      params[f"main_{b}"] = {"scale": take(f"main.{b}.weight", (feats,)),
                             "bias": take(f"main.{b}.bias", (feats,))}
      stats[f"main_{b}"] = {"mean": take(f"main.{b}.running_mean", (feats,)),
                            "var": take(f"main.{b}.running_var", (feats,))}
      used.add(f"main.{b}.num_batches_tracked")
    prev = feats
  extra = sorted(set(sd) - used)
  if extra:
    raise ValueError(f"unexpected discriminator keys: {[prefix + k for k in extra]}")
  return {"params": params, "batch_stats": stats}
