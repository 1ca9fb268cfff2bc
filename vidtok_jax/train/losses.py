"""Training losses of VidTok (reconstruction, GAN, LeCAM) as pure functions.

Everything here is a function of arrays: discriminator logits, gradient norms, the learned
`logvar`, the global step. Nothing calls a model, so the train step decides how to get logits and
gradients (one generator forward, `jax.vjp`, ...). Schedules are `jnp.where` on the step array,
so all functions are jit-safe with a traced step.

Layouts: videos `(B, T, H, W, C)`; logits any shape with the sample axis first
(2-D disc on folded frames: `(B*T, h, w, 1)`, 3-D disc: `(B, t, h, w, 1)`).
All reductions are float32 (or float64 under x64 for parity tests).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Defaults of the released VidTok training configs (`GeneralLPIPSWithDiscriminator` params).
DISC_START = 20001
DISC_WEIGHT = 0.2
LECAM_WEIGHT = 0.005
LECAM_DECAY = 0.999
REGULARIZATION_WEIGHTS = {"aux_loss": 1.0, "kl_loss": 1e-6}


def _float(x):
  """float64 stays float64 (x64 parity tests); everything else is reduced in float32."""
  x = jnp.asarray(x)
  return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


# ------------------------------------------------------------------ GAN terms


def hinge_d_loss(logits_real, logits_fake):
  """`0.5 * (mean relu(1 - real) + mean relu(1 + fake))` -> scalar."""
  real, fake = _float(logits_real), _float(logits_fake)
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def vanilla_d_loss(logits_real, logits_fake):
  """`0.5 * (mean softplus(-real) + mean softplus(fake))` -> scalar."""
  real, fake = _float(logits_real), _float(logits_fake)
  return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def sigmoid_cross_entropy_with_logits(labels, logits):
  """Elementwise, stable: `relu(l) - l*y + log1p(exp(-|l|))` (same shape as `logits`)."""
  logits = _float(logits)
  return jax.nn.relu(logits) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def non_saturating_gen_loss(logits_fake):
  """Patch logits averaged PER SAMPLE first (as officially), then BCE with label 1, batch mean.

  logits_fake: `(N, ...)` -> scalar `mean_n softplus(-mean_patches(logits[n]))`.
  """
  per_sample = jnp.mean(_float(logits_fake).reshape(logits_fake.shape[0], -1), axis=-1)
  return jnp.mean(sigmoid_cross_entropy_with_logits(1.0, per_sample))


def plain_gen_loss(logits_fake):
  """`-mean(logits)` (configs with `gen_loss_cross_entropy: false`) -> scalar."""
  return -jnp.mean(_float(logits_fake))


# ------------------------------------------------------------------ LeCAM


class LeCAMState(NamedTuple):
  """EMAs of the mean real / fake logits (scalars; official: Python floats, init 0)."""

  real_ema: jax.Array
  fake_ema: jax.Array


def lecam_init(value=0.0, dtype=jnp.float32):
  return LeCAMState(jnp.asarray(value, dtype), jnp.asarray(value, dtype))


def lecam_update(state, logits_real, logits_fake, decay=LECAM_DECAY):
  """EMA update with the batch-mean logits; no gradient flows (official uses `.item()`)."""
  real = jax.lax.stop_gradient(jnp.mean(_float(logits_real)))
  fake = jax.lax.stop_gradient(jnp.mean(_float(logits_fake)))
  dt = state.real_ema.dtype
  return LeCAMState(
      (state.real_ema * decay + real * (1 - decay)).astype(dt),
      (state.fake_ema * decay + fake * (1 - decay)).astype(dt),
  )


def lecam_reg(logits_real, logits_fake, state):
  """`mean(relu(real - fake_ema)^2) + mean(relu(real_ema - fake)^2)` -> scalar."""
  real, fake = _float(logits_real), _float(logits_fake)
  return (jnp.mean(jnp.square(jax.nn.relu(real - state.fake_ema)))
          + jnp.mean(jnp.square(jax.nn.relu(state.real_ema - fake))))


# ------------------------------------------------------------------ weights and schedules


def disc_factor(step, disc_start=DISC_START, factor=1.0):
  """`factor` once `step >= disc_start`, else 0 (step is the doubled Lightning counter)."""
  return jnp.where(jnp.asarray(step) >= disc_start, factor, 0.0).astype(jnp.float32)


def global_norm(tree):
  """L2 norm over all leaves (`torch.norm` of a gradient tensor for a single array)."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(_float(g))) for g in leaves))


def adaptive_weight(nll_grad_norm, g_grad_norm, disc_weight=DISC_WEIGHT):
  """`clamp(|grad nll| / (|grad g| + 1e-4), 0, 1e4) * disc_weight`, stop-gradient.

  The norms are of the gradients w.r.t. the decoder's last conv weight (`conv_out` kernel).
  """
  w = _float(nll_grad_norm) / (_float(g_grad_norm) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4)) * disc_weight


def regularization_loss(reg_log, weights=None):
  """`sum_k weights[k] * reg_log[k]` over keys present in both (`indices` etc. are skipped)."""
  weights = REGULARIZATION_WEIGHTS if weights is None else weights
  total = jnp.zeros((), jnp.float32)
  for k in sorted(reg_log):
    if k in weights:
      total = total + weights[k] * _float(reg_log[k])
  return total


# ------------------------------------------------------------------ reconstruction


def fold_frames(x):
  """`(B, T, H, W, C)` -> `(B*T, H, W, C)`: with dims=3 the 2-D discriminator sees frames."""
  return x.reshape((-1,) + x.shape[2:])


def reconstruction_nll(inputs, reconstructions, logvar, perceptual=None, perceptual_weight=1.0):
  """Reconstruction NLL of `GeneralLPIPSWithDiscriminator` with dims=3.

  Args:
    inputs, reconstructions: `(B, T, H, W, C)`, unclamped.
    logvar: learned scalar.
    perceptual: optional per-frame perceptual distance `(B, T)` (LPIPS); it is broadcast over
      the frame's H*W*C elements, so it is effectively multiplied by H*W*C.
    perceptual_weight: weight of `perceptual`.
  Returns:
    `(nll_loss, log)`: `nll_loss = sum(rec / exp(logvar) + logvar) / (B*T)` with
    `rec = |x - x_rec| + w * p`; `log` holds the element means `rec_loss`, `p_loss` and
    `logvar`, as the official code logs them.
  """
  b, t = inputs.shape[:2]
  rec = jnp.abs(_float(inputs) - _float(reconstructions))
  if perceptual is not None and perceptual_weight > 0:
    p = _float(perceptual).reshape(b, t, 1, 1, 1)
    rec = rec + perceptual_weight * p
    p_loss = jnp.mean(p)
  else:
    p_loss = jnp.zeros((), rec.dtype)
  logvar = _float(logvar)
  nll_loss = jnp.sum(rec / jnp.exp(logvar) + logvar) / (b * t)
  log = {"rec_loss": jnp.mean(rec), "p_loss": p_loss, "logvar": logvar}
  return nll_loss, jax.tree.map(jax.lax.stop_gradient, log)


def gen_adversarial_loss(logits_fake, cross_entropy=True):
  """Generator GAN term: non-saturating (all configs) or `-mean(logits)`."""
  return non_saturating_gen_loss(logits_fake) if cross_entropy else plain_gen_loss(logits_fake)


# ------------------------------------------------------------------ assembly


def generator_loss(nll_loss, g_loss, d_weight, step, reg_log=None, log=None, *,
                   disc_start=DISC_START, disc_factor_value=1.0, regularization_weights=None):
  """Generator total (optimizer_idx 0): `nll + d_weight * disc_factor * g + sum_k λ_k reg[k]`.

  Args:
    nll_loss, g_loss: scalars from `reconstruction_nll` / `gen_adversarial_loss` (differentiable).
    d_weight: from `adaptive_weight` (already stop-gradient; 0 in validation).
    step: global step (doubled Lightning counter), may be traced.
    reg_log: regulariser outputs, e.g. `{"kl_loss": ...}` or `{"aux_loss": ...}`.
    log: extra entries to merge into the returned log (e.g. `reconstruction_nll`'s).
  Returns:
    `(loss, log)` with the official log names (no split prefix), all stop-gradient.
  """
  df = disc_factor(step, disc_start, disc_factor_value)
  reg_log = {} if reg_log is None else reg_log
  weights = REGULARIZATION_WEIGHTS if regularization_weights is None else regularization_weights
  loss = _float(nll_loss) + d_weight * df * _float(g_loss) + regularization_loss(reg_log, weights)
  out = dict(log or {})
  out.update({k: jnp.mean(_float(v)) for k, v in reg_log.items() if k in weights})
  out.update({"total_loss": loss, "nll_loss": nll_loss, "d_weight": d_weight,
              "disc_factor": df, "g_loss": g_loss})
  return loss, jax.tree.map(jax.lax.stop_gradient, out)


def discriminator_loss(logits_real, logits_fake, lecam_state, step, *, disc_start=DISC_START,
                       disc_factor_value=1.0, loss_type="hinge", lecam_weight=LECAM_WEIGHT,
                       lecam_decay=LECAM_DECAY):
  """Discriminator total (optimizer_idx 1): `disc_factor * (d_loss + w * lecam)`.

  logits_real, logits_fake: from two separate discriminator calls (separate BN statistics).
  The LeCAM EMAs are updated with this batch BEFORE the regulariser uses them;
  the official code does this in validation too. Returns `(loss, new_lecam_state, log)`; with
  `lecam_weight == 0` the state is returned unchanged and no `lecam_loss` is logged.
  """
  df = disc_factor(step, disc_start, disc_factor_value)
  d_loss = D_LOSSES[loss_type](logits_real, logits_fake)
  log = {"logits_real": jnp.mean(_float(logits_real)), "logits_fake": jnp.mean(_float(logits_fake)),
         "disc_factor": df, "non_saturated_d_loss": d_loss}
  if lecam_weight > 0:
    lecam_state = lecam_update(lecam_state, logits_real, logits_fake, lecam_decay)
    lecam = lecam_reg(logits_real, logits_fake, lecam_state)
    loss = df * (lecam * lecam_weight + d_loss)
    log["lecam_loss"] = lecam
  else:
    loss = df * d_loss
  log["disc_loss"] = loss
  return loss, lecam_state, jax.tree.map(jax.lax.stop_gradient, log)
