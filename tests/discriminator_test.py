"""Tests for vidtok_jax.models.discriminator: parity with the official PatchGANs + invariants."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import Ref, max_abs
from vidtok_jax.models import discriminator as disc_lib
from vidtok_jax.models.discriminator import PatchDiscriminator, disc_params_from_torch

CASES = {"disc2d_ndf8": 2, "disc3d_ndf8": 3}  # reference case -> dims
ATOL = 1e-5  # reference README: modules atol 1e-5 (float32 vs float64 reference)


@functools.lru_cache(maxsize=None)
def _run(name, dtype):
  r = Ref(name)
  variables = disc_params_from_torch(r.params, prefix="")
  variables = jax.tree.map(lambda a: a.astype(dtype), variables)
  model = PatchDiscriminator(dims=CASES[name], ndf=8, n_layers=3, dtype=dtype,
                             param_dtype=dtype)
  x = jnp.asarray(np.moveaxis(r.inputs["x"], 1, -1), dtype)
  # One jitted program for both modes: far fewer compiles than op-by-op.
  y_eval, (y_train, upd) = jax.jit(lambda v, x: (
      model.apply(v, x, train=False),
      model.apply(v, x, train=True, mutable=["batch_stats"])))(variables, x)
  got = {"y_eval": np.moveaxis(np.asarray(y_eval), -1, 1),
         "y_train": np.moveaxis(np.asarray(y_train), -1, 1)}
  for b in (3, 6, 9):
    got[f"after_train/main.{b}.running_mean"] = upd["batch_stats"][f"main_{b}"]["mean"]
    got[f"after_train/main.{b}.running_var"] = upd["batch_stats"][f"main_{b}"]["var"]
  return r, variables, model, x, got


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_float32(name):
  r, _, _, _, got = _run(name, jnp.float32)
  assert set(got) == {k for k in r.out if not k.endswith("num_batches_tracked")}
  for key, value in got.items():
    ref = r.expected(key)
    assert value.shape == ref.shape, key
    err = max_abs(value, ref)
    print(f"{name} {key}: max_abs {err:.3g}")
    assert err < ATOL, (key, err)
  # Unbiased running-var update is what separates torch from flax.nn.BatchNorm: the biased one
  # would be off by var/(n-1) * 0.1, far above ATOL for these batch sizes.
  for b in (3, 6, 9):
    assert int(r.out[f"after_train/main.{b}.num_batches_tracked"]) == 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_float64(name):
  with jax.enable_x64(True):
    r, _, _, _, got = _run(name, jnp.float64)
    for key, value in got.items():
      ref = r.expected(key)
      assert max_abs(value, ref) <= 1e-10 * max(1.0, float(np.abs(ref).max())), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_param_tree_matches_init(name):
  r, variables, model, x, _ = _run(name, jnp.float32)
  init = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  assert jax.tree.structure(init) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(variables)):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_init_and_batch_stats_modes():
  model = PatchDiscriminator(dims=2, ndf=16)  # enough weights for the init statistics
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  v = jax.jit(lambda k, x: model.init(k, x, train=True))(jax.random.key(0), x)
  p = v["params"]
  assert set(p) == {"main_0", "main_2", "main_3", "main_5", "main_6", "main_8", "main_9",
                    "main_11"}
  assert set(p["main_2"]) == {"kernel"} and set(p["main_11"]) == {"kernel", "bias"}
  # SPEC §7.6 init: conv N(0, 0.02); BN scale N(1, 0.02), bias 0; conv bias torch default.
  k = np.asarray(p["main_8"]["kernel"])
  assert k.shape == (4, 4, 64, 128)
  assert abs(k.mean()) < 1e-3 and abs(k.std() - 0.02) < 1e-3
  s = np.asarray(p["main_9"]["scale"])
  assert abs(s.mean() - 1.0) < 0.01 and 0.01 < s.std() < 0.03
  np.testing.assert_array_equal(p["main_9"]["bias"], 0.0)
  b0 = np.asarray(p["main_0"]["bias"])  # U(+-1/sqrt(3*4*4))
  assert np.all(np.abs(b0) <= 1 / np.sqrt(48)) and b0.std() > 0.03
  # init(train=True) must not run the running-stat update.
  for name in ("main_3", "main_6", "main_9"):
    np.testing.assert_array_equal(v["batch_stats"][name]["mean"], 0.0)
    np.testing.assert_array_equal(v["batch_stats"][name]["var"], 1.0)
  f = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"]),
              static_argnums=2)
  _, upd = f(v, x, False)
  for a, b in zip(jax.tree.leaves(upd["batch_stats"]), jax.tree.leaves(v["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  _, upd = f(v, x, True)
  assert not np.allclose(upd["batch_stats"]["main_3"]["var"], 1.0)


def test_batchnorm_matches_torch_formula():
  x = jax.random.normal(jax.random.key(2), (2, 3, 5, 4)) * 3.0 + 1.0
  bn = disc_lib.TorchBatchNorm()
  v = jax.jit(lambda k, x: bn.init(k, x, train=True))(jax.random.key(0), x)
  y, upd = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  xn = np.asarray(x, np.float64).reshape(-1, 4)
  mean, var_b, var_u = xn.mean(0), xn.var(0), xn.var(0, ddof=1)
  scale, bias = np.asarray(v["params"]["scale"]), np.asarray(v["params"]["bias"])
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 4),
                             (xn - mean) / np.sqrt(var_b + 1e-5) * scale + bias, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var_u, rtol=1e-6)
  with pytest.raises(ValueError, match="> 1 value per channel"):
    bn.apply(v, x[:1, :1, :1], train=True, mutable=["batch_stats"])


def test_output_shapes_of_released_size():
  # SPEC §7.6: 2-D 128^2 -> 14x14, 256^2 -> 30x30; 3-D 17x128^2 -> 5x16x16 (ndf 64, 3 layers).
  def shape(model, x_shape):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x).shape

  assert shape(PatchDiscriminator(dims=2), (2, 128, 128, 3)) == (2, 14, 14, 1)
  assert shape(PatchDiscriminator(dims=2), (1, 256, 256, 3)) == (1, 30, 30, 1)
  assert shape(PatchDiscriminator(dims=3), (1, 17, 128, 128, 3)) == (1, 5, 16, 16, 1)


def test_bfloat16_compute_close_to_float32():
  r, v32, _, x, got = _run("disc2d_ndf8", jnp.float32)
  y32 = got["y_train"]
  model = PatchDiscriminator(dims=2, ndf=8, dtype=jnp.bfloat16)
  y16, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v32, x)
  y16 = np.moveaxis(np.asarray(y16), -1, 1)
  assert y16.dtype == jnp.float32
  assert max_abs(y16, y32) < 0.05 * float(np.abs(y32).max())


def test_converter_prefix_and_errors():
  r = Ref("general_loss_2d")  # full loss state_dict: loss.discriminator.*, n_layers = 1
  v = disc_params_from_torch(r.params)
  assert set(v["params"]) == {"main_0", "main_2", "main_3", "main_5"}
  w = r.params["loss.discriminator.main.2.weight"]
  np.testing.assert_array_equal(v["params"]["main_2"]["kernel"], w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["batch_stats"]["main_3"]["var"],
                                r.params["loss.discriminator.main.3.running_var"])

  sd = dict(r.params)
  del sd["loss.discriminator.main.3.running_mean"]
  with pytest.raises(KeyError, match=r"loss\.discriminator\.main\.3\.running_mean"):
    disc_params_from_torch(sd)
  sd = dict(r.params)
  sd["loss.discriminator.main.5.weight"] = np.zeros((1, 64, 4, 4), np.float32)
  with pytest.raises(ValueError, match=r"main\.5\.weight.*\(1, 128, 4, 4\)"):
    disc_params_from_torch(sd)
  sd = dict(r.params)
  sd["loss.discriminator.main.4.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(ValueError, match=r"unexpected.*main\.4\.weight"):
    disc_params_from_torch(sd)
  with pytest.raises(KeyError, match=r"main\.0\.weight"):
    disc_params_from_torch(r.params, prefix="discriminator.")


@pytest.mark.parametrize("name", sorted(CASES))
def test_old_class_names_warn_and_match(name):
  # One release of the pre-`PatchDiscriminator` names: same arguments (positional too), same
  # params tree and logits, so code and checkpoints written against them keep working.
  r, variables, model, x, got = _run(name, jnp.float32)
  old = {2: disc_lib.NLayerDiscriminator, 3: disc_lib.NLayerDiscriminator3D}[CASES[name]]
  with pytest.warns(DeprecationWarning, match=f"dims={CASES[name]}"):
    m = old(8, 3, jnp.float32, jnp.float32)
  assert m == model
  init = jax.eval_shape(lambda x: m.init(jax.random.key(0), x, train=False), x)
  assert jax.tree.structure(init) == jax.tree.structure(variables)
  y = jax.jit(lambda v, x: m.apply(v, x, train=False))(variables, x)
  np.testing.assert_array_equal(np.moveaxis(np.asarray(y), -1, 1), got["y_eval"])


def test_dims_and_input_rank_errors():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="dims must be 2 or 3, got 1"):
    PatchDiscriminator(dims=1).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r"dims=3\) expects \(B, T, H, W, C\), got \(1, 32, 32, 3\)"):
    PatchDiscriminator(dims=3).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r"dims=2\) expects \(N, H, W, C\)"):
    PatchDiscriminator(dims=2).init(jax.random.key(0), x[None], train=False)
