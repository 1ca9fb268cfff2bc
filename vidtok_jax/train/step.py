"""The pure VidTok GAN train step, with the official training's quirks kept.

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

Each stage is a pure function of a `StepContext` (the modules and static settings built once
from the config) and traced values: `generator_step`, `discriminator_step`, `optimizer_updates`,
`ema_update`, `update_norms` / `finite_checks` / `guarded_state`, `step_metrics`;
`train_step_body` chains them under the named scopes `optimizer`, `ema` and `nonfinite_guard`
(`planning.traffic` groups the compiled program's bytes by them).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import vidtok_jax
from vidtok_jax.models import layers
from vidtok_jax.train import losses
from vidtok_jax.train import mesh as mesh_lib
from vidtok_jax.train import state as state_lib

sg = jax.lax.stop_gradient


def get_last_layer(model_params):
  """The decoder's last conv kernel (the official `get_last_layer()`), causal or not."""
  conv_out = model_params["decoder"]["conv_out"]
  return conv_out["conv"]["kernel"] if "conv" in conv_out else conv_out["kernel"]


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(ok, new, old):
  """`new` where `ok` else `old`, leaf by leaf (both trees have the same structure)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


# ------------------------------------------------------------------------ what a step closes over

@dataclasses.dataclass(frozen=True)
class StepContext:
  """The modules, optimizers and static settings one train step closes over (trace-time
  constants, built once by `step_context`; nothing here is traced)."""

  model: Any  # vidtok_jax.VidTok in the compute dtype
  model_config: Any
  disc: Any  # PatchDiscriminator in the compute dtype
  g_tx: Any
  d_tx: Any
  loss: Any  # config.loss
  compute_dtype: Any
  reg_weights: dict
  fix_encoder: bool
  ema_decay: Any  # float, or None without EMA
  trim_to_input: bool  # the causal v1.1 forward keeps the last T frames
  lpips: Any = None  # LPIPS module when the perceptual term is on
  lpips_params: Any = None  # fallback when `state.lpips_params` is None (a compile-time constant)
  mesh: Any = None

  def space(self, v, height_dim=2):  # keep the height split over the mesh's "space" axis
    return mesh_lib.constrain_height(v, self.mesh, height_dim)

  def frames(self, v):  # (B, T, H, W, 3) -> (B*T, H, W, 3), still height-split
    return self.space(losses.fold_frames(v), 1)

  def disc_input(self, v):  # 2-D disc: frames (B*T, H, W, 3); 3-D disc: clips (B, T, H, W, 3)
    return self.frames(v) if self.loss.disc_type == "2d" else self.space(v)


def step_context(config, platform, lpips_params=None, mesh=None) -> StepContext:
  """`StepContext` of `config` with the compute dtype and model forms of `platform`."""
  tc, lc = config.train, config.loss
  model_cfg = state_lib.model_config(config, platform)
  model = vidtok_jax.VidTok(model_cfg)
  disc = state_lib.make_discriminator(config, platform)
  g_tx, d_tx = state_lib.make_optimizers(config)
  cdt = state_lib.compute_dtype(config, platform)
  lpips_model = None
  if lc.perceptual_weight > 0:
    from vidtok_jax.metrics.lpips import LPIPS  # only when the perceptual term is on
    lpips_model = LPIPS(net=lc.lpips_net, dtype=cdt)  # backbone under bf16 autocast too
  if lc.disc_loss not in losses.D_LOSSES:
    raise ValueError(f"config.loss.disc_loss must be one of {sorted(losses.D_LOSSES)}, "
                     f"got {lc.disc_loss!r}")
  spec = model.config
  return StepContext(
      model=model, model_config=model_cfg, disc=disc, g_tx=g_tx, d_tx=d_tx, loss=lc,
      compute_dtype=cdt,
      reg_weights={"kl_loss": float(lc.kl_weight), "aux_loss": float(lc.aux_weight)},
      fix_encoder=bool(tc.fix_encoder), ema_decay=tc.ema_decay,
      trim_to_input=spec.causal and spec.version == "v1.1", lpips=lpips_model,
      lpips_params=lpips_params, mesh=mesh)


# ------------------------------------------------------------------------------ loss terms

def autoencoder_forward(ctx, model_params, x, i, rng):
  """`(recon (B, T, H, W, 3), weighted reg scalar)`, aux: the regulariser log."""
  model = ctx.model
  z, aux = model.apply({"params": model_params}, x, True, i, True, method=model.encode,
                       rngs={"sample": rng})
  if ctx.fix_encoder:  # official: encoding under no_grad; XLA drops the encoder backward
    z, aux = sg(z), sg(aux)
  recon = model.apply({"params": model_params}, ctx.space(z.astype(ctx.compute_dtype)),
                      method=model.decode)
  if ctx.trim_to_input:
    recon = recon[:, recon.shape[1] - x.shape[1]:]
  recon = ctx.space(recon)
  reg = losses.regularization_loss(aux, ctx.reg_weights)
  aux = {k: jnp.mean(v.astype(jnp.float32)) for k, v in aux.items()
         if k not in ("indices", "mean", "logvar")}
  return (recon, reg), sg(aux)


def reconstruction_nll(ctx, x, recon, logvar, lpips_params, rng):
  """`(nll, log)` of `losses.reconstruction_nll`, with per-frame LPIPS(x, recon) when the
  perceptual term is on (dropout active, as in official training)."""
  p = None
  if ctx.lpips is not None:
    b, t = x.shape[:2]
    p = ctx.lpips.apply({"params": lpips_params}, ctx.frames(x),
                        ctx.frames(recon).astype(jnp.float32), train=True,
                        rngs={"dropout": rng}).reshape(b, t)
  return losses.reconstruction_nll(x, recon, logvar, p, ctx.loss.perceptual_weight)


def generator_adversarial(ctx, disc_variables, recon):
  """`(g_loss, new batch_stats)`: BN in train mode, so the G step's fake pass also updates the
  running stats."""
  logits, upd = ctx.disc.apply(disc_variables, ctx.disc_input(recon), train=True,
                               mutable=["batch_stats"])
  return losses.gen_adversarial_loss(logits, ctx.loss.gen_loss_cross_entropy), upd["batch_stats"]


# ------------------------------------------------------------------------ the two GAN steps

class GeneratorOut(NamedTuple):
  recon: Any
  grads: Any  # {"model", "logvar"}
  disc_stats: Any  # discriminator batch_stats after the G step's fake pass
  nll: Any
  g_loss: Any
  reg: Any
  d_weight: Any
  total: Any
  reg_log: Any
  log: Any


def generator_step(ctx, state, x, keys, lpips_params) -> GeneratorOut:
  """Optimizer_idx 0 at Lightning step 2i: gradients of `nll + d_weight * df(2i) * g + reg`.

  `keys`: (posterior sample, LPIPS dropout). The adaptive weight uses the exact gradients of
  nll and g w.r.t. the conv_out kernel (as officially: at every step); only that leaf of those
  two pull-backs is used, so XLA prunes the rest.
  """
  lc, i = ctx.loss, state.step
  g_step = 2 * i  # Lightning's doubled counter: two optimizers per iteration
  k_sample, k_lpips = keys
  (recon, reg), ae_vjp, reg_log = jax.vjp(
      lambda p: autoencoder_forward(ctx, p, x, i, k_sample), state.g_params["model"],
      has_aux=True)
  nll, nll_vjp, nll_log = jax.vjp(
      lambda r, lv: reconstruction_nll(ctx, x, r, lv, lpips_params, k_lpips), recon,
      state.g_params["logvar"], has_aux=True)
  disc_vars = {"params": state.d_params, "batch_stats": state.d_batch_stats}
  g_loss, g_vjp, stats_after_g = jax.vjp(
      lambda r: generator_adversarial(ctx, disc_vars, r), recon, has_aux=True)
  ct_nll, ct_logvar = nll_vjp(jnp.ones_like(nll))
  (ct_g,) = g_vjp(jnp.ones_like(g_loss))
  no_reg = jnp.zeros_like(reg)
  w_nll = get_last_layer(ae_vjp((ct_nll, no_reg))[0])
  w_g = get_last_layer(ae_vjp((ct_g, no_reg))[0])
  d_weight = losses.adaptive_weight(losses.global_norm(w_nll), losses.global_norm(w_g),
                                    lc.disc_weight)
  df_g = losses.disc_factor(g_step, lc.disc_start)
  ct_recon = ct_nll + (d_weight * df_g).astype(ct_g.dtype) * ct_g
  (model_grads,) = ae_vjp((ct_recon, jnp.ones_like(reg)))
  total, log = losses.generator_loss(nll, g_loss, d_weight, g_step, reg_log, nll_log,
                                     disc_start=lc.disc_start,
                                     regularization_weights=ctx.reg_weights)
  return GeneratorOut(recon, {"model": model_grads, "logvar": ct_logvar}, stats_after_g, nll,
                      g_loss, reg, d_weight, total, reg_log, log)


class DiscriminatorOut(NamedTuple):
  total: Any
  grads: Any
  batch_stats: Any
  lecam: Any  # losses.LeCAMState after this step
  log: Any


def discriminator_step(ctx, state, x, recon, stats_after_g) -> DiscriminatorOut:
  """Optimizer_idx 1 at Lightning step 2i+1, on `x` and `stop_gradient(recon)`."""
  lc, d_step = ctx.loss, 2 * state.step + 1
  x_d, recon_d = ctx.disc_input(x), ctx.disc_input(sg(recon))

  def d_loss_fn(dp):
    # Real then fake, separate passes: each normalises with its own batch statistics and
    # updates the running stats in this order (after the G step's fake pass).
    lr, s1 = ctx.disc.apply({"params": dp, "batch_stats": stats_after_g}, x_d, train=True,
                            mutable=["batch_stats"])
    lf, s2 = ctx.disc.apply({"params": dp, "batch_stats": s1["batch_stats"]}, recon_d,
                            train=True, mutable=["batch_stats"])
    loss, lecam, log = losses.discriminator_loss(
        lr, lf, state.lecam, d_step, disc_start=lc.disc_start, loss_type=lc.disc_loss,
        lecam_weight=lc.lecam_weight, lecam_decay=lc.lecam_decay)
    return loss, (s2["batch_stats"], lecam, log)

  (total, (stats, lecam, log)), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
      state.d_params)
  return DiscriminatorOut(total, grads, stats, lecam, log)


# ------------------------------------------------------------ updates, EMA, non-finite guard

class Updates(NamedTuple):
  g_params: Any
  g_opt_state: Any
  g_updates: Any
  d_params: Any
  d_opt_state: Any
  d_updates: Any


def optimizer_updates(ctx, state, g_grads, d_grads) -> Updates:
  """Both optax chains (clip 20 + Adam); frozen encoder leaves are kept bitwise."""
  g_updates, g_opt = ctx.g_tx.update(g_grads, state.g_opt_state, state.g_params)
  new_g = optax.apply_updates(state.g_params, g_updates)
  if ctx.fix_encoder:  # keep frozen leaves bitwise (x + 0.0 would turn -0.0 into +0.0)
    new_g = {**new_g, "model": {k: state.g_params["model"][k] if k in
                                state_lib.FROZEN_WITH_ENCODER else v
                                for k, v in new_g["model"].items()}}
  d_updates, d_opt = ctx.d_tx.update(d_grads, state.d_opt_state, state.d_params)
  new_d = optax.apply_updates(state.d_params, d_updates)
  return Updates(new_g, g_opt, g_updates, new_d, d_opt, d_updates)


def ema_update(ema, params, decay, n_updates):
  """LitEma: `ema - (1 - d) * (ema - params)`, d = min(decay, (1 + n) / (10 + n)) with n the
  number of updates including this one. `ema` unchanged when `decay` is None."""
  if decay is None:
    return ema
  n = jnp.asarray(n_updates).astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return jax.tree.map(lambda e, p: e - (1.0 - d) * (e - p), ema, params)


def update_norms(state, g_grads, d_grads, upd: Updates, fix_encoder):
  """Global norms of grads, params and updates; G norms over its trainable leaves only."""
  g_trainable = state_lib.g_param_labels(g_grads, fix_encoder)
  train_only = lambda tree: [v for v, lab in zip(jax.tree.leaves(tree),
                                                 jax.tree.leaves(g_trainable), strict=True)
                             if lab == "train"]
  return {
      "g_grad_norm": losses.global_norm(train_only(g_grads)),
      "g_param_norm": losses.global_norm(train_only(state.g_params)),
      "g_update_norm": losses.global_norm(train_only(upd.g_updates)),
      "d_grad_norm": losses.global_norm(d_grads),
      "d_param_norm": losses.global_norm(state.d_params),
      "d_update_norm": losses.global_norm(upd.d_updates),
  }


def finite_checks(g: GeneratorOut, d: DiscriminatorOut, norms):
  """`{term: bool scalar}`: every loss, norm and new statistic that must be finite."""
  return {
      "nll_loss": jnp.isfinite(g.nll), "g_loss": jnp.isfinite(g.g_loss),
      "reg_loss": jnp.isfinite(g.reg), "d_weight": jnp.isfinite(g.d_weight),
      "total_loss": jnp.isfinite(g.total), "disc_loss": jnp.isfinite(d.total),
      "g_grads": jnp.isfinite(norms["g_grad_norm"]),
      "d_grads": jnp.isfinite(norms["d_grad_norm"]),
      # finite grads can still give non-finite params (an overflowing lr or Adam moment)
      "g_updates": jnp.isfinite(norms["g_update_norm"]),
      "d_updates": jnp.isfinite(norms["d_update_norm"]),
      "batch_stats": _all_finite(d.batch_stats), "lecam": _all_finite(d.lecam),
  }


def guarded_state(state, ok, upd: Updates, d_stats, ema, lecam):
  """The next state: every update where `ok`, else the old values; `step` always advances."""
  return state.replace(
      step=state.step + 1,
      g_params=_select(ok, upd.g_params, state.g_params),
      d_params=_select(ok, upd.d_params, state.d_params),
      d_batch_stats=_select(ok, d_stats, state.d_batch_stats),
      g_opt_state=_select(ok, upd.g_opt_state, state.g_opt_state),
      d_opt_state=_select(ok, upd.d_opt_state, state.d_opt_state),
      ema_params=_select(ok, ema, state.ema_params) if ema is not None else None,
      lecam=_select(ok, lecam, state.lecam),
      nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32),
      skipped=(state.skipped + jnp.where(ok, 0, 1)).astype(jnp.int32),
  )


def step_metrics(g: GeneratorOut, d: DiscriminatorOut, norms, finite, ok, new_state, i):
  """The metrics dict of `make_train_step` (float32/int32 scalars)."""
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in {**g.reg_log, **g.log}.items()}
  metrics["reg_loss"] = g.reg
  metrics.update({k: v for k, v in d.log.items() if k != "disc_factor"})
  metrics["disc_factor_d"] = d.log["disc_factor"]
  metrics.update(norms)
  metrics.update({f"finite/{k}": v.astype(jnp.float32) for k, v in finite.items()})
  metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
  metrics["nonfinite_streak"] = new_state.nonfinite_streak
  metrics["skipped"] = new_state.skipped
  metrics["step"] = i
  return metrics


# --------------------------------------------------------------------------------- the step

def train_step_body(ctx, state, batch):
  """One iteration: `(new_state, metrics)`; see `make_train_step`."""
  x = batch["video"] if isinstance(batch, dict) else batch
  x = ctx.space(jnp.asarray(x, jnp.float32))
  i = state.step
  keys = jax.random.split(jax.random.fold_in(state.rng, i))  # (posterior sample, LPIPS dropout)
  lp = state.lpips_params if state.lpips_params is not None else ctx.lpips_params
  if ctx.lpips is not None and lp is None:
    raise ValueError("config.loss.perceptual_weight > 0 needs LPIPS params: pass "
                     "lpips_params to create_train_state (or set perceptual_weight=0)")
  g = generator_step(ctx, state, x, keys, lp)
  d = discriminator_step(ctx, state, x, g.recon, g.disc_stats)
  new_state, norms, finite, ok = apply_gradients(ctx, state, g, d)
  return new_state, step_metrics(g, d, norms, finite, ok, new_state, i)


def apply_gradients(ctx, state, g: GeneratorOut, d: DiscriminatorOut):
  """Optimizers, EMA and the non-finite guard: `(new_state, norms, finite, ok)`. Everything
  here is a pass over parameter-sized trees (no activations)."""
  with jax.named_scope("optimizer"):
    upd = optimizer_updates(ctx, state, g.grads, d.grads)
  with jax.named_scope("ema"):
    # Skipped (non-finite) steps are not EMA updates.
    ema = ema_update(state.ema_params, upd.g_params, ctx.ema_decay,
                     state.step - state.skipped + 1)
  with jax.named_scope("nonfinite_guard"):
    # The update norms (and so `ok`) come from a second trace of the optimizers behind an
    # optimization barrier, which XLA cannot merge with the first: it recomputes the elementwise
    # Adam update inside a reduction over grads and moments. Taken from `upd`, the updates were
    # written out and read back, and the guarded write of params and moments waited on them;
    # now that write is one fused pass per leaf. XLA's bytes accessed for this function on a
    # v5e chip (stage 1): 30.2 -> 20.1 GB per step; in the whole step (2 clips per chip)
    # 242.7 -> 238.2 GB, all of it on-chip staging (HBM bytes unchanged). Same semantics.
    probe = optimizer_updates(ctx, *jax.lax.optimization_barrier((state, g.grads, d.grads)))
    norms = update_norms(state, g.grads, d.grads, probe, ctx.fix_encoder)
    finite = finite_checks(g, d, norms)
    ok = jnp.all(jnp.stack(list(finite.values())))
    new_state = guarded_state(state, ok, upd, d.batch_stats, ema, d.lecam)
  return new_state, norms, finite, ok


def make_train_step(config, lpips_params=None, mesh=None, platform=None):
  """Returns the pure `train_step(state, batch) -> (state, metrics)` for `config`.

  `batch`: `{"video": (B, T, H, W, 3) float}` (or the array itself), B divisible by the data
  axis when sharded. `lpips_params`: a fallback used only when `state.lpips_params` is None; it
  becomes a compile-time constant, so prefer keeping them in the state (`create_train_state`).
  `mesh`: the training mesh; with a "space" axis (`config.train.mesh.space`) the videos,
  reconstructions and the LPIPS / discriminator inputs are pinned to the height-split layout
  (`mesh.constrain_height`), so every activation stays split (XLA exchanges conv halos).
  `platform`: the backend whose compute dtype and model forms to trace (default: the mesh's
  devices', else JAX's default backend).
  `metrics`: float32/int32 scalars: every loss term, `d_weight`, `disc_factor` (G) and
  `disc_factor_d`, `logvar`, `g_/d_ grad_norm | param_norm | update_norm`, `finite/<term>`
  (1 = finite), `nonfinite` (1 = update skipped), `nonfinite_streak`, `skipped`.
  """
  if platform is None:
    platform = mesh_lib.platform_of(mesh) if mesh is not None else jax.default_backend()
  ctx = step_context(config, platform, lpips_params, mesh)

  def train_step(state, batch):
    # At trace time: the forms of the target platform, and of training (not inference).
    with layers.lowering_platform(platform), layers.training_forms():
      return train_step_body(ctx, state, batch)

  train_step.platform = platform
  train_step.model_config = ctx.model_config
  train_step.compute_dtype = str(ctx.compute_dtype)
  return train_step
