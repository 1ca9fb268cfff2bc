"""KL and FSQ regularizers: parity with the official fixtures and their invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import Ref, max_abs, module_params, ncthw_to_nthwc, nthwc_to_ncthw
from vidtok_jax.models import regularizers as R

FSQ_FIXTURES = ["fsq_4444", "fsq_888555", "fsq_888888", "fsq_8555_dim6_proj"]


def _fsq_module(ref, **kw):
  p = ref.meta["config"]["module"]["kwargs"]
  return R.FSQRegularizer(tuple(p["levels"]), p.get("dim"), p["entropy_loss_weight"],
                          p["entropy_loss_annealing_steps"], p["entropy_loss_annealing_factor"],
                          p["commitment_loss_weight"], **kw)


@pytest.mark.parametrize("name", FSQ_FIXTURES)
def test_fsq_parity(name):
  ref = Ref(name)
  module = _fsq_module(ref)
  z = jnp.asarray(ncthw_to_nthwc(ref.inputs["z"]))
  variables = {"params": module_params(module, ref.params, z)}
  codes, aux = module.apply(variables, z)
  assert max_abs(nthwc_to_ncthw(codes), ref.expected("codes")) < 1e-6
  np.testing.assert_array_equal(np.asarray(aux["indices"]), ref.out["indices"])
  assert aux["indices"].dtype == jnp.int32
  for key in ("per_sample_entropy", "codebook_entropy", "commit_loss"):
    assert max_abs(aux[key], ref.expected(key)) < 1e-5, key
  assert max_abs(aux["aux_loss"], ref.expected("aux_loss_step0")) < 1e-5
  for step in (1000, 5000):
    _, aux_n = module.apply(variables, z, step=step)
    assert max_abs(aux_n["aux_loss"], ref.expected(f"aux_loss_step{step}")) < 1e-5, step
  back = module.apply(variables, aux["indices"], method=module.indices_to_codes)
  assert max_abs(nthwc_to_ncthw(back), ref.expected("indices_to_codes")) < 1e-6
  noproj = R.FSQ(module.levels).indices_to_codes(aux["indices"])
  assert max_abs(nthwc_to_ncthw(noproj), ref.expected("indices_to_codes_noproj")) == 0
  if "implicit_codebook" in ref.out:
    fsq = R.FSQ(module.levels)
    assert max_abs(fsq.codebook(0, fsq.codebook_size), ref.expected("implicit_codebook")) == 0


def _dense_entropy_terms(fsq, z, inv_temperature=100.0):
  """The official dense form (SPEC 5.2): `N x K` logits and probabilities, in z's dtype."""
  codebook = np.asarray(fsq.codebook(0, fsq.codebook_size), z.dtype)
  p = jax.nn.softmax(2.0 * inv_temperature * jnp.dot(z, codebook.T, precision="highest"), axis=-1)
  ent = lambda q: -jnp.sum(q * jnp.log(jnp.maximum(q, 1e-5)), axis=-1)
  return jnp.mean(ent(p)), ent(jnp.mean(p, axis=0))


@pytest.mark.parametrize("levels,scale", [((8,) * 6, 0.02), ((8,) * 6, 0.3), ((8,) * 5, 0.05),
                                          ((8, 5, 5, 5), 0.1), ((7, 5, 3), 0.2), ((4,), 1.0),
                                          ((8,) * 4, 3.0)])
def test_fsq_factorised_entropy_matches_dense(levels, scale):
  """Values and gradients of the factorised entropy equal the dense form: values to 1e-5
  relative of the float32 dense form, values and gradients to the float64 dense form (the
  float32 dense gradient itself is ~1e-4 off it in peaked cases).

  Small z scales give broad distributions (most codes above the 1e-5 clamp), large ones peaked
  distributions (most codes clamped), so both branches of the clamp are exercised."""
  fsq = R.FSQ(levels)
  z64 = np.random.default_rng(len(levels)).normal(0, scale, (48, len(levels)))
  z = jnp.asarray(z64, jnp.float32)
  combo = lambda f, z: jax.grad(lambda z: f(fsq, z)[0] - 0.7 * f(fsq, z)[1])(z)
  fact, g_fact = R.fsq_entropy_terms(fsq, z), combo(R.fsq_entropy_terms, z)
  dense32 = _dense_entropy_terms(fsq, z)
  with jax.enable_x64():
    dense64 = [float(v) for v in _dense_entropy_terms(fsq, jnp.asarray(z64))]
    g64 = np.asarray(combo(_dense_entropy_terms, jnp.asarray(z64)))
  for got, want32, want64 in zip(fact, dense32, dense64):
    np.testing.assert_allclose(float(got), float(want32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(got), want64, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_fact), g64, rtol=0, atol=2e-5 * np.abs(g64).max())
  if levels == (8,) * 4:  # the peaked case: the clamp changes the value there
    p = jax.nn.softmax(200.0 * z @ fsq.codebook(0, fsq.codebook_size).T, axis=-1)
    assert float(jnp.mean(jnp.sum(p * (p < 1e-5), axis=-1))) > 1e-7


def test_fsq_entropy_memory_is_bounded():
  """One 17x256x256 clip pair at 4x8x8 (2 x 5 x 32 x 32 = 10,240 tokens), K = 262,144: the dense
  form needs ~10 GiB per intermediate; value and gradient here must stay under 1 GiB of
  temporaries in XLA's own buffer analysis of the compiled program (429 MiB measured on CPU)."""
  fsq = R.FSQ((8,) * 6)
  z = jax.ShapeDtypeStruct((10240, 6), jnp.float32)
  f = jax.jit(jax.value_and_grad(lambda z: sum(R.fsq_entropy_terms(fsq, z))))
  mem = f.lower(z).compile().memory_analysis()
  assert mem.temp_size_in_bytes < 2**30, mem.temp_size_in_bytes


@pytest.mark.parametrize("levels", [(4, 4, 4, 4), (8, 8, 8, 5, 5, 5), (8, 5, 5, 5), (8,) * 4,
                                    (8,) * 5, (8,) * 6, (7, 5, 3)])
def test_fsq_index_code_round_trip(levels):
  fsq = R.FSQ(levels)
  idx = jnp.arange(fsq.codebook_size, dtype=jnp.int32)
  codes = fsq.indices_to_codes(idx)
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(codes)), np.arange(len(idx)))
  # Codes are exactly what quantising them back gives, and each level's digits all occur.
  assert len(np.unique(np.asarray(codes), axis=0)) == fsq.codebook_size
  # Channel 0 is the least significant digit.
  np.testing.assert_array_equal(np.asarray(fsq.indices_to_codes(jnp.array([1])))[0, 1:],
                                np.asarray(codes[0, 1:]))


def test_fsq_quantize_rounds_half_to_even_and_bounds():
  fsq = R.FSQ((8,))
  z = jnp.linspace(-20, 20, 1001)[:, None]
  q = np.asarray(fsq.quantize(z)) * 4
  assert q.min() == -4 and q.max() == 3 and np.all(q == np.round(q))
  assert float(fsq.bound(jnp.zeros((1, 1)))[0, 0]) == pytest.approx(0.0, abs=1e-6)


def test_round_ste_gradient_is_identity():
  x = jnp.linspace(-3, 3, 13)
  w = jnp.arange(13.0)
  g = jax.grad(lambda x: jnp.sum(R.round_ste(x) * w))(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # Through FSQ: d codes / d z is the derivative of the bound alone (rounding passes through).
  fsq = R.FSQ((8, 5))
  z = jax.random.normal(jax.random.key(0), (6, 2))
  g = jax.grad(lambda z: jnp.sum(fsq.quantize(z)))(z)
  g_bound = jax.grad(lambda z: jnp.sum(fsq.bound(z) / fsq.half_width))(z)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_bound), rtol=1e-6)


def test_entropy_weight_schedule():
  w = lambda n: float(R.entropy_weight(n, 0.1, 2000, 3.0))
  assert w(0) == pytest.approx(0.3) and w(1000) == pytest.approx(0.2)
  assert w(2000) == pytest.approx(0.1) and w(10**6) == pytest.approx(0.1)


def test_gaussian_parity():
  ref = Ref("gaussian_kl")
  moments = jnp.asarray(ncthw_to_nthwc(ref.inputs["moments"]))
  noise = jnp.asarray(ncthw_to_nthwc(ref.inputs["noise"]))
  mean, logvar = R.gaussian_posterior(moments)
  assert max_abs(nthwc_to_ncthw(mean), ref.expected("mean")) == 0
  assert max_abs(nthwc_to_ncthw(logvar), ref.expected("logvar")) == 0
  sample = R.gaussian_sample(mean, logvar, noise)
  np.testing.assert_allclose(nthwc_to_ncthw(sample), ref.expected("sample"), rtol=1e-6, atol=1e-6)
  # Per-(B, W) KL as the reference keeps it (summed over C, T, H), and the scalar loss.
  kl = 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)
  np.testing.assert_allclose(np.asarray(kl.sum((1, 2, 4))), ref.expected("kl"), rtol=1e-6)
  z, aux = R.DiagonalGaussianRegularizer().apply({}, moments)
  assert max_abs(nthwc_to_ncthw(z), ref.expected("reg_mode_z")) == 0
  np.testing.assert_allclose(float(aux["kl_loss"]), float(ref.expected("kl_loss")), rtol=1e-6)


def test_gaussian_sampling_uses_rng():
  moments = jnp.concatenate([jnp.ones((2, 3, 4, 4, 2)), jnp.zeros((2, 3, 4, 4, 2))], axis=-1)
  reg = R.DiagonalGaussianRegularizer()
  z1, _ = reg.apply({}, moments, sample=True, rngs={"sample": jax.random.key(1)})
  z2, _ = reg.apply({}, moments, sample=True, rngs={"sample": jax.random.key(2)})
  assert not np.allclose(z1, z2)
  assert abs(float(jnp.mean(z1)) - 1.0) < 0.2 and abs(float(jnp.std(z1)) - 1.0) < 0.2


def test_kl_of_standard_normal_is_zero():
  moments = jnp.zeros((3, 2, 4, 4, 8))
  _, aux = R.DiagonalGaussianRegularizer().apply({}, moments)
  assert float(aux["kl_loss"]) == 0.0
  moments = moments.at[..., 0].set(1.0)  # a unit mean shift costs 0.5 per element / B
  _, aux = R.DiagonalGaussianRegularizer().apply({}, moments)
  assert float(aux["kl_loss"]) == pytest.approx(0.5 * 2 * 4 * 4)
