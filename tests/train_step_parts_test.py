"""The named pieces of the train step (`vidtok_jax/train/step.py`), without a compile.

The whole step's numerics are covered by train_step_test; here: the EMA and non-finite guard
pieces on tiny trees, and the named scopes that `planning.traffic` groups bytes by.
"""

import jax
import jax.numpy as jnp
import numpy as np

from train_step_test import KL, tiny_config, video
from vidtok_jax import train
from vidtok_jax.train import step as step_lib


def test_ema_update_litema_decay():
  ema, params = {"w": jnp.full((3,), 2.0)}, {"w": jnp.zeros((3,))}
  assert step_lib.ema_update(None, params, None, 5) is None
  # n = 1: d = min(0.999, 2/11); later the configured decay caps it.
  got = step_lib.ema_update(ema, params, 0.999, jnp.asarray(1, jnp.int32))
  np.testing.assert_allclose(got["w"], 2.0 * 2 / 11, rtol=1e-6)
  got = step_lib.ema_update(ema, params, 0.5, 1000)
  np.testing.assert_allclose(got["w"], 1.0, rtol=1e-6)


def test_guarded_state_discards_every_update():
  cfg = tiny_config(ema_decay=0.9)
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), train.abstract_train_state(cfg))
  ones = lambda t: jax.tree.map(jnp.ones_like, t)
  upd = step_lib.Updates(ones(state.g_params), ones(state.g_opt_state), None,
                         ones(state.d_params), ones(state.d_opt_state), None)
  args = (upd, ones(state.d_batch_stats), ones(state.ema_params), ones(state.lecam))
  kept = step_lib.guarded_state(state, jnp.asarray(False), *args)
  assert int(kept.step) == 1 and int(kept.skipped) == 1 and int(kept.nonfinite_streak) == 1
  for name in ("g_params", "d_params", "d_batch_stats", "g_opt_state", "d_opt_state",
               "ema_params", "lecam"):
    for a in jax.tree.leaves(getattr(kept, name)):
      assert not np.any(np.asarray(a)), name
  new = step_lib.guarded_state(state, jnp.asarray(True), *args)
  assert int(new.skipped) == 0 and int(new.nonfinite_streak) == 0
  assert all(np.all(np.asarray(a) == 1) for a in jax.tree.leaves(new.d_params))


def test_named_scopes_in_lowered_step():
  # `planning.traffic` groups the compiled program's bytes by these scopes and module names.
  cfg = tiny_config(KL, ema_decay=0.99)
  state = train.abstract_train_state(cfg)
  x = jax.ShapeDtypeStruct(video().shape, jnp.float32)
  # Traced with the TPU's forms: a training trace has the guard's one barrier and none of the
  # norm-input barriers of TPU inference (`layers.training_forms`).
  text = jax.jit(step_lib.make_train_step(cfg, platform="tpu")).lower(
      state, {"video": x}).as_text(debug_info=True)
  for scope in ("/optimizer/", "/ema/", "/nonfinite_guard/", "jvp(VidTok.encode)",
                "jvp(PatchDiscriminator)/main_0/"):
    assert scope in text, scope
  assert text.count("stablehlo.optimization_barrier") == 1


def test_apply_gradients_norms_are_the_applied_updates_and_overflow_is_discarded():
  # The update norms (and the guard's `ok`) come from a second trace of the optimizers behind
  # an optimization barrier: they must be those of the update the state actually receives, and
  # a non-finite update from finite grads and a finite state must still discard the step.
  cfg = tiny_config(KL)
  # Zero params: the new params are the updates, exactly.
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), train.abstract_train_state(cfg))
  ctx = step_lib.step_context(cfg, jax.default_backend())
  rng = np.random.default_rng(1)
  normal = lambda t: jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), t)
  g_grads, d_grads = normal(state.g_params), normal(state.d_params)
  one = jnp.asarray(1.0)
  g = step_lib.GeneratorOut(None, g_grads, None, one, one, one, one, one, {}, {})
  d = step_lib.DiscriminatorOut(one, d_grads, state.d_batch_stats, state.lecam, {})
  apply = jax.jit(lambda s, g, d: step_lib.apply_gradients(ctx, s, g, d))

  new, norms, finite, ok = apply(state, g, d)
  assert bool(ok) and float(norms["g_update_norm"]) > 0
  for p, name in (("g_params", "g_update_norm"), ("d_params", "d_update_norm")):
    delta = jax.tree.map(lambda a, b: a - b, getattr(new, p), getattr(state, p))
    np.testing.assert_allclose(norms[name], step_lib.losses.global_norm(delta), rtol=1e-5)

  # A first moment of 1e30 (finite) with a zero second moment: Adam's update overflows.
  mu = lambda t: 1e30 if "mu" in str(t) else 0.0
  big = state.replace(g_opt_state=jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.full(a.shape, mu(path), a.dtype) if jnp.issubdtype(
          a.dtype, jnp.floating) else a, state.g_opt_state))
  new, norms, finite, ok = apply(big, g, d)
  assert not bool(ok) and bool(finite["g_grads"]) and not bool(finite["g_updates"])
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(big)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_array_equal(a, b)
  assert int(new.skipped) == 1
