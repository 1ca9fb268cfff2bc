"""The whole VidTok model through the public API: parity, frame arithmetic, causality, errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vidtok_jax
from conftest import Ref, max_abs, ncthw_to_nthwc, nthwc_to_ncthw, random_params

# Reference README: whole models atol=2e-4, rtol=1e-4 on videos/latents (float32 vs float64).
ATOL, RTOL = 2e-4, 1e-4


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def fixture_config(ref):
  """The fixture's topology as `load_config(<official name>, ch=..., ...)`."""
  name = ref.meta["topology"].split()[0]
  enc = ref.meta["config"]["encoder_config"]["params"]
  overrides = {k: enc[k] for k in ("ch", "ch_mult", "norm_type")}
  return vidtok_jax.load_config(name, **overrides)


WHOLE = {  # fixture -> prefix of its outputs
    "causal_kl_488": "", "causal_kl_288": "", "causal_kl_444": "", "causal_kl_488_groupnorm": "",
    "noncausal_kl_488": "", "causal_fsq_488": "", "v11_causal_kl_488_long": "untiled/"}


@pytest.fixture(scope="module", params=sorted(WHOLE))
def whole(request):
  ref = Ref(request.param)
  cfg = fixture_config(ref)
  model = vidtok_jax.VidTok(cfg)
  params = vidtok_jax.params_from_torch(ref.params, cfg)
  x = jnp.asarray(ncthw_to_nthwc(ref.inputs["x"]))
  return ref, WHOLE[request.param], model, {"params": params}, x


def test_encode_parity(whole):
  ref, pre, model, variables, x = whole
  raw = model.apply(variables, x, method=lambda m, v: m.encoder(v))
  z, aux = model.apply(variables, x, method=model.encode)
  if model.is_fsq:
    assert_close(nthwc_to_ncthw(raw), ref.expected(pre + "z_pre"))
    assert max_abs(nthwc_to_ncthw(z), ref.expected(pre + "codes")) == 0
    np.testing.assert_array_equal(np.asarray(aux["indices"]), ref.out[pre + "indices"])
    for key in ("per_sample_entropy", "codebook_entropy", "commit_loss"):
      assert max_abs(aux[key], ref.expected(pre + key)) < 1e-5, key
    assert max_abs(aux["aux_loss"], ref.expected(pre + "aux_loss_engine")) < 1e-5
    for step in (0, 1000, 5000):
      _, aux_n = model.apply(variables, x, step=step, method=model.encode)
      assert max_abs(aux_n["aux_loss"], ref.expected(f"{pre}aux_loss_step{step}")) < 1e-5, step
  else:
    assert_close(nthwc_to_ncthw(raw), ref.expected(pre + "moments"))
    assert_close(nthwc_to_ncthw(aux["mean"]), ref.expected(pre + "mean"))
    assert_close(nthwc_to_ncthw(aux["logvar"]), ref.expected(pre + "logvar"))
    np.testing.assert_allclose(float(aux["kl_loss"]), float(ref.expected(pre + "kl_loss")),
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(aux["mean"]))


def test_decode_and_forward_parity(whole):
  ref, pre, model, variables, x = whole
  z, aux = model.apply(variables, x, method=model.encode)
  dec = model.apply(variables, z, method=model.decode)
  assert_close(nthwc_to_ncthw(dec), ref.out[pre + "dec"])
  z_f, recon, _ = model.apply(variables, x)
  np.testing.assert_array_equal(np.asarray(z_f), np.asarray(z))
  t = x.shape[1]
  np.testing.assert_array_equal(np.asarray(recon), np.asarray(dec[:, dec.shape[1] - t:]))
  if model.is_fsq:
    from_idx = model.apply(variables, aux["indices"], method=model.decode_indices)
    assert_close(nthwc_to_ncthw(from_idx), ref.out[pre + "dec_from_indices"])


def test_fixture_parity_fails_on_wrong_weights(whole):
  """Guards the parity tests themselves: one perturbed weight must break them."""
  ref, pre, model, variables, x = whole
  params = jax.tree_util.tree_map(np.array, variables["params"])
  leaf = params["decoder"]["conv_out"]
  leaf = leaf["conv"] if "conv" in leaf else leaf
  leaf["bias"] = leaf["bias"] + 1e-2
  z, _ = model.apply(variables, x, method=model.encode)
  dec = model.apply({"params": params}, z, method=model.decode)
  with pytest.raises(AssertionError):
    assert_close(nthwc_to_ncthw(dec), ref.out[pre + "dec"])


# ------------------------------------------------------------------------------------------------
# Frame arithmetic (SPEC 1.3), checked on abstract shapes of tiny models.


def shapes(name, t, hw=16, **overrides):
  cfg = vidtok_jax.load_config(name, ch=4, **overrides)
  model = vidtok_jax.VidTok(cfg)
  params = vidtok_jax.abstract_params(cfg)
  x = jax.ShapeDtypeStruct((1, t, hw, hw, 3), jnp.float32)
  z, aux = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=model.encode),
                          params, x)
  dec = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method=model.decode), params, z)
  _, fwd, _ = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
  return z.shape[1], dec.shape[1], fwd.shape[1]


@pytest.mark.parametrize("name,t,expected", [
    ("vidtok_kl_causal_488_4chn", 17, (5, 17, 17)), ("vidtok_kl_causal_488_4chn", 33, (9, 33, 33)),
    ("vidtok_kl_causal_488_4chn", 1, (1, 1, 1)), ("vidtok_kl_causal_488_4chn", 16, (4, 13, 13)),
    ("vidtok_kl_causal_488_4chn", 18, (5, 17, 17)), ("vidtok_kl_causal_288_8chn", 17, (9, 17, 17)),
    ("vidtok_kl_causal_488_4chn_v1_1", 17, (5, 20, 17)),
    ("vidtok_kl_causal_488_4chn_v1_1", 16, (4, 16, 16)),
    ("vidtok_fsq_causal_888_32768_v1_1", 17, (3, 24, 17)),
    ("vidtok_fsq_causal_888_32768_v1_1", 33, (5, 40, 33)),
    ("vidtok_kl_noncausal_488_4chn", 16, (4, 16, 16)),
    ("vidtok_kl_noncausal_488_4chn", 17, (4, 16, 16)),
    ("vidtok_kl_causal_41616_4chn", 17, (5, 17, 17)),
])
def test_frame_arithmetic(name, t, expected):
  assert shapes(name, t, hw=16 if "41616" not in name else 32) == expected
  spec = vidtok_jax.VidTok(vidtok_jax.load_config(name)).config
  assert vidtok_jax.output_frames(spec, t) == (expected[0], expected[2])


def test_spatial_factors():
  cfg = vidtok_jax.load_config("vidtok_kl_causal_444_4chn", ch=4)
  z = jax.eval_shape(lambda p, x: vidtok_jax.VidTok(cfg).apply({"params": p}, x)[0],
                     vidtok_jax.abstract_params(cfg), jax.ShapeDtypeStruct((1, 5, 16, 24, 3),
                                                                           jnp.float32))
  assert z.shape == (1, 2, 4, 6, 4)


def test_dropped_frames_warn(caplog):
  with caplog.at_level(logging.WARNING, logger="vidtok_jax"):
    shapes("vidtok_kl_causal_488_4chn", 16)
  assert any("16 input frames give 13 output frames" in r.message for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="vidtok_jax"):
    shapes("vidtok_kl_causal_488_4chn", 17)
  assert not caplog.records


# ------------------------------------------------------------------------------------------------
# Invariants on randomly initialised tiny models.


@pytest.fixture(scope="module")
def tiny_v10():
  cfg = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=4)
  model = vidtok_jax.VidTok(cfg)
  return model, {"params": random_params(vidtok_jax.abstract_params(cfg))}


def test_causality_v10(tiny_v10):
  """Latent k and output frame t only depend on input frames <= t (v1.0 causal, 4x)."""
  model, variables = tiny_v10
  x = jax.random.uniform(jax.random.key(1), (1, 13, 16, 16, 3), minval=-1, maxval=1)
  x2 = x.at[:, 5:].set(jax.random.uniform(jax.random.key(2), (1, 8, 16, 16, 3)))
  fwd = jax.jit(lambda v: model.apply(variables, v))
  (z, y, _), (z2, y2, _) = fwd(x), fwd(x2)
  # Input frames 0..4 -> latents 0, 1 (latent k covers frames 4k-3..4k) -> output frames 0..4.
  np.testing.assert_allclose(np.asarray(z[:, :2]), np.asarray(z2[:, :2]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(y[:, :5]), np.asarray(y2[:, :5]), atol=1e-6)
  assert np.abs(np.asarray(z[:, 2:] - z2[:, 2:])).max() > 1e-4
  assert np.abs(np.asarray(y[:, 5:] - y2[:, 5:])).max() > 1e-4


def test_image_is_one_frame_video(tiny_v10):
  model, variables = tiny_v10
  img = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1, maxval=1)
  z, y, _ = model.apply(variables, img)
  z_v, y_v, _ = model.apply(variables, img[:, None])
  assert z.shape == (2, 1, 2, 2, 4) and y.shape == img.shape
  if jax.default_backend() == "cpu":  # same computation: bitwise on CPU
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_v[:, 0]))
  else:  # GPU kernels may pick other algorithms per call (seen on an H100: 5.5e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_v[:, 0]), atol=2e-4)


def test_compiles_once_per_shape(tiny_v10):
  model, variables = tiny_v10
  traces = {"encode": 0, "decode": 0}

  def encode(v, x):
    traces["encode"] += 1
    return model.apply(v, x, method=model.encode)[0]

  def decode(v, z):
    traces["decode"] += 1
    return model.apply(v, z, method=model.decode)

  encode, decode = jax.jit(encode), jax.jit(decode)
  for seed in range(3):
    x = jax.random.uniform(jax.random.key(seed), (1, 5, 16, 16, 3), minval=-1, maxval=1)
    decode(variables, encode(variables, x)).block_until_ready()
  assert traces == {"encode": 1, "decode": 1}


# ------------------------------------------------------------------------------------------------
# Errors name the rule.


@pytest.mark.parametrize("shape,match", [
    ((1, 16, 16, 3, 5), "channels"),
    ((16, 16, 3), "expected a video"),
    ((1, 5, 12, 16, 3), "divisible by the spatial factor 8"),
    ((1, 5, 16, 16, 4), "expected 3 channels"),
])
def test_bad_video(tiny_v10, shape, match):
  model, variables = tiny_v10
  with pytest.raises(ValueError, match=match):
    model.apply(variables, jnp.zeros(shape), method=model.encode)


def test_noncausal_needs_four_frames():
  cfg = vidtok_jax.load_config("vidtok_kl_noncausal_488_4chn", ch=4)
  with pytest.raises(ValueError, match="at least 4 frames"):
    jax.eval_shape(lambda p: vidtok_jax.VidTok(cfg).apply({"params": p}, jnp.zeros((1, 3, 8, 8, 3))),
                   vidtok_jax.abstract_params(cfg))


def test_bad_latents_and_indices(tiny_v10):
  model, variables = tiny_v10
  with pytest.raises(ValueError, match="latents"):
    model.apply(variables, jnp.zeros((1, 2, 2, 2, 5)), method=model.decode)
  with pytest.raises(ValueError, match="FSQ"):
    model.apply(variables, jnp.zeros((1, 2, 2, 2), jnp.int32), method=model.decode_indices)
  cfg = vidtok_jax.load_config("vidtok_fsq_causal_488_4096", ch=4)
  fsq = vidtok_jax.VidTok(cfg)
  p = {"params": random_params(vidtok_jax.abstract_params(cfg))}
  for bad, match in ((jnp.full((1, 2, 2, 2), 4096), r"\[0, 4096\)"),
                     (jnp.full((1, 2, 2, 2), -1), r"\[0, 4096\)"),
                     (jnp.zeros((1, 2, 2, 2)), "integers"), (jnp.zeros((2, 2, 2), jnp.int32),
                                                             "indices")):
    with pytest.raises(ValueError, match=match):
      fsq.apply(p, bad, method=fsq.decode_indices)
  y = fsq.apply(p, jnp.full((1, 2, 2, 2), 4095), method=fsq.decode_indices)
  assert y.shape == (1, 5, 16, 16, 3)


# ------------------------------------------------------------------------------------------------
# Released configurations (SPEC 3.5): every variant builds, with the official parameter counts.

PARAM_COUNTS = {
    "vidtok_kl_causal_488_4chn": (69258122, 88193541),
    "vidtok_kl_causal_488_8chn": (69368722, 88248837),
    "vidtok_kl_causal_488_16chn": (69589922, 88359429),
    "vidtok_kl_causal_288_8chn": (62290321, 86479108),
    "vidtok_kl_causal_444_4chn": (69110538, 85833733),
    "vidtok_kl_causal_41616_4chn": (89521802, 109446149),
    "vidtok_kl_noncausal_488_4chn": (69258122, 88193541),
    "vidtok_kl_noncausal_488_16chn": (69589922, 88359429),
    "vidtok_kl_noncausal_41616_4chn": (89521802, 109446149),
    "vidtok_kl_noncausal_41616_16chn": (89853602, 109612037),
    "vidtok_fsq_causal_488_262144": (69230472, 88221189),
    "vidtok_fsq_causal_488_32768": (69216647, 88207365),
    "vidtok_fsq_causal_488_4096": (69202822, 88193541),
    "vidtok_fsq_causal_41616_262144": (89494152, 109473797),
    "vidtok_fsq_noncausal_488_262144": (69230472, 88221189),
    "vidtok_fsq_noncausal_41616_262144": (89494152, 109473797),
    "vidtok_kl_causal_488_4chn_v1_1": (69258122, 88193541),
    "vidtok_kl_causal_488_16chn_v1_1": (69589922, 88359429),
    "vidtok_kl_causal_41616_16chn_v1_1": (89853602, 109612037),
    "vidtok_kl_causal_288_8chn_v1_1": (62290321, 86479108),
    "vidtok_fsq_causal_488_32768_v1_1": (69216647, 88207365),
    "vidtok_fsq_causal_41616_262144_v1_1": (89494152, 109473797),
    "vidtok_fsq_causal_888_32768_v1_1": (69659144, 95285766),
}


def test_every_variant_is_registered():
  assert set(PARAM_COUNTS) == set(vidtok_jax.VARIANTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_released_param_counts(name):
  params = vidtok_jax.abstract_params(vidtok_jax.load_config(name))
  count = lambda tree: sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(tree))
  assert (count(params["encoder"]), count(params["decoder"])) == PARAM_COUNTS[name]
  assert set(params) == {"encoder", "decoder"}  # no FSQ projections in any release


def test_bfloat16_compute_runs_close_to_float32():
  """bf16 compute (float32 params, norms and losses) stays within a few % of float32.

  Random-weight models amplify rounding (at ch=4 a 0.4% input change moves the output by 10%),
  so this uses ch=16, where bf16 lands at ~3% of the output range.
  """
  cfg32 = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=16)
  variables = {"params": random_params(vidtok_jax.abstract_params(cfg32))}
  bf16 = vidtok_jax.VidTok(vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=16,
                                                  dtype="bfloat16"))
  x = jax.random.uniform(jax.random.key(4), (1, 5, 16, 16, 3), minval=-1, maxval=1)
  _, y32, _ = vidtok_jax.VidTok(cfg32).apply(variables, x)
  _, y16, aux = bf16.apply(variables, x)
  assert y16.dtype == jnp.bfloat16 and aux["kl_loss"].dtype == jnp.float32
  err = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)))
  assert 0 < err < 0.1 * float(jnp.max(jnp.abs(y32)))


def test_remat_true_is_blocks():
  cfg = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=4, remat=True)
  assert vidtok_jax.ModelSpec.from_config(cfg).remat == "blocks"


@pytest.mark.parametrize("remat", ["convs", "blocks"])
def test_remat_keeps_params_outputs_and_gradients(tiny_v10, remat):
  model, variables = tiny_v10
  cfg = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=4, remat=remat)
  assert vidtok_jax.ModelSpec.from_config(cfg).remat == remat
  rm = vidtok_jax.VidTok(cfg)
  same_tree = jax.tree_util.tree_structure(vidtok_jax.abstract_params(cfg))
  assert same_tree == jax.tree_util.tree_structure(variables["params"])
  x = jax.random.uniform(jax.random.key(5), (1, 5, 16, 16, 3), minval=-1, maxval=1)
  np.testing.assert_allclose(np.asarray(rm.apply(variables, x)[1]),
                             np.asarray(model.apply(variables, x)[1]), atol=1e-6)
  grad = lambda m: jax.grad(lambda p: jnp.mean(jnp.abs(m.apply({"params": p}, x)[1] - x)))(
      variables["params"])
  for a, b in zip(jax.tree.leaves(grad(rm)), jax.tree.leaves(grad(model))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_bad_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat"):
    vidtok_jax.load_config("vidtok_kl_causal_488_4chn", remat="everything")


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_float64_matches_float64_reference(name):
  """In float64 the port equals the official float64 outputs to ~1e-14 (not just to float32
  tolerance): any structural difference would show up here at full size."""
  ref, pre = Ref(name), WHOLE[name]
  with jax.enable_x64(True):
    cfg = fixture_config(ref)
    cfg.dtype = cfg.param_dtype = "float64"
    model = vidtok_jax.VidTok(cfg)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                    vidtok_jax.params_from_torch(ref.params, cfg))
    x = jnp.asarray(ncthw_to_nthwc(ref.inputs["x"]), jnp.float64)

    @jax.jit
    def run(p, x):
      raw = model.apply({"params": p}, x, method=lambda m, v: m.encoder(v))
      z, _ = model.apply({"params": p}, x, method=model.encode, compute_aux=False)
      return raw, model.apply({"params": p}, z, method=model.decode)

    raw, dec = run(params, x)
    key = pre + ("z_pre" if model.is_fsq else "moments")
    assert raw.dtype == jnp.float64
    assert max_abs(nthwc_to_ncthw(raw), ref.out64[key]) < 1e-12
    # Decoded videos are stored rounded to float32 only: half an ulp of |dec| <= 8.
    assert max_abs(nthwc_to_ncthw(dec), ref.out[pre + "dec"]) < 5e-7


def test_init_matches_official_defaults():
  """SPEC 2.10: U(+-1/sqrt(fan_in)) convs, temporal conv2 zero (blocks start as identity),
  mix_factor 2.0, norm scale 1 / bias 0."""
  cfg = vidtok_jax.load_config("vidtok_kl_causal_488_4chn_v1_1", ch=4)
  params = vidtok_jax.init_params(cfg, jax.random.key(0))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(params)}
  temporal_conv2 = [k for k in flat if "temporal" in k and "/conv2/" in k]
  assert temporal_conv2 and all(np.all(flat[k] == 0) for k in temporal_conv2)
  mixes = [v for k, v in flat.items() if k.endswith("mix_factor")]
  assert len(mixes) == 4 and all(np.all(v == 2.0) for v in mixes)
  assert all(np.all(v == 1) for k, v in flat.items() if k.endswith("scale"))
  for k, v in flat.items():
    if k.endswith("kernel") and k not in temporal_conv2:
      bound = 1 / np.sqrt(np.prod(v.shape[:-1]))
      assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound, k


@pytest.mark.parametrize("name", ["causal_kl_488_groupnorm", "causal_fsq_488"])
def test_tpu_inference_forms_meet_the_reference(name):
  """The program traced for a TPU (its inference forms: one-pass norm statistics, 5-D temporal
  convs), run here on the CPU, meets the official vectors with the same tolerances."""
  from vidtok_jax.models.platform import lowering_platform

  ref = Ref(name)
  cfg = fixture_config(ref)
  model = vidtok_jax.VidTok(cfg)
  variables = {"params": vidtok_jax.params_from_torch(ref.params, cfg)}
  x = jnp.asarray(ncthw_to_nthwc(ref.inputs["x"]))

  @jax.jit
  def run(variables, x):
    with lowering_platform("tpu"):
      raw = model.apply(variables, x, method=lambda m, v: m.encoder(v))
      z, _ = model.apply(variables, x, method=model.encode)
      return raw, model.apply(variables, z, method=model.decode)

  from hlo_forms import ops

  kernels = [o["rhs"][0] for o in ops(run.lower(variables, x).as_text(), "convolution")]
  assert any(len(k) == 5 and k[:3] == (1, 3, 1) for k in kernels), kernels  # the 5-D form
  raw, dec = run(variables, x)
  assert_close(nthwc_to_ncthw(raw), ref.expected("z_pre" if model.is_fsq else "moments"))
  assert_close(nthwc_to_ncthw(dec), ref.out["dec"])
