"""Training state of the VidTok GAN: one pytree holding everything that changes.

`TrainState` leaves (shapes for a VidTok params tree `P` and discriminator params `D`):
  step              int32 ()      training iteration i (G update = Lightning step 2i, D = 2i+1)
  g_params          {"model": P, "logvar": f32 ()}  autoencoder params + the learned NLL logvar
  d_params          D             discriminator params
  d_batch_stats     {"main_k": {"mean", "var"}}  discriminator BatchNorm running statistics
  g_opt_state       optax state of `make_optimizers(config)[0]` (no Adam moments for a frozen
                    encoder: `multi_transform` + `set_to_zero` keeps `MaskedNode`s there)
  d_opt_state       optax state of the discriminator optimizer
  ema_params        like `g_params` (LitEma shadow), or None when `config.train.ema_decay` is None
  lecam             `losses.LeCAMState` (real/fake logit EMAs, f32 scalars)
  rng               uint32 (2,) raw key; per-step randomness is `fold_in(rng, step)`
  nonfinite_streak  int32 ()      consecutive skipped (non-finite) steps
  skipped           int32 ()      total skipped steps
  lpips_params      frozen LPIPS params (never trained, never in an optimizer), or None when
                    `config.loss.perceptual_weight == 0`. Kept in the state rather than closed
                    over because jit embeds closed-over arrays as HLO constants (VGG16: 58 MB).
                    A checkpointer may drop it (`state.replace(lpips_params=None)`) and put it
                    back after restoring.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

import vidtok_jax
from vidtok_jax.train import losses
from vidtok_jax.train import precision as precision_lib
from vidtok_jax.models.discriminator import PatchDiscriminator

# Top-level VidTok param subtrees frozen by `fix_encoder` ("regularization" holds the FSQ
# projections when dim != len(levels): official encoding, regularizer included, runs without
# gradients in stage 2).
FROZEN_WITH_ENCODER = ("encoder", "regularization")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  g_params: Any
  d_params: Any
  d_batch_stats: Any
  g_opt_state: Any
  d_opt_state: Any
  ema_params: Any
  lecam: losses.LeCAMState
  rng: jax.Array
  nonfinite_streak: jax.Array
  skipped: jax.Array
  lpips_params: Any = None


def model_config(config, backend=None) -> ml_collections.ConfigDict:
  """`config.model` with the compute dtype and precision of `config.train` (`"auto"` resolved
  for `backend`, default JAX's; params stay float32)."""
  mc = config.model.copy_and_resolve_references()
  dtype = train_dtype(config, backend)
  mc.unlock()
  if dtype != "float32":
    mc.dtype = dtype
  mc.precision = precision_lib.resolve_precision(config.train.get("precision", "auto"), dtype,
                                                 mc.precision)
  return mc


def train_dtype(config, backend=None) -> str:
  """`config.train.dtype` resolved: "float32" or "bfloat16" ("auto": bf16 on GPU/TPU)."""
  return precision_lib.resolve_dtype(config.train.dtype, backend)


def compute_dtype(config, backend=None):
  return jnp.dtype(train_dtype(config, backend))


def make_discriminator(config, backend=None) -> nn.Module:
  """The PatchGAN of `config.loss` (2-D on frames or 3-D on clips), in the compute dtype."""
  lc = config.loss
  dims = {"2d": 2, "3d": 3}.get(lc.disc_type)
  if dims is None:
    raise ValueError(f"config.loss.disc_type must be '2d' or '3d', got {lc.disc_type!r}")
  return PatchDiscriminator(dims=dims, ndf=lc.disc_ndf, n_layers=lc.disc_layers,
                            dtype=compute_dtype(config, backend))


def g_param_labels(g_params, fix_encoder: bool):
  """Optax labels: "frozen" for the encoder side when `fix_encoder`, else "train"."""
  def label(path, _):
    keys = tuple(getattr(p, "key", None) for p in path)
    frozen = fix_encoder and keys[0] == "model" and keys[1] in FROZEN_WITH_ENCODER
    return "frozen" if frozen else "train"
  return jax.tree_util.tree_map_with_path(label, g_params)


def make_optimizers(config):
  """`(g_tx, d_tx)`: clip_by_global_norm(20) + Adam(1e-5, 0.9, 0.999, 1e-8) each, as officially.

  With `fix_encoder` the G chain runs under `multi_transform` on the trainable labels only, so
  the clipping norm covers trainable grads (as torch clips the optimizer's param groups) and no
  Adam moments exist for the encoder; its updates are zeros.
  """
  tc = config.train

  def adam(lr, clip):
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adam(lr, b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps))

  g_tx = adam(tc.lr, tc.grad_clip)
  if tc.fix_encoder:
    g_tx = optax.multi_transform({"train": g_tx, "frozen": optax.set_to_zero()},
                                 lambda p: g_param_labels(p, True))
  return g_tx, adam(tc.disc_lr, tc.disc_grad_clip)


def _disc_dummy_input(config):
  # Param shapes do not depend on the spatial size; 32^2 is the smallest size the 3-layer
  # PatchGAN maps to a non-empty logit map.
  if config.loss.disc_type == "3d":
    return jnp.zeros((1, 5, 32, 32, 3), jnp.float32)
  return jnp.zeros((1, 32, 32, 3), jnp.float32)


def _raw_key(rng):
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def create_train_state(config, rng, params=None, lpips_params=None,
                       disc_variables=None) -> TrainState:
  """A fresh `TrainState` at iteration 0.

  Args:
    config: the full config (`configs/vidtok.py`: `model`, `train`, `loss`).
    rng: a PRNG key (raw uint32 (2,) or typed); split for model init, disc init and the state.
    params: optional VidTok params tree (e.g. from `init_from`, or random ones in tests);
      default `vidtok_jax.init_params`.
    lpips_params: LPIPS params; default `load_lpips_params(config.loss.lpips_net)` when
      `config.loss.perceptual_weight > 0`, and None otherwise.
    disc_variables: optional `{"params", "batch_stats"}` of the discriminator.
  """
  rng = _raw_key(jnp.asarray(rng))
  k_model, k_disc, k_state = jax.random.split(rng, 3)
  if params is None:
    params = vidtok_jax.init_params(model_config(config), k_model)
  g_params = {"model": jax.tree.map(jnp.asarray, params), "logvar": jnp.zeros((), jnp.float32)}
  if disc_variables is None:
    disc_variables = make_discriminator(config).init(k_disc, _disc_dummy_input(config),
                                                     train=False)
  d_params = disc_variables["params"]
  d_batch_stats = disc_variables.get("batch_stats", {})
  if config.loss.perceptual_weight > 0 and lpips_params is None:
    from vidtok_jax.metrics.lpips import load_lpips_params  # heavy; only when used
    lpips_params = load_lpips_params(net=config.loss.lpips_net)
  if config.loss.perceptual_weight <= 0:
    lpips_params = None
  if lpips_params is not None:
    lpips_params = jax.tree.map(jnp.asarray, lpips_params)
  g_tx, d_tx = make_optimizers(config)
  ema = None
  if config.train.ema_decay is not None:
    ema = jax.tree.map(jnp.copy, g_params)  # LitEma: the shadow starts as a copy
  # Distinct buffers per leaf: a jit with `donate_argnums=0` refuses one buffer donated twice.
  zero = lambda: jnp.zeros((), jnp.int32)
  return TrainState(step=zero(), g_params=g_params, d_params=d_params,
                    d_batch_stats=d_batch_stats, g_opt_state=g_tx.init(g_params),
                    d_opt_state=d_tx.init(d_params), ema_params=ema, lecam=losses.lecam_init(),
                    rng=k_state, nonfinite_streak=zero(), skipped=zero(),
                    lpips_params=lpips_params)


def abstract_train_state(config, params=None, lpips_params=None) -> TrainState:
  """`create_train_state`'s result as `jax.ShapeDtypeStruct`s (no compute, no memory)."""
  if params is None:
    params = vidtok_jax.abstract_params(model_config(config))
  return jax.eval_shape(
      lambda p: create_train_state(config, jax.random.PRNGKey(0), p, lpips_params), params)
