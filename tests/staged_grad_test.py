"""Staged gradients (`benchmarks/staged_grad.py`, the device benchmark's `--grad staged`): the
same loss and gradient as one jitted program."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, random_params

import vidtok_jax

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark scripts are no package
import stages as stages_lib  # noqa: E402
from staged_grad import StagedGrad, most_flops_within  # noqa: E402


def tiny(name, dtype="float32", **overrides):
  """Width 4, one res block, three levels (both temporal downsamplers): every stage compiles
  as its own program, so the stage count is most of this file's time."""
  cfg = vidtok_jax.load_config(name, **{"ch": 4, "ch_mult": (1, 2, 2), "num_res_blocks": 1,
                                        "dtype": dtype, "param_dtype": dtype, **overrides})
  return vidtok_jax.VidTok(cfg), random_params(vidtok_jax.abstract_params(cfg), seed=0)


def video(t, hw=16, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (1, t, hw, hw, 3)), dtype)


def loss_fn(y, x, aux):
  """L1 plus the regularizer's loss, so gradients also flow through the aux outputs."""
  rec = jnp.mean(jnp.abs(y - x[:, x.shape[1] - y.shape[1]:]))
  return rec + 1e-2 * (aux["kl_loss"] if "kl_loss" in aux else aux["aux_loss"])


def program_value_and_grad(model, params, x, step=0):
  def loss(p):
    _, y, aux = model.apply({"params": p}, x, step=step)
    return loss_fn(y, x, aux)

  return jax.jit(jax.value_and_grad(loss))(params)


def assert_grads_equal(expected, actual, tol):
  """Same tree; every leaf equal to `tol` times the largest gradient entry."""
  assert jax.tree.structure(expected) == jax.tree.structure(actual)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected))
  assert scale > 0
  for (path, e), a in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                          jax.tree.leaves(actual), strict=True):
    assert a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=tol * scale,
                               err_msg=jax.tree_util.keystr(path))


# The staging is the same code for every family (a plan of the model's own modules); these three
# cover the v1.0 frame drop, the v1.1 streaming-form modules and the FSQ aux outputs. The other
# families (non-causal, 444) were dropped from this benchmark helper's tests for CI time.
@pytest.mark.parametrize("name,frames,extra", [
    ("vidtok_kl_causal_488_4chn", 9, {}),  # v1.0: the first f-1 decoded frames are dropped
    ("vidtok_kl_causal_488_4chn_v1_1", 8, {}),  # v1.1: the last T frames are kept
    # integer indices in aux, entropy loss gradient; four levels, as before (at three, a few
    # encoder gradient entries differ by up to 9e-10, over the tolerance)
    ("vidtok_fsq_causal_488_4096", 9, dict(ch_mult=(1, 2, 4, 4))),
])
def test_staged_gradient_equals_the_single_program(name, frames, extra):
  """In float64 the staged loss and gradient equal the single program's to ~1e-13: the same
  function. (In float32 both are rounded, see the next tests.)"""
  with jax.enable_x64(True):
    model, params = tiny(name, "float64", **extra)
    x = video(frames, dtype=jnp.float64)
    value, grads = program_value_and_grad(model, params, x, step=3)
    staged = StagedGrad(model, loss_fn, residual_budget_mib=0)
    s_value, s_grads = staged(params, x, step=3)
    assert staged.saved_stages(params, x) == []
    np.testing.assert_allclose(float(s_value), float(value), rtol=1e-12)
    assert_grads_equal(grads, s_grads, 1e-10)


def test_saved_residuals_give_the_same_gradient():
  """With a budget some stages keep their residuals instead of recomputing: same result. In
  float32, against the single program (this random width-4 model amplifies rounding: both
  are ~1e-4 of the largest entry from the float64 gradient)."""
  model, params = tiny("vidtok_kl_causal_488_4chn")
  x = video(9)
  value, grads = program_value_and_grad(model, params, x)
  all_saved = StagedGrad(model, loss_fn, residual_budget_mib=1e6)
  some = StagedGrad(model, loss_fn, residual_budget_mib=0.05)
  n = len(all_saved.stages)
  assert all_saved.saved_stages(params, x) == list(range(n))
  assert 0 < len(some.saved_stages(params, x)) < n
  for staged in (all_saved, some):
    s_value, s_grads = staged(params, x)
    np.testing.assert_allclose(float(s_value), float(value), rtol=1e-6)
    assert_grads_equal(grads, s_grads, 1e-3)


def test_loss_aux_and_sampling():
  model, params = tiny("vidtok_kl_causal_488_4chn")
  x = video(9)

  def with_metrics(y, x, aux):
    value = loss_fn(y, x, aux)
    return value, {"kl": aux["kl_loss"]}

  (value, metrics), grads = StagedGrad(model, with_metrics, has_aux=True,
                                       residual_budget_mib=0)(params, x)
  assert float(metrics["kl"]) > 0 and np.isfinite(float(value))
  sampled = StagedGrad(model, loss_fn, sample=True, residual_budget_mib=0)
  a = sampled(params, x, rng=jax.random.key(1))[0]
  b = sampled(params, x, rng=jax.random.key(1))[0]
  c = sampled(params, x, rng=jax.random.key(2))[0]
  assert float(a) == float(b) != float(c)  # the sample follows the key
  assert float(a) != float(value)


def test_bad_input_and_a_plan_that_misses_parameters():
  model, params = tiny("vidtok_kl_causal_488_4chn")
  staged = StagedGrad(model, loss_fn)
  with pytest.raises(ValueError, match=r"video batch \(B, T, H, W, C\)"):
    staged(params, video(9)[0])
  with pytest.raises(ValueError, match="residual_budget_mib"):
    StagedGrad(model, loss_fn, residual_budget_mib=-1)
  broken = StagedGrad(model, loss_fn)
  broken.stages = [s for s in broken.stages if s.name != "encoder.mid"]
  with pytest.raises(ValueError, match=r"does not cover .*'encoder', 'mid'"):
    broken(params, video(9))


def test_plan_names_every_stage_once():
  spec = vidtok_jax.VidTok(vidtok_jax.load_config("vidtok_kl_causal_488_4chn")).config
  names = [s.name for s in stages_lib.plan(spec)]
  assert len(names) == len(set(names))
  assert names[0] == "encoder.conv_in" and names[-1] == "decoder.conv_out"
  assert names.index(stages_lib.REGULARIZER) == names.index("encoder.conv_out") + 1
  # 4 levels x 2 (2-D, temporal) pairs, 3 downsamplers; 4 x 3 pairs, 3 upsamplers in the decoder.
  assert sum(".block." in n for n in names) == 4 * 2 * 2 + 4 * 3 * 2
  assert sum(n.endswith("sample") for n in names) == 6


def test_budget_choice_maximises_spared_flops():
  mib = 2**20
  # Greedy by FLOPs per byte would take items 1 and 2 (15 FLOPs); the best fit is 0 + 3.
  items = [(10.0, 5 * mib), (8.0, 3 * mib), (7.0, 3 * mib), (6.0, 1 * mib), (1.0, 0)]
  assert most_flops_within(items, 6 * mib) == [0, 3, 4]  # 16 FLOPs; 1 + 2 would give 15
  assert most_flops_within(items, 0) == [4]
  assert most_flops_within(items, 100 * mib) == [0, 1, 2, 3, 4]
