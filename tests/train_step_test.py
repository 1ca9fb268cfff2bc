"""The pure GAN train step (`vidtok_jax/train/step.py`) on tiny configs, against losses.py.

Compile time dominates: one jitted step per config is shared by several tests, and the 8-device
sharding check runs in a subprocess started when this module is set up, so it compiles in
parallel with the in-process tests (XLA_FLAGS must be set before jax is imported).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

import vidtok_jax
from vidtok_jax import train
from vidtok_jax.train import losses
from vidtok_jax.train.step import get_last_layer

TESTS = pathlib.Path(__file__).resolve().parent
_SPEC = importlib.util.spec_from_file_location("vidtok_configs", TESTS.parent / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)

KL, FSQ = "kl_causal_488_4chn,tiny", "fsq_causal_488_4096,tiny"


def tiny_config(arg=KL, **train_overrides):
  cfg = configs.get_config(arg)
  cfg.loss.perceptual_weight = 0.0  # the LPIPS path has its own test
  for k, v in train_overrides.items():
    cfg.train[k] = v
  return cfg


def video(seed=1, shape=(2, 9, 32, 32, 3)):
  return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)


def make(cfg, seed=0):
  """(state, jitted step) with numpy-random VidTok params (no `init` compile)."""
  params = random_params(vidtok_jax.abstract_params(cfg.model), seed)
  state = train.create_train_state(cfg, jax.random.PRNGKey(seed), params)
  return state, jax.jit(train.make_train_step(cfg))  # no donation: tests reuse the input state


def leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def changed_leaves(a, b):
  return sum(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def adam_max_move(lr, b1, b2, steps):
  """The most `steps` bias-corrected Adam updates (eps >= 0) can move one parameter, any grads.

  Step t moves it by lr * |m_hat| / sqrt(v_hat), m_hat = (1-b1) sum_i b1^(t-i) g_i / (1-b1^t),
  v_hat = (1-b2) sum_i b2^(t-i) g_i^2 / (1-b2^t); Cauchy-Schwarz bounds that ratio by
  sqrt(1-b2^t) / (1-b1^t) * sqrt(sum_i (1-b1)^2 b1^(2(t-i)) / ((1-b2) b2^(t-i))), which is
  reached (g_i proportional to the weights' ratio): 1 at t = 1, 1.0014 at t = 2 for Adam's
  defaults.
  """
  total = 0.0
  for t in range(1, steps + 1):
    k = np.arange(t)  # t - i
    s = np.sum((1 - b1) ** 2 * b1 ** (2 * k) / ((1 - b2) * b2**k))
    total += lr * np.sqrt(1 - b2**t) / (1 - b1**t) * np.sqrt(s)
  return float(total)


# ---------------------------------------------------------------- the 8-device subprocess

SHARDED_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import conftest  # precision + fast-compile flags, random_params
import jax, jax.numpy as jnp, numpy as np
import train_step_test as t
from vidtok_jax import train
from vidtok_jax.train import state as state_lib

assert jax.device_count() == 8, jax.devices()
cfg = t.tiny_config(ema_decay=0.99)
state32, _ = t.make(cfg)
state32 = state32.replace(step=jnp.asarray(10001, jnp.int32))  # both GAN gates on (quirk 15)
state32 = jax.device_get(state32)  # host copy: each run's device_put makes fresh buffers
xs32 = [np.asarray(t.video(s, (8, 5, 32, 32, 3))) for s in (3, 4)]
f64 = lambda tree: jax.tree.map(
    lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating)
    else a, tree)

def run(state, xs, devices, fsdp=False):
  cfg.train.mesh.fsdp, cfg.train.mesh.fsdp_size = fsdp, 2
  mesh = train.make_mesh(cfg, devices)
  sh = train.state_shardings(mesh, jax.eval_shape(lambda: state), fsdp=fsdp, min_size=1024)
  st = jax.device_put(state, sh)
  step = jax.jit(train.make_train_step(cfg), in_shardings=(sh, train.batch_sharding(mesh)),
                 out_shardings=(sh, None), donate_argnums=0)
  mets = []
  for x in xs:
    st, m = step(st, train.shard_batch(mesh, {"video": x}))
    mets.append(m)
  n_sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(sh))
  return jax.device_get(st), jax.device_get(mets), n_sharded

leaves = lambda tree: jax.tree_util.tree_leaves_with_path(tree)

def rel(a, b, floor):
  return float(np.max(np.abs(a - b))) / max(floor, float(np.max(np.abs(b))))

def compare(ref, ref_m, runs):
  # Leaves whose true gradient is zero carry rounding noise only, which Adam scales to +-lr
  # steps: the attention key bias (softmax is shift invariant). Found from the reference's mu.
  mu = {"g": ref.g_opt_state[1][0].mu, "d": ref.d_opt_state[1][0].mu}
  noise = set()
  for k, tree in mu.items():
    top = max(float(np.max(np.abs(v))) for v in jax.tree.leaves(tree))
    noise |= {k + jax.tree_util.keystr(p) for p, v in leaves(tree)
              if float(np.max(np.abs(v))) < 1e-6 * top}
  out = {}
  for name, (st, mets, n_sharded) in runs.items():
    r = {"n_sharded": n_sharded, "noise": sorted(noise)}
    for part, k in (("g_params", "g"), ("ema_params", "g"), ("d_params", "d"),
                    ("d_batch_stats", "s")):  # atol 1e-5 * scale
      r[part] = max(rel(a, b, 1.0) for (p, a), b in zip(leaves(getattr(st, part)),
                                                        jax.tree.leaves(getattr(ref, part)))
                    if k + jax.tree_util.keystr(p) not in noise)
    # Adam moments expose the (clipped) gradients themselves: "leaf" relative to each leaf's
    # scale, "tree" relative to the largest moment of its optimizer.
    for scope in ("leaf", "tree"):
      worst = 0.0
      for k, part in (("g", "g_opt_state"), ("d", "d_opt_state")):
        for m in ("mu", "nu"):
          a_tree = getattr(getattr(st, part)[1][0], m)
          b_tree = getattr(getattr(ref, part)[1][0], m)
          top = max(float(np.max(np.abs(v))) for v in jax.tree.leaves(b_tree))
          worst = max([worst] + [rel(a, b, 1e-30 if scope == "leaf" else top)
                                 for (p, a), b in zip(leaves(a_tree), jax.tree.leaves(b_tree))
                                 if k + jax.tree_util.keystr(p) not in noise])
      r["opt_moments_" + scope] = worst
    r["metrics"] = max(abs(float(m[k]) - float(rm[k])) / (abs(float(rm[k])) + 1e-6)
                       for m, rm in zip(mets, ref_m) for k in rm)
    r["steps"] = int(st.step)
    out[name] = r
  return out

ref, ref_m, _ = run(state32, xs32, jax.devices()[:1])
# float32: the FSDP mesh (data=4 x fsdp=2) only; plain data parallel is checked exactly below.
res = {"float32": compare(ref, ref_m, {"fsdp": run(state32, xs32, jax.devices(), True)})}
# The same steps computed in float64 (model, discriminator, state and inputs): float32 rounding,
# which the sharded reduction orders change and cancelling gradient sums amplify, is gone, so
# the sharded steps must equal the 1-device step to float64 precision.
state_lib.train_dtype = lambda config, backend=None: "float64"
cfg.model.param_dtype = "float64"
with jax.enable_x64(True):
  state64, xs64 = f64(state32), f64(xs32)
  ref, ref_m, _ = run(state64, xs64, jax.devices()[:1])
  assert all(a.dtype == np.float64 for a in jax.tree.leaves(ref.g_params))
  res["float64"] = compare(ref, ref_m, {"data": run(state64, xs64, jax.devices()),
                                        "fsdp": run(state64, xs64, jax.devices(), True)})
print("RESULT" + json.dumps(res))
"""

_SHARDED = "test_sharded_8_devices_matches_1_device"


@pytest.fixture(scope="module", autouse=True)
def sharded_run(request):
  """Starts the 8-device subprocess at module setup (only if its test is selected)."""
  if not any(item.name == _SHARDED for item in request.session.items):
    yield None
    return
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.Popen([sys.executable, "-c", SHARDED_SCRIPT, str(TESTS)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------- shared KL setup


@pytest.fixture(scope="module")
def kl():
  cfg = tiny_config(ema_decay=0.999)
  state, step = make(cfg)
  return cfg, state, step


def reference(cfg, state):
  """Independent recomputation of the loss pieces from losses.py and plain `jax.grad`."""
  lc = cfg.loss
  model = vidtok_jax.VidTok(cfg.model)
  disc = train.make_discriminator(cfg)
  weights = {"kl_loss": lc.kl_weight, "aux_loss": lc.aux_weight}

  @jax.jit
  def ref(state, x):
    i = state.step
    k_sample, _ = jax.random.split(jax.random.fold_in(state.rng, i))
    dvars = {"params": state.d_params, "batch_stats": state.d_batch_stats}

    def pieces(mp, logvar, w):
      dec = dict(mp["decoder"], conv_out={"conv": {**mp["decoder"]["conv_out"]["conv"],
                                                   "kernel": w}})
      _, recon, aux = model.apply({"params": {**mp, "decoder": dec}}, x, sample=True, step=i,
                                  rngs={"sample": k_sample})
      nll, log = losses.reconstruction_nll(x, recon, logvar)
      logits, upd = disc.apply(dvars, losses.fold_frames(recon), train=True,
                               mutable=["batch_stats"])
      g = losses.non_saturating_gen_loss(logits)
      return nll, g, aux, recon, log, upd["batch_stats"]

    mp, logvar = state.g_params["model"], state.g_params["logvar"]
    w = get_last_layer(mp)
    nll, g, aux, recon, log, stats = pieces(mp, logvar, w)
    gw_nll = jax.grad(lambda w: pieces(mp, logvar, w)[0])(w)
    gw_g = jax.grad(lambda w: pieces(mp, logvar, w)[1])(w)
    d_weight = lc.disc_weight * jnp.clip(
        jnp.linalg.norm(gw_nll) / (jnp.linalg.norm(gw_g) + 1e-4), 0.0, 1e4)
    total, g_log = losses.generator_loss(nll, g, d_weight, 2 * i, aux, log,
                                         disc_start=lc.disc_start, regularization_weights=weights)

    def total_fn(gp):
      n, gg, a = pieces(gp["model"], gp["logvar"], get_last_layer(gp["model"]))[:3]
      return losses.generator_loss(n, gg, d_weight, 2 * i, a, disc_start=lc.disc_start,
                                   regularization_weights=weights)[0]

    g_grad_norm = losses.global_norm(jax.grad(total_fn)(state.g_params))

    def d_fn(dp):
      lr, s1 = disc.apply({"params": dp, "batch_stats": stats}, losses.fold_frames(x),
                          train=True, mutable=["batch_stats"])
      lf, _ = disc.apply({"params": dp, "batch_stats": s1["batch_stats"]},
                         losses.fold_frames(recon), train=True, mutable=["batch_stats"])
      return losses.discriminator_loss(lr, lf, state.lecam, 2 * i + 1, disc_start=lc.disc_start,
                                       lecam_weight=lc.lecam_weight, lecam_decay=lc.lecam_decay)

    (d_total, _, d_log) = d_fn(state.d_params)
    d_grad_norm = losses.global_norm(jax.grad(lambda dp: d_fn(dp)[0])(state.d_params))
    assert set(g_log).isdisjoint({"disc_loss", "non_saturated_d_loss", "lecam_loss"})
    return dict(g_log, **{k: v for k, v in d_log.items() if k != "disc_factor"},
                total_loss=total, reg_loss=losses.regularization_loss(aux, weights),
                g_grad_norm=g_grad_norm, d_grad_norm=d_grad_norm, disc_total=d_total,
                disc_factor_d=d_log["disc_factor"])

  return ref


# ---------------------------------------------------------------- tests


def test_step_matches_losses_and_gates(kl):
  """One step per gate setting; every reported term equals a direct losses.py computation."""
  cfg, state0, step = kl
  x = video()
  ref = reference(cfg, state0)
  keys = ["total_loss", "nll_loss", "rec_loss", "g_loss", "kl_loss", "reg_loss", "d_weight",
          "logits_real", "logits_fake", "lecam_loss", "non_saturated_d_loss", "disc_loss",
          "g_grad_norm", "d_grad_norm", "logvar"]
  # Quirk 15: G compares 2i, D compares 2i+1 with disc_start 20001.
  for i, (df_g, df_d) in {0: (0, 0), 9999: (0, 0), 10000: (0, 1), 10001: (1, 1)}.items():
    s = state0.replace(step=jnp.asarray(i, jnp.int32))
    new, m = step(s, {"video": x})
    assert all(np.isfinite(float(v)) for v in m.values()), m
    assert int(new.step) == i + 1 and float(m["nonfinite"]) == 0.0
    assert (float(m["disc_factor"]), float(m["disc_factor_d"])) == (df_g, df_d), i
    r = jax.device_get(ref(s, x))
    for k in keys:
      np.testing.assert_allclose(float(m[k]), float(r[k]), rtol=2e-4, atol=1e-7, err_msg=(i, k))
    assert changed_leaves(new.g_params, s.g_params) == len(jax.tree.leaves(s.g_params))
    assert not leaves_equal(new.d_batch_stats, s.d_batch_stats)  # BN train mode in both steps
    assert leaves_equal(new.d_params, s.d_params) == (df_d == 0)  # disc_factor 0: zero grads
    assert float(m["d_weight"]) > 0  # computed every step (quirk 21), also before disc_start
  # The G gate really removes the adversarial gradient: at 10000 the total is nll + reg.
  m = step(state0.replace(step=jnp.asarray(10000, jnp.int32)), {"video": x})[1]
  np.testing.assert_allclose(float(m["total_loss"]), float(m["nll_loss"] + m["reg_loss"]),
                             rtol=1e-6)


def test_nonfinite_batch_skips_update(kl):
  cfg, state0, step = kl
  x = video()
  bad, m = step(state0, {"video": x.at[0, 3, 5, 7, 1].set(jnp.nan)})
  for f in ("g_params", "d_params", "d_batch_stats", "g_opt_state", "d_opt_state", "ema_params",
            "lecam", "rng"):
    assert leaves_equal(getattr(bad, f), getattr(state0, f)), f
  assert (int(bad.step), int(bad.skipped), int(bad.nonfinite_streak)) == (1, 1, 1)
  assert float(m["nonfinite"]) == 1.0 and float(m["finite/nll_loss"]) == 0.0
  assert float(m["finite/total_loss"]) == 0.0 and float(m["finite/g_grads"]) == 0.0
  assert (int(m["skipped"]), int(m["nonfinite_streak"])) == (1, 1)
  good, m = step(bad, {"video": x})
  assert (int(good.step), int(good.skipped), int(good.nonfinite_streak)) == (2, 1, 0)
  assert float(m["nonfinite"]) == 0.0 and all(
      float(v) == 1.0 for k, v in m.items() if k.startswith("finite/"))
  assert changed_leaves(good.g_params, bad.g_params) > 0


def test_ema_follows_litema_formula(kl):
  cfg, state0, step = kl
  new, _ = step(state0, {"video": video()})
  n = 1  # LitEma counts this update: decay = min(0.999, (1 + n) / (10 + n)) = 2/11
  decay = min(cfg.train.ema_decay, (1 + n) / (10 + n))
  moved = 0
  for e0, p1, e1 in zip(*(jax.tree.leaves(t) for t in
                          (state0.ema_params, new.g_params, new.ema_params)), strict=True):
    e0, p1, e1 = (np.asarray(a, np.float64) for a in (e0, p1, e1))
    np.testing.assert_allclose(e1, e0 - (1 - decay) * (e0 - p1), rtol=1e-6, atol=1e-9)
    moved += np.any(e1 != e0)
    # Between the old shadow and the new params (closer to the params: 1 - decay = 9/11).
    assert np.all(np.abs(e1 - p1) <= np.abs(e0 - p1) + 1e-7)
  assert moved == len(jax.tree.leaves(new.ema_params))


def test_stage2_frozen_encoder_bf16():
  """fix_encoder (stage 2) in bf16 compute: encoder bitwise frozen, no Adam state for it."""
  cfg = tiny_config("kl_causal_488_4chn,stage=2,tiny", dtype="bfloat16")
  assert cfg.train.fix_encoder
  state0, step = make(cfg)
  keystr = jax.tree_util.keystr
  opt_paths = [keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state0.g_opt_state)]
  assert not any("'encoder'" in p for p in opt_paths), opt_paths
  n_trainable = len(jax.tree.leaves(state0.g_params)) - len(
      jax.tree.leaves(state0.g_params["model"]["encoder"]))
  assert sum(".mu[" in p for p in opt_paths) == n_trainable  # decoder + logvar moments only
  state = state0.replace(step=jnp.asarray(10001, jnp.int32))  # adversarial term on
  for s in (5, 6):
    state, m = step(state, {"video": video(s)})
    assert float(m["nonfinite"]) == 0.0, m
  enc0, enc = state0.g_params["model"]["encoder"], state.g_params["model"]["encoder"]
  assert leaves_equal(enc, enc0)
  dec0, dec = state0.g_params["model"]["decoder"], state.g_params["model"]["decoder"]
  assert changed_leaves(dec, dec0) == len(jax.tree.leaves(dec0))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.g_params))
  assert jax.tree.structure(state.g_opt_state) == jax.tree.structure(state0.g_opt_state)
  assert not leaves_equal(state.d_params, state0.d_params)


def test_fsq_step_includes_aux_loss():
  cfg = tiny_config(FSQ)
  assert cfg.loss.aux_weight == 1.0
  state0, step = make(cfg)
  x = video(7)
  for i, w in ((0, 0.3), (1000, 0.2), (2000, 0.1)):  # entropy weight annealed with n = i
    new, m = step(state0.replace(step=jnp.asarray(i, jnp.int32)), {"video": x})
    assert float(m["nonfinite"]) == 0.0 and float(m["disc_factor"]) == 0.0
    assert "kl_loss" not in m
    np.testing.assert_allclose(float(m["reg_loss"]), float(m["aux_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m["total_loss"]), float(m["nll_loss"] + m["aux_loss"]),
                               rtol=1e-5)
    aux = (m["per_sample_entropy"] - m["codebook_entropy"]) * w + 0.25 * m["commit_loss"]
    np.testing.assert_allclose(float(m["aux_loss"]), float(aux), rtol=1e-4, atol=1e-6)
    assert changed_leaves(new.g_params, state0.g_params) > 0


def test_perceptual_term_with_lpips():
  lpips = pytest.importorskip("vidtok_jax.metrics.lpips")
  try:
    lp = lpips.load_lpips_params(net="vgg")
  except Exception as e:  # weights not available here
    pytest.skip(f"LPIPS weights not loadable: {e}")
  cfg = configs.get_config(KL)
  assert cfg.loss.perceptual_weight == 1.0
  params = random_params(vidtok_jax.abstract_params(cfg.model))
  state = train.create_train_state(cfg, jax.random.PRNGKey(0), params, lpips_params=lp)
  new, m = jax.jit(train.make_train_step(cfg))(state, {"video": video()})
  assert float(m["nonfinite"]) == 0.0 and float(m["p_loss"]) > 0
  # logvar = 0: nll = sum(|x - x_rec| + p) / (B T) = mean(rec) * H W C (LPIPS broadcast per frame)
  np.testing.assert_allclose(float(m["nll_loss"]), float(m["rec_loss"]) * 32 * 32 * 3, rtol=1e-5)
  assert leaves_equal(new.lpips_params, state.lpips_params)  # frozen


def test_sharded_8_devices_matches_1_device(sharded_run):
  """Data-parallel and FSDP steps on 8 devices equal the 1-device step: to float64 precision
  when computed in float64 (the sharded math is the same), to float32 noise in float32."""
  out, _ = sharded_run.communicate(timeout=900)
  lines = [l for l in out.splitlines() if l.startswith("RESULT")]
  assert sharded_run.returncode == 0 and lines, out[-4000:]
  res = json.loads(lines[-1][len("RESULT"):])
  for name, r in res["float64"].items():
    assert r["steps"] == 10003, (name, r)
    for part in ("g_params", "d_params", "d_batch_stats", "ema_params"):
      assert r[part] < 1e-12, (name, part, r)  # measured <= 2.2e-16
    assert r["opt_moments_leaf"] < 1e-10, (name, r)  # measured 5e-14: every gradient leaf
    assert r["metrics"] < 1e-6, (name, r)  # the metrics are returned as float32
  # Float32: the reduction order differs (FSDP also partitions the convs), so rounding differs,
  # and Adam's normalised step m_hat / sqrt(v_hat) turns rounding noise on a near-zero gradient
  # element into a step of up to +-lr whatever the gradient's size. No measured tolerance holds
  # across XLA releases for that; the bound is Adam's own (adam_max_move): clipping rescales the
  # gradients only, there is no weight decay nor schedule, so two runs from the same params
  # differ by at most twice the largest move, plus float32 rounding of the params (relative to
  # max(1, scale): a few ulps). The EMA, a convex mix of the params, obeys the same bound. The
  # gradients themselves are compared below through the Adam moments.
  tc = tiny_config().train
  bound = {"g_params": 2 * adam_max_move(tc.lr, tc.adam_b1, tc.adam_b2, 2) + 1e-6,
           "d_params": 2 * adam_max_move(tc.disc_lr, tc.adam_b1, tc.adam_b2, 2) + 1e-6}
  bound["ema_params"] = bound["g_params"]
  for name, r in res["float32"].items():
    assert r["steps"] == 10003, (name, r)
    for part in ("g_params", "d_params", "ema_params"):
      assert r[part] < bound[part], (name, part, bound[part], r)
    # Running BatchNorm statistics (not moved by Adam): measured 4.4e-7.
    assert r["d_batch_stats"] < 1e-5, (name, r)
    # Per leaf, a cancelling gradient sum (encoder biases: 0.005 against a global norm of
    # 3600) loses relative precision (measured 3.7e-3 fsdp); against the largest moment of
    # the optimizer the difference is 1.0e-4.
    assert r["opt_moments_tree"] < 1e-3 and r["metrics"] < 1e-3, (name, r)
  assert res["float64"]["data"]["n_sharded"] == 0, res
  for prec in ("float32", "float64"):
    assert res[prec]["fsdp"]["n_sharded"] > 0, res
    # Only the attention key biases (zero true gradient) are excluded as rounding noise.
    noise = res[prec]["fsdp"]["noise"]
    assert noise and all("['attn_1']['k']" in p for p in noise), res