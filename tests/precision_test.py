"""Precision by backend: `config.train.dtype="auto"`, the bf16 step's convs and dots at the
backend's default precision (never HIGHEST) with float32 params, optimizer state and statistics,
and every model conv and dot at the model's precision."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest
from hlo_forms import TINY, cpu_only_forms, ops

import vidtok_jax
from vidtok_jax import train
from vidtok_jax.train.precision import resolve_dtype, resolve_precision
from vidtok_jax.train.loop import resolve_precision as resolve_config

REPO = pathlib.Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location("vidtok_configs", REPO / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)


def tiny(**train_fields):
  cfg = configs.get_config("kl_causal_488_4chn,tiny")
  cfg.model = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=4, ch_mult=(1, 2, 2),
                                     num_res_blocks=1)
  cfg.loss.perceptual_weight = 0.0
  for k, v in train_fields.items():
    cfg.train[k] = v
  return cfg


@pytest.mark.parametrize("backend,want", [("cpu", "float32"), ("gpu", "bfloat16"),
                                          ("cuda", "bfloat16"), ("tpu", "bfloat16")])
def test_auto_dtype_resolves_by_backend(backend, want):
  assert resolve_dtype("auto", backend) == want
  assert resolve_dtype("float32", backend) == "float32"
  mc = train.model_config(tiny(), backend)  # the default config is "auto"
  assert (mc.dtype, mc.precision) == (want, "default" if want == "bfloat16" else "highest")


def test_this_backend_resolves_at_start_up():
  cfg = resolve_config(tiny())
  want = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  assert cfg.train.requested_dtype == "auto" and cfg.train.dtype == want
  assert cfg.model.dtype == "float32" and cfg.model.precision == "highest"  # saved as given
  mc = train.model_config(cfg)
  assert mc.dtype == want and mc.precision == cfg.train.precision


@pytest.mark.parametrize("precision,dtype,want", [
    ("auto", "bfloat16", "default"), ("auto", "float32", "highest"), ("tf32", "float32", "high"),
    ("highest", "bfloat16", "highest"), ("default", "float32", "default")])
def test_precision_options(precision, dtype, want):
  assert resolve_precision(precision, dtype) == want


def test_bad_values_name_the_field():
  with pytest.raises(ValueError, match="config.train.dtype"):
    resolve_dtype("float16")
  with pytest.raises(ValueError, match="config.train.precision"):
    resolve_precision("fast", "float32")


def _lowered_step(cfg):
  """The lowered train step's convolutions and dots (`hlo_forms.ops`) and the state."""
  params = vidtok_jax.abstract_params(train.model_config(cfg))
  state = jax.eval_shape(lambda p: train.create_train_state(cfg, jax.random.PRNGKey(0), p),
                         params)
  x = jax.ShapeDtypeStruct((2, 9, 32, 32, 3), jnp.float32)
  # conftest makes unset precisions "highest" for parity; a run leaves them to JAX's default.
  with jax.default_matmul_precision(None):
    text = jax.jit(train.make_train_step(cfg)).lower(state, {"video": x}).as_text()
  return ops(text, "convolution"), ops(text, "dot_general"), state


def test_bf16_step_has_no_highest_convs_or_dots_and_keeps_float32_state():
  convs, dots, state = _lowered_step(tiny(dtype="bfloat16"))
  assert len(convs) > 20 and len(dots) > 4  # dots: the 1x1 convs and the attention
  highest = [op for op in convs + dots if "HIGHEST" in op["precision"]]
  assert not highest, highest[:2]
  assert sum(op["rhs"][1] == "bf16" for op in convs) > 0.9 * len(convs)  # bf16 compute
  # Params, optimizer moments, discriminator statistics and LeCAM stay float32.
  floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(d == jnp.float32 for d in floats)
  # The float32 default keeps exact ("highest") convs: the check above can fail.
  convs32, _, _ = _lowered_step(tiny(dtype="float32"))
  assert sum("HIGHEST" in op["precision"] for op in convs32) > 0.5 * len(convs32)


def test_every_model_conv_and_dot_carries_the_model_precision():
  """At JAX's default matmul precision (not the suite's "highest"), every convolution and dot
  of a float32 "highest" model's forward and backward is HIGHEST, `conv_by_taps` (the decoder's
  conv_out on CPU) and the attention included, and "default" gives none: a dot or conv that
  drops `precision=` fails this."""
  x = jax.ShapeDtypeStruct((1, 9, 32, 32, 3), jnp.float32)
  for precision, want in (("highest", {"HIGHEST"}), ("default", {"DEFAULT"})):
    cfg = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", **TINY, precision=precision)
    model = vidtok_jax.VidTok(cfg)

    def loss(p, x, model=model):
      z = model.apply({"params": p}, x, method=model.encode)[0]
      return jnp.mean(jnp.square(model.apply({"params": p}, z, method=model.decode)))

    with jax.default_matmul_precision(None):
      text = jax.jit(jax.grad(loss)).lower(vidtok_jax.abstract_params(cfg), x).as_text(
          debug_info=True)
    convs, dots = ops(text, "convolution"), ops(text, "dot_general")
    assert len(convs) > 50 and len(dots) > 10
    if jax.default_backend() == "cpu":
      assert cpu_only_forms(text)["conv_by_taps"] > 0  # its matmuls are among the dots
    wrong = [op for op in convs + dots if set(op["precision"]) != want]
    assert not wrong, (precision, wrong[:3])


def test_compilation_cache_setting():
  from vidtok_jax.train.compile_cache import cache_dir

  assert configs.get_config("kl_causal_488_4chn").compilation_cache_dir == "auto"
  assert cache_dir("auto", "runs/x") == "runs/x/xla_cache"  # on by default, under the workdir
  assert cache_dir("/data/xla_cache", "runs/x") == "/data/xla_cache"
  assert cache_dir("", "runs/x") is None and cache_dir("off", "runs/x") is None
