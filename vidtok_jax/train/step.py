"""The pure VidTok GAN train step (SPEC 7.1-7.5, quirks 15-21).

    train_step = jax.jit(make_train_step(config), donate_argnums=0)
    state, metrics = train_step(state, {"video": x})   # x: (B, T, H, W, 3) in [-1, 1]

One call = one training iteration i = `state.step`:
  1. `recon = decode(encode(x))`, KL posterior sampled with `fold_in(state.rng, i)`, FSQ entropy
     weight annealed to n = i (Lightning's `global_step // 2`).
  2. G update at Lightning step 2i: `nll + d_weight * disc_factor(2i) * g + reg`, with the exact
     adaptive weight from the gradients of `nll` and `g` w.r.t. the decoder's `conv_out` kernel.
  3. D update at Lightning step 2i+1 on `x` and `stop_gradient(recon)` (same forward as step 2).
  4. EMA update (LitEma), then non-finite guard: if any loss, norm or new statistic is
     non-finite, every update is discarded; `step` still advances.

All gradients come from ONE autoencoder forward: `jax.vjp` of the autoencoder is pulled back
three times; the two pulls that only feed the last-layer norms keep just the `conv_out` kernel
gradient, so XLA drops the rest of those two backward passes.
"""


import jax
import jax.numpy as jnp
import optax

import vidtok_jax
from vidtok_jax.train import losses
from vidtok_jax.models import layers
from vidtok_jax.train import mesh as mesh_lib
from vidtok_jax.train import state as state_lib

sg = jax.lax.stop_gradient


def get_last_layer(model_params):
  """The decoder's last conv kernel (`get_last_layer()` of SPEC 6.1), causal or not."""
  conv_out = model_params["decoder"]["conv_out"]
  return conv_out["conv"]["kernel"] if "conv" in conv_out else conv_out["kernel"]


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(ok, new, old):
  """`new` where `ok` else `old`, leaf by leaf (both trees have the same structure)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_train_step(config, lpips_params=None, mesh=None, platform=None):
  """Returns the pure `train_step(state, batch) -> (state, metrics)` for `config`.

  `batch`: `{"video": (B, T, H, W, 3) float}` (or the array itself), B divisible by the data
  axis when sharded. `lpips_params`: a fallback used only when `state.lpips_params` is None; it
  becomes a compile-time constant, so prefer keeping them in the state (`create_train_state`).
  `mesh`: the training mesh; with a "space" axis (`config.train.mesh.space`) the videos,
  reconstructions and the LPIPS / discriminator inputs are pinned to the height-split layout
  (`mesh.constrain_height`), so every activation stays split (XLA exchanges conv halos).
  `metrics`: float32/int32 scalars: every loss term, `d_weight`, `disc_factor` (G) and
  `disc_factor_d`, `logvar`, `g_/d_ grad_norm | param_norm | update_norm`, `finite/<term>`
  (1 = finite), `nonfinite` (1 = update skipped), `nonfinite_streak`, `skipped`.
  """
  tc, lc = config.train, config.loss
  if platform is None:
    platform = mesh_lib.platform_of(mesh) if mesh is not None else jax.default_backend()
  model_cfg = state_lib.model_config(config, platform)
  model = vidtok_jax.VidTok(model_cfg)
  spec = model.config
  trim_to_input = spec.causal and spec.version == "v1.1"  # v1.1 forward keeps the last T frames
  disc = state_lib.make_discriminator(config, platform)
  g_tx, d_tx = state_lib.make_optimizers(config)
  cdt = state_lib.compute_dtype(config, platform)
  reg_weights = {"kl_loss": float(lc.kl_weight), "aux_loss": float(lc.aux_weight)}
  use_lpips = lc.perceptual_weight > 0
  if use_lpips:
    from vidtok_jax.metrics.lpips import LPIPS  # only when the perceptual term is on
    lpips_model = LPIPS(net=lc.lpips_net, dtype=cdt)  # backbone under bf16 autocast too
  if lc.disc_loss not in losses.D_LOSSES:
    raise ValueError(f"config.loss.disc_loss must be one of {sorted(losses.D_LOSSES)}, "
                     f"got {lc.disc_loss!r}")
  fix_encoder = bool(tc.fix_encoder)
  ema_decay = tc.ema_decay

  def space(v, height_dim=2):  # keep the height split over the mesh's "space" axis
    return mesh_lib.constrain_height(v, mesh, height_dim)

  def frames(v):  # (B, T, H, W, 3) -> (B*T, H, W, 3), still height-split
    return space(losses.fold_frames(v), 1)

  def disc_input(v):
    # 2-D disc: frames (B*T, H, W, 3); 3-D disc: clips (B, T, H, W, 3).
    return frames(v) if lc.disc_type == "2d" else space(v)

  def forward(model_params, x, i, rng):
    """`(recon (B, T, H, W, 3), weighted reg scalar)`, aux: the regulariser log."""
    z, aux = model.apply({"params": model_params}, x, True, i, True, method=model.encode,
                         rngs={"sample": rng})
    if fix_encoder:  # official: encoding under no_grad; XLA drops the encoder backward
      z, aux = sg(z), sg(aux)
    recon = model.apply({"params": model_params}, space(z.astype(cdt)), method=model.decode)
    if trim_to_input:
      recon = recon[:, recon.shape[1] - x.shape[1]:]
    recon = space(recon)
    reg = losses.regularization_loss(aux, reg_weights)
    aux = {k: jnp.mean(v.astype(jnp.float32)) for k, v in aux.items()
           if k not in ("indices", "mean", "logvar")}
    return (recon, reg), sg(aux)

  def step(state, batch):
    x = batch["video"] if isinstance(batch, dict) else batch
    x = space(jnp.asarray(x, jnp.float32))
    b, t = x.shape[:2]
    i = state.step
    g_step, d_step = 2 * i, 2 * i + 1  # Lightning's doubled counter (quirk 15)
    k_sample, k_lpips = jax.random.split(jax.random.fold_in(state.rng, i))
    lp = state.lpips_params if state.lpips_params is not None else lpips_params
    if use_lpips and lp is None:
      raise ValueError("config.loss.perceptual_weight > 0 needs LPIPS params: pass "
                       "lpips_params to create_train_state (or set perceptual_weight=0)")
    g_params, logvar = state.g_params["model"], state.g_params["logvar"]

    # ---- generator (optimizer_idx 0, global_step 2i) ----------------------------------------
    (recon, reg), ae_vjp, reg_log = jax.vjp(lambda p: forward(p, x, i, k_sample), g_params,
                                            has_aux=True)

    def nll_fn(r, lv):
      p = None
      if use_lpips:  # per-frame LPIPS(x, x_rec), dropout active as in official training
        p = lpips_model.apply({"params": lp}, frames(x), frames(r).astype(jnp.float32),
                              train=True,
                              rngs={"dropout": k_lpips}).reshape(b, t)
      return losses.reconstruction_nll(x, r, lv, p, lc.perceptual_weight)

    def adv_fn(r):  # BN in train mode: the G-step fake pass also updates the running stats
      logits, upd = disc.apply({"params": state.d_params, "batch_stats": state.d_batch_stats},
                               disc_input(r), train=True, mutable=["batch_stats"])
      return losses.gen_adversarial_loss(logits, lc.gen_loss_cross_entropy), upd["batch_stats"]

    nll, nll_vjp, nll_log = jax.vjp(nll_fn, recon, logvar, has_aux=True)
    g_loss, g_vjp, stats_after_g = jax.vjp(adv_fn, recon, has_aux=True)
    ct_nll, ct_logvar = nll_vjp(jnp.ones_like(nll))
    (ct_g,) = g_vjp(jnp.ones_like(g_loss))
    # Adaptive weight: exact gradients of nll and g w.r.t. the conv_out kernel (quirk 21: every
    # step). Only the kernel leaf of these two pull-backs is used; XLA prunes the rest.
    no_reg = jnp.zeros_like(reg)
    w_nll = get_last_layer(ae_vjp((ct_nll, no_reg))[0])
    w_g = get_last_layer(ae_vjp((ct_g, no_reg))[0])
    d_weight = losses.adaptive_weight(losses.global_norm(w_nll), losses.global_norm(w_g),
                                      lc.disc_weight)
    df_g = losses.disc_factor(g_step, lc.disc_start)
    ct_recon = ct_nll + (d_weight * df_g).astype(ct_g.dtype) * ct_g
    (model_grads,) = ae_vjp((ct_recon, jnp.ones_like(reg)))
    g_grads = {"model": model_grads, "logvar": ct_logvar}
    g_total, g_log = losses.generator_loss(nll, g_loss, d_weight, g_step, reg_log, nll_log,
                                           disc_start=lc.disc_start,
                                           regularization_weights=reg_weights)

    # ---- discriminator (optimizer_idx 1, global_step 2i+1) ----------------------------------
    x_d, recon_d = disc_input(x), disc_input(sg(recon))

    def d_loss_fn(dp):
      # Real then fake, separate passes: each normalises with its own batch statistics and
      # updates the running stats in this order (after the G step's fake pass).
      lr, s1 = disc.apply({"params": dp, "batch_stats": stats_after_g}, x_d, train=True,
                          mutable=["batch_stats"])
      lf, s2 = disc.apply({"params": dp, "batch_stats": s1["batch_stats"]}, recon_d,
                          train=True, mutable=["batch_stats"])
      loss, lecam, log = losses.discriminator_loss(
          lr, lf, state.lecam, d_step, disc_start=lc.disc_start, loss_type=lc.disc_loss,
          lecam_weight=lc.lecam_weight, lecam_decay=lc.lecam_decay)
      return loss, (s2["batch_stats"], lecam, log)

    (d_total, (d_stats, lecam, d_log)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(state.d_params)

    # ---- optimizer updates (clip 20 + Adam inside the optax chains) -------------------------
    # (Named scopes name these ops in the compiled program: `planning.traffic` groups bytes by
    # them.)
    with jax.named_scope("optimizer"):
      g_updates, g_opt = g_tx.update(g_grads, state.g_opt_state, state.g_params)
      new_g = optax.apply_updates(state.g_params, g_updates)
      if fix_encoder:  # keep frozen leaves bitwise (x + 0.0 would turn -0.0 into +0.0)
        new_g = {**new_g, "model": {k: state.g_params["model"][k] if k in
                                    state_lib.FROZEN_WITH_ENCODER else v
                                    for k, v in new_g["model"].items()}}
      d_updates, d_opt = d_tx.update(d_grads, state.d_opt_state, state.d_params)
      new_d = optax.apply_updates(state.d_params, d_updates)

    with jax.named_scope("ema"):
      ema = state.ema_params
      if ema_decay is not None:
        # LitEma: n = number of updates including this one (skipped steps are not updates).
        n = (i - state.skipped + 1).astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), ema, new_g)

    # ---- non-finite guard ---------------------------------------------------------------------
    with jax.named_scope("nonfinite_guard"):
      g_trainable = state_lib.g_param_labels(g_grads, fix_encoder)
      train_only = lambda tree: [v for v, lab in zip(jax.tree.leaves(tree),
                                                     jax.tree.leaves(g_trainable), strict=True)
                                 if lab == "train"]
      norms = {
          "g_grad_norm": losses.global_norm(train_only(g_grads)),
          "g_param_norm": losses.global_norm(train_only(state.g_params)),
          "g_update_norm": losses.global_norm(train_only(g_updates)),
          "d_grad_norm": losses.global_norm(d_grads),
          "d_param_norm": losses.global_norm(state.d_params),
          "d_update_norm": losses.global_norm(d_updates),
      }
      finite = {
          "nll_loss": jnp.isfinite(nll), "g_loss": jnp.isfinite(g_loss),
          "reg_loss": jnp.isfinite(reg), "d_weight": jnp.isfinite(d_weight),
          "total_loss": jnp.isfinite(g_total), "disc_loss": jnp.isfinite(d_total),
          "g_grads": jnp.isfinite(norms["g_grad_norm"]),
          "d_grads": jnp.isfinite(norms["d_grad_norm"]),
          # finite grads can still give non-finite params (an overflowing lr or Adam moment)
          "g_updates": jnp.isfinite(norms["g_update_norm"]),
          "d_updates": jnp.isfinite(norms["d_update_norm"]),
          "batch_stats": _all_finite(d_stats), "lecam": _all_finite(lecam),
      }
      ok = jnp.all(jnp.stack(list(finite.values())))
      new_state = state.replace(
          step=i + 1,
          g_params=_select(ok, new_g, state.g_params),
          d_params=_select(ok, new_d, state.d_params),
          d_batch_stats=_select(ok, d_stats, state.d_batch_stats),
          g_opt_state=_select(ok, g_opt, state.g_opt_state),
          d_opt_state=_select(ok, d_opt, state.d_opt_state),
          ema_params=_select(ok, ema, state.ema_params) if ema is not None else None,
          lecam=_select(ok, lecam, state.lecam),
          nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32),
          skipped=(state.skipped + jnp.where(ok, 0, 1)).astype(jnp.int32),
      )

    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in {**reg_log, **g_log}.items()}
    metrics["reg_loss"] = reg
    metrics.update({k: v for k, v in d_log.items() if k != "disc_factor"})
    metrics["disc_factor_d"] = d_log["disc_factor"]
    metrics.update(norms)
    metrics.update({f"finite/{k}": v.astype(jnp.float32) for k, v in finite.items()})
    metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
    metrics["nonfinite_streak"] = new_state.nonfinite_streak
    metrics["skipped"] = new_state.skipped
    metrics["step"] = i
    return new_state, metrics

  def train_step(state, batch):
    with layers.lowering_platform(platform):  # at trace time: the forms of the target
      return step(state, batch)

  train_step.platform = platform
  train_step.model_config = model_cfg
  train_step.compute_dtype = str(cdt)
  return train_step
