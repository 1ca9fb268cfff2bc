"""Tests for vidtok_jax.train.losses: parity with the official loss functions + invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import Ref, max_abs
from vidtok_jax.train import losses
from vidtok_jax.models.discriminator import PatchDiscriminator, disc_params_from_torch


def _check(r, got, rtol, atol, tag=""):
  for key, value in got.items():
    ref = r.expected(key)
    err = max_abs(value, ref)
    print(f"{r.name}{tag} {key}: max_abs {err:.3g}")
    assert np.shape(value) == ref.shape, key
    assert err <= atol + rtol * float(np.abs(ref).max()), (key, err)


# ------------------------------------------------------------------ gan_losses


def _gan_losses(r, dtype):
  real = jnp.asarray(r.inputs["logits_real"], dtype)  # (4, 1, 6, 6): layout is irrelevant here
  fake = jnp.asarray(r.inputs["logits_fake"], dtype)
  cfg = r.meta["config"]
  ema = losses.LeCAMState(jnp.asarray(cfg["lecam_real_ema"], dtype),
                          jnp.asarray(cfg["lecam_fake_ema"], dtype))

  @jax.jit
  def run(real, fake, ema):
    new = losses.lecam_update(ema, real, fake, cfg["lecam_decay"])
    return {
        "hinge_d_loss": losses.hinge_d_loss(real, fake),
        "vanilla_d_loss": losses.vanilla_d_loss(real, fake),
        "non_saturate_gen_loss": losses.non_saturating_gen_loss(fake),
        "sigmoid_ce_labels1": losses.sigmoid_cross_entropy_with_logits(1.0, fake),
        "lecam_reg_given_ema": losses.lecam_reg(real, fake, ema),
        "lecam_ema_after_update": jnp.stack([new.real_ema, new.fake_ema]),
        "lecam_reg_after_update": losses.lecam_reg(real, fake, new),
    }

  return run(real, fake, ema)


def test_gan_losses_parity():
  r = Ref("gan_losses")
  got = _gan_losses(r, jnp.float32)
  assert set(got) == set(r.out)
  _check(r, got, rtol=1e-6, atol=1e-6)
  with jax.enable_x64(True):
    _check(r, _gan_losses(r, jnp.float64), rtol=1e-12, atol=1e-14, tag="[x64]")


# ------------------------------------------------------------------ general_loss_2d


def _head(h, w, b):
  """v1.0 CausalConv3d(8, 3, k=3), constant mode: zero-pad 2 frames in front, 1 px each side."""
  h = jnp.pad(h, ((0, 0), (2, 0), (1, 1), (1, 1), (0, 0)))
  y = jax.lax.conv_general_dilated(h, w, (1, 1, 1), "VALID",
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return y + b


def _general_loss_harness(r, dtype):
  """The fixture's procedure: per global step, fresh params + LeCAM EMA; G call then D call."""
  cfg = r.meta["config"]["loss_kwargs"]
  p = {k: jnp.asarray(v, dtype) for k, v in r.params.items() if v.dtype != np.int64}
  disc_vars = jax.tree.map(lambda a: a.astype(dtype), disc_params_from_torch(r.params))
  disc = PatchDiscriminator(dims=2, n_layers=cfg["disc_num_layers"], dtype=dtype,
                            param_dtype=dtype)
  x = jnp.asarray(np.moveaxis(r.inputs["x"], 1, -1), dtype)
  h = jnp.asarray(np.moveaxis(r.inputs["h"], 1, -1), dtype)
  reg_log = {"kl_loss": jnp.asarray(r.inputs["kl_loss"], dtype)}
  w_last = jnp.transpose(p["head.conv.weight"], (2, 3, 4, 1, 0))  # the "last layer"
  b_last, logvar = p["head.conv.bias"], p["loss.logvar"]

  def d_apply(stats, frames):
    return disc.apply({"params": disc_vars["params"], "batch_stats": stats}, frames, train=True,
                      mutable=["batch_stats"])

  def step_fn(step):
    stats = disc_vars["batch_stats"]

    # Generator call (optimizer_idx 0). The disc runs in train mode and updates its BN stats.
    def terms(w):
      rec = _head(h, w, b_last)
      nll, rec_log = losses.reconstruction_nll(x, rec, logvar)
      logits, upd = d_apply(stats, losses.fold_frames(rec))
      g = losses.gen_adversarial_loss(logits, cfg["gen_loss_cross_entropy"])
      return nll, g, rec_log, upd["batch_stats"]

    nll, g, rec_log, stats = terms(w_last)
    nll_grad = jax.grad(lambda w: terms(w)[0])(w_last)
    g_grad = jax.grad(lambda w: terms(w)[1])(w_last)
    d_weight = losses.adaptive_weight(losses.global_norm(nll_grad), losses.global_norm(g_grad),
                                      cfg["disc_weight"])
    g_total, g_log = losses.generator_loss(
        nll, g, d_weight, step, reg_log, rec_log, disc_start=cfg["disc_start"],
        regularization_weights=cfg["regularization_weights"])

    # Discriminator call (optimizer_idx 1): real and fake in two separate train-mode calls.
    rec = jax.lax.stop_gradient(_head(h, w_last, b_last))
    logits_real, upd = d_apply(stats, losses.fold_frames(x))
    logits_fake, upd = d_apply(upd["batch_stats"], losses.fold_frames(rec))
    d_total, lecam, d_log = losses.discriminator_loss(
        logits_real, logits_fake, losses.lecam_init(0.0, dtype), step,
        disc_start=cfg["disc_start"], lecam_weight=cfg["lecam_loss_weight"])
    return g_total, g_log, d_total, d_log, lecam, upd["batch_stats"]

  step_fn = jax.jit(step_fn)  # one compile; the step is traced (jnp.where schedule)
  got = {}
  for step in r.meta["config"]["global_steps"]:
    g_total, g_log, d_total, d_log, lecam, stats = step_fn(jnp.asarray(step))
    s = f"step{step}"
    got[f"{s}/g_total_loss"] = g_total
    got.update({f"{s}/g_log/{k}": v for k, v in g_log.items()})
    got[f"{s}/d_total_loss"] = d_total
    got.update({f"{s}/d_log/{k}": v for k, v in d_log.items()})
    got[f"{s}/lecam_ema_after"] = jnp.stack([lecam.real_ema, lecam.fake_ema])
    got[f"{s}/disc_after/main.3.running_mean"] = stats["main_3"]["mean"]
    got[f"{s}/disc_after/main.3.running_var"] = stats["main_3"]["var"]
  return got


def test_general_loss_2d_parity():
  r = Ref("general_loss_2d")
  got = _general_loss_harness(r, jnp.float32)
  assert set(got) == set(r.out)  # every stored output is reproduced
  # Float32 vs float64 reference; losses reach ~800, so a relative term (f32 run: 6e-8 rel).
  _check(r, got, rtol=1e-6, atol=1e-6)
  assert float(got["step0/g_log/disc_factor"]) == 0 and float(got["step10/g_log/disc_factor"]) == 1


def test_general_loss_2d_parity_float64():
  r = Ref("general_loss_2d")
  with jax.enable_x64(True):
    _check(r, _general_loss_harness(r, jnp.float64), rtol=1e-10, atol=1e-12, tag="[x64]")


# ------------------------------------------------------------------ invariants


def test_hinge_zero_for_separated_logits_and_positive_otherwise():
  real = jnp.full((2, 3, 3, 1), 1.5)
  fake = jnp.full((2, 3, 3, 1), -2.0)
  assert float(losses.hinge_d_loss(real, fake)) == 0.0
  assert float(losses.hinge_d_loss(fake, real)) == pytest.approx(0.5 * (3.0 + 2.5))
  # vanilla: softplus never reaches 0 but decreases with separation.
  assert float(losses.vanilla_d_loss(real, fake)) < float(losses.vanilla_d_loss(fake, real))


def test_non_saturating_averages_patches_before_bce():
  logits = jnp.array([[[4.0], [-4.0]], [[1.0], [1.0]]])  # (2 samples, 2 patches, 1)
  want = np.mean([np.log1p(np.exp(-0.0)), np.log1p(np.exp(-1.0))])
  assert float(losses.non_saturating_gen_loss(logits)) == pytest.approx(want, rel=1e-6)
  elementwise = float(jnp.mean(losses.sigmoid_cross_entropy_with_logits(1.0, logits)))
  assert abs(elementwise - want) > 0.05  # the patch-first order matters
  assert float(losses.plain_gen_loss(logits)) == pytest.approx(-0.5)


def test_sigmoid_ce_stable_for_large_logits():
  ce = losses.sigmoid_cross_entropy_with_logits(1.0, jnp.array([-1e4, 0.0, 1e4]))
  np.testing.assert_allclose(ce, [1e4, np.log(2.0), 0.0], rtol=1e-6)


def test_adaptive_weight_clamp_and_stop_gradient():
  assert float(losses.adaptive_weight(2.0, 1.0 - 1e-4, 0.2)) == pytest.approx(0.4, rel=1e-6)
  assert float(losses.adaptive_weight(1e9, 0.0, 1.0)) == pytest.approx(1e4)
  assert float(losses.adaptive_weight(0.0, 1.0, 1.0)) == 0.0
  g = jax.grad(lambda a, b: losses.adaptive_weight(a, b), argnums=(0, 1))(3.0, 2.0)
  assert g == (0.0, 0.0)


def test_lecam_update_is_ema_without_gradient():
  s = losses.lecam_init()
  real, fake = jnp.full((4, 2), 2.0), jnp.full((4, 2), -1.0)
  s1 = losses.lecam_update(s, real, fake)
  assert float(s1.real_ema) == pytest.approx(0.002) and float(s1.fake_ema) == pytest.approx(-0.001)
  grad = jax.grad(lambda r: losses.lecam_update(s, r, fake).real_ema)(real)
  np.testing.assert_array_equal(grad, 0.0)
  # Regulariser uses the EMAs: zero when real <= fake_ema and fake >= real_ema.
  s2 = losses.LeCAMState(jnp.asarray(-5.0), jnp.asarray(5.0))
  assert float(losses.lecam_reg(real, fake, s2)) == 0.0


def test_discriminator_loss_schedule_jit_and_no_lecam():
  real, fake = jnp.full((2, 4), 0.5), jnp.full((2, 4), -0.25)
  f = jax.jit(lambda step: losses.discriminator_loss(real, fake, losses.lecam_init(), step,
                                                     disc_start=7))
  for step, on in ((6, 0.0), (7, 1.0), (8, 1.0)):
    loss, state, log = f(jnp.asarray(step))
    want = on * (losses.hinge_d_loss(real, fake) + 0.005 * log["lecam_loss"])
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(log["disc_factor"]) == on
    assert float(state.real_ema) == pytest.approx(0.0005)  # EMA updated even before disc_start
  loss, state, log = losses.discriminator_loss(real, fake, losses.lecam_init(), 9,
                                               disc_start=0, loss_type="vanilla", lecam_weight=0.0)
  assert "lecam_loss" not in log and float(state.real_ema) == 0.0
  assert float(loss) == pytest.approx(float(losses.vanilla_d_loss(real, fake)))


def test_reconstruction_nll_normalisation_and_perceptual_broadcast():
  b, t, hh, ww, c = 2, 3, 4, 5, 3
  x = jax.random.uniform(jax.random.key(0), (b, t, hh, ww, c), minval=-1, maxval=1)
  y = x + 0.1
  logvar = jnp.asarray(0.5)
  nll, log = losses.reconstruction_nll(x, y, logvar)
  n_el = hh * ww * c
  assert float(nll) == pytest.approx(n_el * (0.1 / np.exp(0.5) + 0.5), rel=1e-5)  # / (B*T)
  assert float(log["rec_loss"]) == pytest.approx(0.1, rel=1e-5)
  p = jnp.arange(b * t, dtype=jnp.float32).reshape(b, t) / 10
  nll_p, log_p = losses.reconstruction_nll(x, y, logvar, perceptual=p, perceptual_weight=1.0)
  # Per-frame LPIPS is broadcast over the frame's H*W*C elements (SPEC §10.16).
  assert float(nll_p - nll) == pytest.approx(n_el * float(p.mean()) / np.exp(0.5), rel=1e-4)
  assert float(log_p["p_loss"]) == pytest.approx(float(p.mean()), rel=1e-6)


def test_generator_loss_assembly_and_regularisers():
  reg = {"kl_loss": jnp.asarray(100.0), "aux_loss": jnp.asarray(0.5),
         "indices": jnp.arange(4)}  # not a loss: skipped
  assert float(losses.regularization_loss(reg)) == pytest.approx(1e-6 * 100 + 0.5)
  f = jax.jit(lambda step: losses.generator_loss(jnp.asarray(10.0), jnp.asarray(2.0),
                                                 jnp.asarray(3.0), step, reg, disc_start=5))
  loss0, log0 = f(jnp.asarray(4))
  loss1, log1 = f(jnp.asarray(5))
  assert float(loss0) == pytest.approx(10.0 + 1e-4 + 0.5)
  assert float(loss1) == pytest.approx(10.0 + 3.0 * 2.0 + 1e-4 + 0.5)
  assert set(log1) >= {"total_loss", "nll_loss", "d_weight", "disc_factor", "g_loss",
                       "kl_loss", "aux_loss"} and "indices" not in log1
  # d_weight enters as a constant: d(loss)/d(g) = d_weight * disc_factor.
  dg = jax.grad(lambda g: losses.generator_loss(1.0, g, jnp.asarray(3.0), 5, disc_start=5)[0])
  assert float(dg(2.0)) == pytest.approx(3.0)


def test_fold_frames():
  x = jnp.arange(2 * 3 * 4).reshape(2, 3, 2, 2, 1)
  y = losses.fold_frames(x)
  assert y.shape == (6, 2, 2, 1)
  np.testing.assert_array_equal(y[4], x[1, 1])
