"""Latent regularizers: diagonal Gaussian (KL) and FSQ with straight-through rounding.

Both act on channels-last latents `(B, T', H', W', C)`.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


# ----------------------------------------------------------------------------------------------
# Diagonal Gaussian


def gaussian_posterior(moments):
  """Splits encoder moments `(..., 2C)` into `mean` and clamped `logvar` (first half = mean)."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def gaussian_kl(mean, logvar):
  """`sum(0.5 * (mean^2 + var - 1 - logvar)) / B`, summed in (at least) float32."""
  dtype = jnp.promote_types(mean.dtype, jnp.float32)
  mean, logvar = mean.astype(dtype), logvar.astype(dtype)
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(kl) / mean.shape[0]


def gaussian_sample(mean, logvar, noise):
  """`mean + exp(logvar / 2) * noise`."""
  return mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype)


class DiagonalGaussianRegularizer(nn.Module):
  """KL regularizer: returns `z` (the mean, or a sample with `sample=True` and a "sample" rng)
  and `{"mean", "logvar", "kl_loss"}`. No parameters."""

  @nn.compact
  def __call__(self, moments, sample: bool = False):
    mean, logvar = gaussian_posterior(moments)
    if sample:
      noise = jax.random.normal(self.make_rng("sample"), mean.shape, jnp.float32)
      z = gaussian_sample(mean, logvar, noise)
    else:
      z = mean
    return z, {"mean": mean, "logvar": logvar, "kl_loss": gaussian_kl(mean, logvar)}


# ----------------------------------------------------------------------------------------------
# FSQ


def round_ste(x):
  """Round half to even with a straight-through (identity) gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def entropy_weight(step, weight: float, annealing_steps: int, annealing_factor: float):
  """`w(n)`: linear from `factor * w` at n=0 to `w` at n=annealing_steps, then constant."""
  step = jnp.asarray(step, jnp.float32)
  start = annealing_factor * weight
  annealed = start - (step / annealing_steps) * (start - weight)
  return jnp.where(step >= annealing_steps, weight, annealed)


class FSQ:
  """Finite scalar quantisation arithmetic for `levels` (channel 0 = least significant digit)."""

  def __init__(self, levels: Sequence[int]):
    self.levels = tuple(int(l) for l in levels)
    self.codebook_size = int(np.prod(self.levels))
    lv = np.asarray(self.levels, np.float64)
    self.half_width = np.asarray([l // 2 for l in self.levels], np.float32)
    self.basis = np.cumprod([1] + list(self.levels[:-1])).astype(np.int64)
    half_l = (lv - 1) * (1 + 1e-3) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    self._half_l = half_l.astype(np.float32)
    self._offset = offset.astype(np.float32)
    self._shift = np.arctanh(offset / half_l).astype(np.float32)

  def bound(self, z):
    return jnp.tanh(z + self._shift) * self._half_l - self._offset

  def quantize(self, z):
    """Straight-through codes in `{-L//2 .. L//2 - (1 - L%2)} / (L//2)`; float32."""
    return round_ste(self.bound(z.astype(jnp.float32))) / self.half_width

  def codes_to_indices(self, codes):
    digits = jnp.round(codes * self.half_width + self.half_width).astype(jnp.int32)
    return jnp.sum(digits * self.basis.astype(np.int32), axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices):
    idx = jnp.asarray(indices, jnp.int32)[..., None]
    digits = (idx // self.basis.astype(np.int32)) % np.asarray(self.levels, np.int32)
    return (digits.astype(jnp.float32) - self.half_width) / self.half_width

  def codebook(self, start, size):
    """Rows `start .. start+size-1` of the implicit codebook, `(size, D)` float32."""
    return self.indices_to_codes(start + jnp.arange(size, dtype=jnp.int32))


def _entropy(p, axis=-1):
  return -jnp.sum(p * jnp.log(jnp.maximum(p, _EPS)), axis=axis)


_EPS = 1e-5  # the official clamp inside log


def _balanced_split(levels: Sequence[int]) -> int:
  """The split point `s` of the dims making `prod(levels[:s])` and `prod(levels[s:])` closest."""
  sizes = [max(int(np.prod(levels[:s])), int(np.prod(levels[s:]))) for s in range(len(levels) + 1)]
  return int(np.argmin(sizes))


def _joint_log_probs(log_qs):
  """Per-dim log-probabilities `[(N, L_d)]` -> the log-probabilities of their product `(N, prod L)`."""
  out = jnp.zeros((log_qs[0].shape[0] if log_qs else 1, 1), jnp.float32)
  for lq in log_qs:
    out = (out[:, :, None] + lq[:, None, :]).reshape(out.shape[0], -1)
  return out


def fsq_entropy_terms(fsq: FSQ, z, inv_temperature: float = 100.0):
  """`(per_sample_entropy, codebook_entropy)` of `p = softmax_k(2 inv_t z . c_k)` over all K codes.

  `z`: `(N, D)` float32 raw (unbounded) latents. The logits are a sum over the D dims, so `p` is
  the product of D per-dim softmaxes; the dims are split into two groups, `p_k = a_i b_j` with
  `a`, `b` of about sqrt(K) entries each, and nothing of size `N x K` is built (the
  dense form needs ~1 MiB per token at K = 262,144):
  * per-sample `H(p) = -sum p log max(p, eps)`: with `b` sorted, `a_i b_j >= eps` holds for a
    suffix of `j`, so each `i` needs one search and prefix/suffix sums, `O(N sqrt(K) log K)`;
  * codebook entropy: `avg_p = A^T B / N` is one `(sqrt K x N) @ (N x sqrt K)` matmul.
  The same values as the dense form (float32 rounding aside), with the same gradients.
  """
  n = z.shape[0]
  scale = 2.0 * inv_temperature
  log_qs = []
  for d, levels in enumerate(fsq.levels):
    half = levels // 2
    values = (np.arange(levels, dtype=np.float32) - half) / half  # code values of dim d
    log_qs.append(jax.nn.log_softmax(scale * z[:, d:d + 1] * values, axis=-1))
  s = _balanced_split(fsq.levels)
  log_a, log_b = _joint_log_probs(log_qs[:s]), _joint_log_probs(log_qs[s:])
  if log_a.shape[0] != n:  # an empty group: the constant distribution {1}
    log_a = jnp.broadcast_to(log_a, (n, 1))
  if log_b.shape[0] != n:
    log_b = jnp.broadcast_to(log_b, (n, 1))
  a, b = jnp.exp(log_a), jnp.exp(log_b)

  # Per-sample entropy. Sorting b ascending, a_i b_j >= eps <=> j >= m_i; below, log is clamped.
  log_bs = jnp.sort(log_b, axis=-1)
  bs = jnp.exp(log_bs)
  m = jax.vmap(lambda row, q: jnp.searchsorted(row, q, side="left"))(
      log_bs, np.float32(np.log(_EPS)) - log_a)
  zero = jnp.zeros((n, 1), jnp.float32)
  below = jnp.concatenate([zero, jnp.cumsum(bs, axis=-1)], axis=-1)  # sum_{j<m} b_j
  above = jnp.concatenate([jnp.cumsum(bs[:, ::-1], axis=-1)[:, ::-1], zero], axis=-1)
  above_blogb = jnp.concatenate(
      [jnp.cumsum((bs * log_bs)[:, ::-1], axis=-1)[:, ::-1], zero], axis=-1)
  take = lambda t: jnp.take_along_axis(t, m, axis=-1)
  h = -jnp.sum(a * (log_a * take(above) + take(above_blogb) + np.log(_EPS) * take(below)),
               axis=-1)

  # Codebook entropy of the token-mean distribution (a K-vector, whatever the order of codes).
  avg_p = jnp.dot(a.T, b, precision="highest") / n
  return jnp.mean(h), _entropy(avg_p.reshape(-1))


class FSQRegularizer(nn.Module):
  """`FSQRegularizer`: `(B, T', H', W', dim) -> codes (same shape), {"indices", "aux_loss", ...}`.

  With `dim != len(levels)` a `project_in` / `project_out` Dense maps to/from the code space.
  The aux loss (entropy + commitment) uses the raw projected z and the entropy weight
  annealed to `step`; `compute_aux=False` skips it (its exact factorised form costs `O(N sqrt(K) log K)`).
  """

  levels: Sequence[int]
  dim: Optional[int] = None
  entropy_loss_weight: float = 0.1
  entropy_loss_annealing_steps: int = 2000
  entropy_loss_annealing_factor: float = 3.0
  commitment_loss_weight: float = 0.25
  diversity_gamma: float = 1.0
  param_dtype: Dtype = jnp.float32

  @property
  def fsq(self) -> FSQ:
    return FSQ(self.levels)

  @property
  def has_projections(self) -> bool:
    return self.dim is not None and self.dim != len(self.levels)

  def setup(self):
    if self.has_projections:
      dense = lambda n: nn.Dense(n, param_dtype=self.param_dtype, precision="highest")
      self.project_in = dense(len(self.levels))
      self.project_out = dense(self.dim)

  def _project_out(self, codes):
    return self.project_out(codes) if self.has_projections else codes

  def indices_to_codes(self, indices):
    """`(B, T', H', W')` int -> `(B, T', H', W', dim)` float32 (after `project_out`)."""
    return self._project_out(self.fsq.indices_to_codes(indices))

  def __call__(self, z, step=0, compute_aux: bool = True):
    fsq = self.fsq
    in_dtype = z.dtype
    z = z.astype(jnp.float32)
    if self.has_projections:
      z = self.project_in(z)
    codes = fsq.quantize(z)
    aux = {"indices": fsq.codes_to_indices(codes)}
    if compute_aux and (self.entropy_loss_weight > 0 or self.commitment_loss_weight > 0):
      flat = z.reshape(-1, z.shape[-1])
      per_sample, codebook_ent = fsq_entropy_terms(fsq, flat)
      commit = jnp.mean(jnp.square(z - jax.lax.stop_gradient(codes)))
      w = entropy_weight(step, self.entropy_loss_weight, self.entropy_loss_annealing_steps,
                         self.entropy_loss_annealing_factor)
      entropy_aux = per_sample - self.diversity_gamma * codebook_ent
      aux.update(per_sample_entropy=per_sample, codebook_entropy=codebook_ent,
                 commit_loss=commit,
                 aux_loss=entropy_aux * w + self.commitment_loss_weight * commit)
    return self._project_out(codes).astype(in_dtype), aux
