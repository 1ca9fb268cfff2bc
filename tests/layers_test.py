"""Parity of the layers (convs, resamplers) with the official module fixtures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import Ref, flax_to_torch_layout, max_abs, module_params, torch_to_flax_layout
from vidtok_jax.models import layers

MODULE_ATOL = 1e-5  # the reference README's module tolerance (float32 vs the float64 reference)


def _run(module, ref, **kwargs):
  x = jnp.asarray(torch_to_flax_layout(ref.inputs["x"]))
  params = module_params(module, ref.params, x, **kwargs)
  y = module.apply({"params": params}, x, **kwargs)
  return flax_to_torch_layout(y, ref.out["y"])


def _kernel(args):
  k = args[2]
  return (k, k, k)


@pytest.mark.parametrize("name,version,pad_mode,kernel,strides", [
    ("causalconv3d_constant", "v1.0", "constant", (3, 3, 3), (1, 1, 1)),
    ("causalconv3d_replicate", "v1.0", "replicate", (3, 3, 3), (1, 1, 1)),
    ("causalconv3d_replicate_shortT", "v1.0", "replicate", (3, 3, 3), (1, 1, 1)),
    ("causalconv3d_k1", "v1.0", "constant", (1, 1, 1), (1, 1, 1)),
    ("causalconv3d_tstride2", "v1.0", "constant", (3, 3, 3), (2, 1, 1)),
    ("causalconv1d_constant", "v1.0", "constant", (3, 1, 1), (1, 1, 1)),
    ("causalconv1d_replicate", "v1.0", "replicate", (3, 1, 1), (1, 1, 1)),
])
def test_causal_conv(name, version, pad_mode, kernel, strides):
  ref = Ref(name)
  module = layers.CausalConv(6, kernel, strides, version=version, pad_mode=pad_mode)
  y = _run(module, ref)
  assert y.shape == ref.out["y"].shape
  assert max_abs(y, ref.expected("y")) < MODULE_ATOL


@pytest.mark.parametrize("name,with_conv", [
    ("downsample2d_conv", True), ("downsample2d_conv_odd", True), ("downsample2d_avgpool", False)])
def test_downsample(name, with_conv):
  ref = Ref(name)
  y = _run(layers.Downsample(8, with_conv), ref)
  assert y.shape == ref.out["y"].shape
  assert max_abs(y, ref.expected("y")) < MODULE_ATOL


def test_upsample():
  ref = Ref("upsample2d_conv")
  y = _run(layers.Upsample(8), ref)
  assert max_abs(y, ref.expected("y")) < MODULE_ATOL


@pytest.mark.parametrize("name,causal,down", [
    ("time_down_causal_T8", True, True), ("time_down_causal_T9", True, True),
    ("time_up_causal", True, False), ("nc_time_down_T8", False, True),
    ("nc_time_down_T9", False, True), ("nc_time_up", False, False)])
def test_time_resample_v10(name, causal, down):
  ref = Ref(name)
  cls = layers.TimeDownsample if down else layers.TimeUpsample
  y = _run(cls(6, causal=causal, version="v1.0"), ref)
  assert y.shape == ref.out["y"].shape
  assert max_abs(y, ref.expected("y")) < MODULE_ATOL


@pytest.mark.parametrize("kt,pad,frames", [
    (3, ((2, 0), (1, 1), (1, 1)), 4), (3, ((0, 0), (1, 1), (1, 1)), 5),
    (3, ((1, 1), (1, 1), (1, 1)), 3), (2, ((1, 0), (0, 0), (0, 0)), 2),
    (4, ((3, 2), (1, 1), (0, 2)), 3), (3, "VALID", 2)])
def test_time_repeated_conv_is_the_conv_of_the_repeat(kt, pad, frames):
  """`conv3d_time_repeated` (the conv of the nearest 2x time upsampling from the source frames)
  equals the conv of the repeated frames, values and both gradients."""
  rng = np.random.default_rng(kt + frames)
  x = jnp.asarray(rng.normal(size=(2, frames, 6, 7, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kt, 3, 3, 4, 5)), jnp.float32)
  direct = lambda x, k: layers.conv3d(jnp.repeat(x, 2, axis=1), k, (1, 1, 1), pad)
  phased = lambda x, k: layers.conv3d_time_repeated(x, k, 2, (1, 1, 1), pad)
  y = phased(x, k)
  assert y.shape == direct(x, k).shape
  np.testing.assert_allclose(y, direct(x, k), atol=1e-4, rtol=1e-5)
  loss = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), (0, 1))(x, k)
  for a, b in zip(loss(phased), loss(direct)):
    np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-5)


@pytest.mark.parametrize("kt,st,pad,c", [
    (3, 1, ((2, 0), (1, 1), (1, 1)), 3), (3, 2, ((1, 0), (1, 1), (1, 1)), 4),
    (3, 1, "VALID", 3), (2, 1, ((1, 1), (0, 1), (0, 1)), 5)])
def test_time_taps_conv_is_the_3d_conv(kt, st, pad, c):
  """`time_taps_conv` (the frames a 3-D conv reads stacked on channels, one 2-D conv) equals the
  3-D conv, values and both gradients; `conv3d` takes it on TPU for narrow inputs only."""
  rng = np.random.default_rng(kt + st + c)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 5, c)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(kt, 3, 3, c, 6)), jnp.float32)
  direct = lambda x, k: layers.conv3d(x, k, (st, 1, 1), pad, platform="gpu")
  stacked = lambda x, k: layers.time_taps_conv(x, k, (st, 1, 1), pad)
  np.testing.assert_allclose(stacked(x, k), direct(x, k), atol=1e-4, rtol=1e-5)
  loss = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), (0, 1))(x, k)
  for a, b in zip(loss(stacked), loss(direct)):
    np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-5)
  from hlo_forms import ops

  for channels, rank in ((c, 4), (layers.TPU_LANES, 5)):  # kt * 128 channels: the 3-D conv
    xc = jnp.zeros((1, 7, 6, 5, channels))
    kc = jnp.zeros((kt, 3, 3, channels, 6))
    text = jax.jit(lambda x, k: layers.conv3d(x, k, (st, 1, 1), pad, platform="tpu")).lower(
        xc, kc).as_text()
    assert [len(o["rhs"][0]) for o in ops(text, "convolution")] == [rank]


@pytest.mark.parametrize("name", ["time_up_causal", "v11_time_up_nearest_chunks"])
def test_time_upsample_tpu_form_meets_the_reference(name):
  """Traced for a TPU's inference, a whole-clip causal nearest `TimeUpsample` takes the conv of its
  repeated frames from the source frames (no 3x3x3 conv in the program) and meets the official
  vectors; traced for a TPU's training step it keeps the 3-D conv."""
  ref = Ref(name)
  if name == "time_up_causal":
    module = layers.TimeUpsample(6, causal=True, version="v1.0")
    x, key = jnp.asarray(torch_to_flax_layout(ref.inputs["x"])), "y"
  else:
    module = _v11_module(ref)
    x = jnp.concatenate([jnp.asarray(torch_to_flax_layout(ref.inputs[f"x{i}"]))
                         for i in range(3) if f"x{i}" in ref.inputs], axis=1)
    key = "y_full_single_call"
  params = {"params": module_params(module, ref.params, x)}

  def run(params, x):
    with layers.lowering_platform("tpu"):
      return module.apply(params, x)

  from hlo_forms import ops

  folded = [(3, 3, 12, 12)]  # two stacked source frames of 6 channels -> both phases' outputs
  assert [o["rhs"][0] for o in ops(jax.jit(run).lower(params, x).as_text(),
                                   "convolution")] == folded

  def run_training(params, x):  # training traces keep the conv of the repeat (cheaper there)
    with layers.lowering_platform("tpu"), layers.training_forms():
      return module.apply(params, x)

  text = jax.jit(run_training).lower(params, x).as_text()
  assert [o["rhs"][0] for o in ops(text, "convolution")] != folded
  assert "broadcast_in_dim" in text  # the repeat
  y = jax.jit(run)(params, x)
  expected = ref.expected(key)
  assert max_abs(flax_to_torch_layout(y, expected), expected) < MODULE_ATOL


def _v11_module(ref):
  mod = ref.meta["config"]["module"]
  target = mod["target"].rsplit(".", 1)[-1]
  kw = mod["kwargs"]
  offset = ref.meta["config"].get("cache_offset", 0)
  if target == "CausalConv3d":
    k = mod["args"][2]
    return layers.CausalConv(mod["args"][1], (k, k, k), tuple(kw.get("stride", (1, 1, 1))),
                             version="v1.1", cache_offset=offset)
  if target == "CausalConv1d":
    return layers.CausalConv(mod["args"][1], (mod["args"][2], 1, 1), version="v1.1",
                             cache_offset=offset)
  if target == "TimeDownsampleResCausal2x":
    return layers.TimeDownsample(mod["args"][1], causal=True, version="v1.1")
  return layers.TimeUpsample(mod["args"][1], causal=True, version="v1.1",
                             interpolation_mode=kw["interpolation_mode"],
                             num_temp_upsample=kw["num_temp_upsample"], cache_offset=offset)


@pytest.mark.parametrize("name", [
    "v11_causalconv3d_chunks", "v11_causalconv3d_tstride2_chunks", "v11_causalconv3d_cacheoffset1",
    "v11_causalconv1d_chunks", "v11_time_down_chunks", "v11_time_up_nearest_chunks",
    "v11_time_up_trilinear_n1_chunks", "v11_time_up_trilinear_n2_chunks"])
def test_v11_chunks(name):
  """First chunk without a cache, later chunks with the carried cache; and the single call."""
  ref = Ref(name)
  module = _v11_module(ref)
  xs = [jnp.asarray(torch_to_flax_layout(ref.inputs[f"x{i}"]))
        for i in range(3) if f"x{i}" in ref.inputs]
  params = {"params": module_params(module, ref.params, xs[0])}
  cache = None
  for i, x in enumerate(xs):
    y, cache = module.apply(params, x, cache, return_cache=True)
    expected = ref.expected(f"y{i}")
    assert max_abs(flax_to_torch_layout(y, expected), expected) < MODULE_ATOL, f"chunk {i}"
  if "y_full_single_call" in ref.out:
    y = module.apply(params, jnp.concatenate(xs, axis=1))
    expected = ref.expected("y_full_single_call")
    assert max_abs(flax_to_torch_layout(y, expected), expected) < MODULE_ATOL


def test_trilinear_formula():
  x = jnp.arange(4.0).reshape(1, 4, 1, 1, 1) ** 2  # 0, 1, 4, 9
  y = np.asarray(layers.trilinear_time_2x(x)).ravel()
  expected = [0, 0.25, 0.75, 1.75, 3.25, 5.25, 7.75, 9]
  np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)


def test_causal_conv_is_causal():
  """Output frame t of a v1.0 / v1.1 causal conv does not depend on input frames after t."""
  x = jax.random.normal(jax.random.key(0), (1, 6, 4, 4, 3))
  x2 = x.at[:, 4:].set(7.0)
  for version in ("v1.0", "v1.1"):
    conv = layers.CausalConv(5, (3, 3, 3), version=version)
    p = conv.init(jax.random.key(1), x)
    y, y2 = conv.apply(p, x), conv.apply(p, x2)
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    assert not np.allclose(y[:, 4:], y2[:, 4:])


def test_time_downsample_needs_two_frames():
  x = jnp.zeros((1, 1, 2, 2, 4))
  with pytest.raises(ValueError, match="at least 2 frames"):
    layers.TimeDownsample(4).init(jax.random.key(0), x)


@pytest.mark.parametrize("dtype,kernel,padding", [
    (jnp.float32, (3, 3, 3), ((2, 0), (1, 1), (1, 1))),  # the causal 3x3x3 conv_out shape
    (jnp.float32, (1, 3, 3), "VALID"),
    (jnp.bfloat16, (3, 3, 3), "VALID"),
])
def test_few_output_convs_run_by_taps_with_the_same_values_and_gradients(dtype, kernel, padding):
  """`conv3d` runs a kernel with taps x outputs <= inputs as one matmul plus shifted sums
  (`conv_by_taps`): values and gradients equal XLA's conv."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 9, 8, 96)), dtype)
  k = jnp.asarray(rng.standard_normal((*kernel, 96, 3)) * 0.1, dtype)

  def reference(x, k):
    pad = padding if padding == "VALID" else list(padding)
    return jax.lax.conv_general_dilated(
        x.astype(jnp.float32), k.astype(jnp.float32), (1, 1, 1), pad,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=jax.lax.Precision.HIGHEST)

  def loss(f):
    return lambda x, k: jnp.sum(jnp.sin(f(x, k).astype(jnp.float32)))

  y = layers.conv3d(x, k, padding=padding)
  y_ref = reference(x, k)
  assert y.dtype == dtype and y.shape == y_ref.shape
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  scale = float(jnp.max(jnp.abs(y_ref)))
  assert max_abs(y.astype(jnp.float32), y_ref) <= tol * scale
  gx, gk = jax.grad(loss(lambda x, k: layers.conv3d(x, k, padding=padding)), (0, 1))(x, k)
  rx, rk = jax.grad(loss(reference), (0, 1))(x, k)
  assert gx.dtype == dtype and gk.dtype == dtype
  for g, r in ((gx, rx), (gk, rk)):
    assert max_abs(g.astype(jnp.float32), r) <= tol * float(jnp.max(jnp.abs(r)))


@pytest.mark.parametrize("how", ["host", "cpu", "tpu", "gpu", "tpu_argument"])
def test_conv_forms_follow_the_platform_lowered_for(how):
  """`conv_by_taps` and `tie_to` (`early_weight_grad`) are CPU forms: chosen for the platform
  the program is lowered for (`lowering_platform`, or `platform=`), not for this host; elsewhere
  each conv is a convolution (forward, input and kernel gradients)."""
  from hlo_forms import cpu_only_forms, ops

  x = jax.ShapeDtypeStruct((1, 5, 8, 8, 96), jnp.float32)
  k_out = jax.ShapeDtypeStruct((3, 3, 3, 96, 3), jnp.float32)  # the decoder's conv_out shape
  k_mid = jax.ShapeDtypeStruct((3, 3, 3, 96, 96), jnp.float32)
  platform = how.removesuffix("_argument")

  def grads(x, k_out, k_mid):
    def loss(x, k_out, k_mid):
      arg = dict(platform=platform) if how.endswith("_argument") else {}
      y = layers.conv3d(x, k_mid, padding=((2, 0), (1, 1), (1, 1)), **arg)
      return jnp.sum(layers.conv3d(y, k_out, **arg) ** 2)

    if how in ("host", "tpu_argument"):
      return jax.grad(loss, (0, 1, 2))(x, k_out, k_mid)
    with layers.lowering_platform(platform):
      return jax.grad(loss, (0, 1, 2))(x, k_out, k_mid)

  text = jax.jit(grads).lower(x, k_out, k_mid).as_text(debug_info=True)
  forms, convs = cpu_only_forms(text), ops(text, "convolution")
  cpu = how == "cpu" or (how == "host" and jax.default_backend() == "cpu")
  if cpu:  # conv_out by taps (its matmuls), both backward passes tied
    assert forms["conv_by_taps"] > 0 and forms["tie_to"] > 0
    assert len(convs) == 3 and all(c["rhs"][0] != k_out.shape for c in convs)
  else:
    assert forms == {"conv_by_taps": 0, "tie_to": 0}
    assert len(convs) == 6 and not ops(text, "dot_general")
    assert sum(c["rhs"][0] == k_out.shape for c in convs) >= 1  # conv_out: a convolution


@pytest.mark.parametrize("platform,dtype,training,barrier", [
    ("tpu", jnp.bfloat16, False, True), ("gpu", jnp.bfloat16, False, False),
    ("cpu", jnp.bfloat16, False, False), ("tpu", jnp.float32, False, False),
    ("tpu", jnp.bfloat16, True, False)])
def test_norm_input_barrier_for_tpu_inference_only(platform, dtype, training, barrier):
  """In inference on TPU a narrower-than-float32 norm input passes an optimization
  barrier (so XLA cannot fuse the norm's float32 cast into the producing conv, which then wrote
  float32); GPU and CPU programs (not measured there), float32 models and training traces
  (`training_forms`, where it cost more bytes than it saved) have none. The values are the same
  (on TPU up to the rounding of its one-pass statistics: see the next test)."""
  import contextlib
  norm = layers.normalize("groupnorm", "frame", None, silu=True)
  x = jax.random.normal(jax.random.key(0), (1, 2, 4, 4, 64)).astype(dtype)
  p = norm.init(jax.random.key(1), x)

  def f(p, x):
    ctx = layers.training_forms() if training else contextlib.nullcontext()
    with layers.lowering_platform(platform), ctx:
      return jax.grad(lambda p, x: jnp.sum(norm.apply(p, x).astype(jnp.float32) ** 2),
                      (0, 1))(p, x)

  text = jax.jit(f).lower(p, x).as_text()
  assert ("optimization_barrier" in text) == barrier
  with layers.lowering_platform("cpu"):
    ref = norm.apply(p, x)
  with layers.lowering_platform(platform):
    got = norm.apply(p, x)
  tol = 0 if platform != "tpu" else 1e-6 if dtype == jnp.float32 else 1e-2  # bf16: one ulp
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)


def _reductions_in_sequence(jaxpr) -> bool:
  """Whether some reduce_sum of `jaxpr` reads a value computed from another's result."""
  after = set()  # vars that depend on a reduction's output
  for eqn in jaxpr.eqns:
    fed = any(not hasattr(v, "val") and v in after for v in eqn.invars)  # (literals have .val)
    if eqn.primitive.name == "reduce_sum" and fed:
      return True
    if fed or eqn.primitive.name == "reduce_sum":
      after.update(eqn.outvars)
  return False


@pytest.mark.parametrize("stats", ["frame", "pixel"])
def test_tpu_norm_statistics_take_one_pass(stats):
  """Traced for a TPU the norm takes mean and mean square in one pass (two sibling reductions
  XLA fuses into one read of the activation); elsewhere the two-pass variance (the mean first).
  Values and gradients agree within the whole models' parity tolerance (2e-4) for an input six
  standard deviations from zero mean (where the one-pass variance cancels most), `pixel` groups
  of 9 frames x 4 channels (measured at 5 / 9 / 17 frames: values within 3e-5 / 2e-5 / 4e-5,
  gradients 1.3e-4 / 7e-5 / 1.1e-4). Groups of 6 values (3 frames x 2 channels, smaller than
  the model's) missed it: 1.1e-4 in values, 5e-4 in gradients."""
  norm = layers.normalize("groupnorm", stats, None, silu=True)
  x = 3.0 + 0.5 * jax.random.normal(jax.random.key(0), (2, 9, 4, 4, 128))
  p = norm.init(jax.random.key(1), x)

  def on(platform):
    def f(p, x):
      with layers.lowering_platform(platform):
        return norm.apply(p, x)
    return f

  for platform, sequenced in (("tpu", False), ("gpu", True), ("cpu", True)):
    jaxpr = jax.make_jaxpr(on(platform))(p, x).jaxpr
    assert _reductions_in_sequence(jaxpr) == sequenced, platform
  np.testing.assert_allclose(on("tpu")(p, x), on("cpu")(p, x), rtol=1e-5, atol=2e-4)
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  got = jax.grad(loss(on("tpu")), (0, 1))(p, x)
  want = jax.grad(loss(on("cpu")), (0, 1))(p, x)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("name", ["causalconv1d_constant", "causalconv1d_replicate"])
def test_causal_temporal_conv_parity_in_the_tpu_inference_form(name):
  """The TPU inference form of the per-pixel temporal convs (a 5-D conv with W as the batch axis)
  meets the official fixtures with the same tolerance (run here on CPU)."""
  ref = Ref(name)
  module = layers.CausalConv(6, (3, 1, 1), version="v1.0", pad_mode=name.split("_")[1])
  with layers.lowering_platform("tpu"):
    y = _run(module, ref)
  assert max_abs(y, ref.expected("y")) < MODULE_ATOL


@pytest.mark.parametrize("platform,training,five_d", [
    ("tpu", False, True), ("tpu", True, True), ("gpu", False, False), ("gpu", True, False),
    ("cpu", False, False)])
@pytest.mark.parametrize("padding,strides", [
    (((2, 0), (0, 0), (0, 0)), (1, 1, 1)), ("VALID", (1, 1, 1)), (((1, 1), (0, 0), (0, 0)), (2, 1, 1))])
def test_temporal_conv_form_follows_the_platform_and_keeps_values(platform, training, five_d,
                                                                  padding, strides):
  """Per-pixel `(kt, 1, 1)` convs: on TPU (inference and training traces) one 5-D conv over
  the video as it is (W the batch axis, kernel `(1, kt, 1)`); on GPU / CPU a 2-D conv over
  `(T, H*W)`. Values and both gradients equal the 2-D form's."""
  import contextlib

  from hlo_forms import ops

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 7, 4, 5, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 1, 1, 8, 6)) * 0.3, jnp.float32)

  def loss(x, k):
    return jnp.sum(jnp.sin(layers.conv3d(x, k, strides, padding, "highest")))

  def traced(f):
    def g(x, k):
      ctx = layers.training_forms() if training else contextlib.nullcontext()
      with layers.lowering_platform(platform), ctx:
        return f(x, k)
    return g

  fwd = traced(lambda x, k: layers.conv3d(x, k, strides, padding, "highest"))
  rhs = [o["rhs"][0] for o in ops(jax.jit(fwd).lower(x, k).as_text(), "convolution")]
  assert rhs == [(1, 3, 1, 8, 6) if five_d else (3, 1, 8, 6)]
  reference = lambda x, k: layers.conv3d(x, k, strides, padding, "highest", platform="gpu")
  np.testing.assert_allclose(fwd(x, k), reference(x, k), rtol=1e-6, atol=1e-6)
  got = jax.grad(traced(loss), (0, 1))(x, k)
  want = jax.grad(lambda x, k: jnp.sum(jnp.sin(reference(x, k))), (0, 1))(x, k)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
