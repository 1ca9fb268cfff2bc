"""Tests for vidtok_jax.weights: key naming, layouts, validation errors, file I/O and the CLI."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from vidtok_jax.weights import io as convert_io
from vidtok_jax.weights import keys as convert_keys
from vidtok_jax.weights import load_state_dict, save_safetensors

params_from_state_dict = convert_keys.params_from_state_dict
state_dict_from_params = convert_keys.state_dict_from_params
torch_key = convert_keys.torch_key
kernel_torch_rank = convert_keys.kernel_torch_rank

REPO = pathlib.Path(__file__).resolve().parents[1]

# Whole-model fixture -> (official variant, config overrides that reproduce its JSON config).
FIXTURES = {
    "causal_kl_488": ("vidtok_kl_causal_488_4chn", {"ch": 8}),
    "causal_fsq_488": ("vidtok_fsq_causal_488_262144", {"ch": 8}),
    "noncausal_kl_488": ("vidtok_kl_noncausal_488_4chn", {"ch": 8}),
    "causal_kl_488_groupnorm": ("vidtok_kl_causal_488_4chn",
                                {"ch": 32, "ch_mult": (1, 1, 1, 1), "norm_type": "groupnorm"}),
    "causal_kl_288": ("vidtok_kl_causal_288_8chn", {"ch": 4}),
    "causal_kl_444": ("vidtok_kl_causal_444_4chn", {"ch": 4}),
    "v11_causal_kl_488_long": ("vidtok_kl_causal_488_4chn_v1_1", {"ch": 8}),
}
LIST_NAMES = ("down", "up", "down_temporal", "up_temporal", "block")


def model_template(fixture):
  """Flax params template (jax.ShapeDtypeStruct tree) of the model behind a whole-model fixture."""
  from vidtok_jax import abstract_params, load_config

  variant, overrides = FIXTURES[fixture]
  return abstract_params(load_config(variant, **overrides))


def rules_template(state_dict):
  """Template predicted from torch keys and shapes alone (written independently of keys.py):
  list indices fold into `name_<i>`, weights of rank >= 2 are kernels laid out by torch rank."""
  tree = {}
  for key, value in state_dict.items():
    path = []
    for part in key.split("."):
      if part.isdigit():
        assert path[-1] in LIST_NAMES, key
        path[-1] += "_" + part
      else:
        path.append(part)
    shape = value.shape
    if path[-1] == "weight" and len(shape) == 1:
      path[-1] = "scale"
    elif path[-1] == "weight":
      path[-1] = "kernel"
      o, i, *k = shape
      k = {2: [], 3: k + [1, 1], 4: [1] + k, 5: k}[len(shape)]
      shape = (*k, i, o)
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jax.ShapeDtypeStruct(tuple(shape), np.float32)
  return tree


def flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def assert_bitwise_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


def first_kernel_key(state_dict):
  return next(k for k, v in state_dict.items() if v.ndim == 5)


# ---------------------------------------------------------------- key naming (no model needed)


@pytest.mark.parametrize("path,key", [
    (("encoder", "down_0", "block_1", "conv1", "kernel"), "encoder.down.0.block.1.conv1.weight"),
    (("encoder", "mid", "block_1", "norm1", "norm", "scale"),
     "encoder.mid.block_1.norm1.norm.weight"),
    (("decoder", "mid", "attn_1", "q", "conv", "bias"), "decoder.mid.attn_1.q.conv.bias"),
    (("encoder", "conv_in", "conv", "kernel"), "encoder.conv_in.conv.weight"),
    (("encoder", "down_temporal_1", "block_0", "conv2", "conv", "kernel"),
     "encoder.down_temporal.1.block.0.conv2.conv.weight"),
    (("decoder", "up_temporal_2", "upsample", "mix_factor"),
     "decoder.up_temporal.2.upsample.mix_factor"),
    (("decoder", "up_3", "upsample", "conv", "bias"), "decoder.up.3.upsample.conv.bias"),
    (("decoder", "up_0", "block_2", "norm1", "scale"), "decoder.up.0.block.2.norm1.weight"),
    (("encoder", "down_1", "block_0", "nin_shortcut", "kernel"),
     "encoder.down.1.block.0.nin_shortcut.weight"),
    (("regularization", "project_in", "kernel"), "regularization.project_in.weight"),
    (("params", "encoder", "norm_out", "norm", "bias"), "encoder.norm_out.norm.bias"),
])
def test_torch_key(path, key):
  assert torch_key(path) == key


def test_torch_key_rejects_unknown_leaf():
  with pytest.raises(ValueError, match="embedding"):
    torch_key(("encoder", "conv_in", "embedding"))


@pytest.mark.parametrize("path,rank", [
    (("regularization", "project_out", "kernel"), 2),
    (("encoder", "down_0", "block_0", "conv1", "kernel"), 4),
    (("encoder", "down_2", "downsample", "conv", "kernel"), 4),
    (("decoder", "up_1", "upsample", "conv", "kernel"), 4),
    (("decoder", "up_1", "block_0", "nin_shortcut", "kernel"), 4),
    (("encoder", "down_temporal_1", "block_1", "conv1", "conv", "kernel"), 3),
    (("encoder", "down_temporal_1", "block_1", "conv2", "kernel"), 3),
    (("encoder", "down_temporal_1", "downsample", "conv", "conv", "kernel"), 5),
    (("decoder", "up_temporal_2", "upsample", "conv", "kernel"), 5),
    (("encoder", "mid", "block_1", "conv1", "conv", "kernel"), 5),
    (("encoder", "mid", "attn_1", "proj_out", "kernel"), 5),
    (("decoder", "conv_out", "conv", "kernel"), 5),
])
def test_kernel_torch_rank(path, rank):
  assert kernel_torch_rank(path) == rank


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_naming_rules_on_every_fixture_key(ref, fixture):
  state_dict = ref(fixture).params
  for path in flat(rules_template(state_dict)):
    key = torch_key(path)
    assert key in state_dict, (path, key)
    if path[-1] == "kernel":
      assert kernel_torch_rank(path) == state_dict[key].ndim, key
  # And the inverse lays every key out in torch shape without a template.
  params = params_from_state_dict(state_dict, rules_template(state_dict))
  assert_bitwise_equal(state_dict_from_params(params), state_dict)


def test_fsq_projections_round_trip(ref):
  state_dict = {"regularization." + k: v for k, v in ref("fsq_8555_dim6_proj").params.items()}
  template = {"regularization": {
      name: {"kernel": jax.ShapeDtypeStruct((i, o), np.float32),
             "bias": jax.ShapeDtypeStruct((o,), np.float32)}
      for name, i, o in (("project_in", 6, 4), ("project_out", 4, 6))}}
  params = params_from_state_dict(state_dict, template)
  np.testing.assert_array_equal(params["regularization"]["project_in"]["kernel"],
                                state_dict["regularization.project_in.weight"].T)
  assert_bitwise_equal(state_dict_from_params(params), state_dict)


# ---------------------------------------------------------------- against the model's params tree


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_abstract_params_follow_naming_rules(ref, fixture):
  got = {p: tuple(v.shape) for p, v in flat(model_template(fixture)).items()}
  want = {p: tuple(v.shape) for p, v in flat(rules_template(ref(fixture).params)).items()}
  only_model = sorted("/".join(p) for p in set(got) - set(want))
  only_torch = sorted("/".join(p) for p in set(want) - set(got))
  shapes = sorted(f"{'/'.join(p)}: {got[p]} != {want[p]}" for p in set(got) & set(want)
                  if got[p] != want[p])
  assert not (only_model or only_torch or shapes), (only_model, only_torch, shapes)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_round_trip_is_bitwise(ref, fixture):
  state_dict = ref(fixture).params
  template = model_template(fixture)
  params = params_from_state_dict(state_dict, template)
  flat_params = flat(params)
  assert sorted(flat_params) == sorted(flat(template))
  for path, leaf in flat(template).items():
    value = flat_params[path]
    assert isinstance(value, np.ndarray) and value.shape == tuple(leaf.shape), path
    assert value.dtype == np.float32, path
  assert_bitwise_equal(state_dict_from_params(params), state_dict)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_bad_keys_are_named(ref, fixture):
  state_dict = dict(ref(fixture).params)
  template = model_template(fixture)
  gone = "decoder.conv_out.conv.bias" if "decoder.conv_out.conv.bias" in state_dict else \
      "decoder.conv_out.bias"
  bad = first_kernel_key(state_dict)

  missing = {k: v for k, v in state_dict.items() if k != gone}
  with pytest.raises(ValueError, match="missing") as e:
    params_from_state_dict(missing, template)
  assert gone in str(e.value)

  with pytest.raises(ValueError, match="unexpected") as e:
    params_from_state_dict({**state_dict, "encoder.foo.weight": np.zeros(3, np.float32)}, template)
  assert "encoder.foo.weight" in str(e.value)

  w = state_dict[bad]
  for wrong in (w[:, :, :, :, 0], np.swapaxes(w, 0, 1)[:, :1], w[None]):  # rank, size, unit axis
    with pytest.raises(ValueError, match="mis-shaped") as e:
      params_from_state_dict({**state_dict, bad: wrong}, template)
    assert bad in str(e.value) and str(tuple(wrong.shape)) in str(e.value)

  # All problems are reported together.
  with pytest.raises(ValueError) as e:
    params_from_state_dict({**missing, "encoder.foo.weight": w, bad: w[0]}, template)
  assert all(k in str(e.value) for k in (gone, "encoder.foo.weight", bad))


def test_training_keys_are_ignored(ref):
  state_dict = ref("causal_kl_488").params
  extra = {"loss.logvar": np.array(0.5, np.float32),
           "loss.discriminator.main.3.num_batches_tracked": np.array(7),
           "model_ema.decay": np.array(0.999, np.float32),
           "model_ema.encoderconv_inconvweight": state_dict["encoder.conv_in.conv.weight"]}
  template = model_template("causal_kl_488")
  params = params_from_state_dict({**state_dict, **extra}, template)
  assert_bitwise_equal(state_dict_from_params(params), state_dict)
  with pytest.raises(ValueError, match="model_ema.decay"):
    params_from_state_dict({**state_dict, **extra}, template, ignore_prefixes=())


class FakeTensor:
  """Duck-typed torch tensor: the converter must not need torch for in-memory tensors."""

  def __init__(self, value):
    self.value = value

  def detach(self):
    return self

  def cpu(self):
    return self

  def is_floating_point(self):
    return True

  def float(self):
    return FakeTensor(self.value.astype(np.float32))

  def numpy(self):
    return self.value


def test_tensor_values_and_bf16(ref):
  import ml_dtypes

  state_dict = ref("causal_kl_488").params
  template = model_template("causal_kl_488")
  as_bf16 = {k: FakeTensor(v.astype(ml_dtypes.bfloat16)) for k, v in state_dict.items()}
  rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in state_dict.items()}
  assert_bitwise_equal(state_dict_from_params(params_from_state_dict(as_bf16, template)), rounded)
  # numpy bf16 arrays (what safetensors.numpy returns) are upcast as well.
  as_np_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state_dict.items()}
  params = params_from_state_dict(as_np_bf16, template)
  assert_bitwise_equal(state_dict_from_params(params), rounded)


def test_real_torch_tensors(ref):
  torch = pytest.importorskip("torch", reason="torch not installed")
  state_dict = ref("causal_kl_488").params
  template = model_template("causal_kl_488")
  tensors = {k: torch.from_numpy(v).requires_grad_() for k, v in state_dict.items()}
  assert_bitwise_equal(state_dict_from_params(params_from_state_dict(tensors, template)),
                       state_dict)
  bf16 = {k: t.detach().bfloat16() for k, t in tensors.items()}
  want = {k: t.float().numpy() for k, t in bf16.items()}
  assert_bitwise_equal(state_dict_from_params(params_from_state_dict(bf16, template)), want)


# ---------------------------------------------------------------- files


def test_safetensors_round_trip(ref, tmp_path):
  state_dict = ref("causal_fsq_488").params
  path = tmp_path / "sub" / "model.safetensors"
  save_safetensors(state_dict, path)
  assert_bitwise_equal(load_state_dict(path), state_dict)


def test_bf16_safetensors(tmp_path):
  import ml_dtypes
  from safetensors.numpy import save_file

  rng = np.random.default_rng(0)
  state_dict = {"a.weight": rng.normal(size=(4, 3, 3)).astype(np.float32),
                "b.bias": rng.normal(size=(5,)).astype(np.float32)}
  path = tmp_path / "bf16.safetensors"
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state_dict.items()}, str(path))
  want = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in state_dict.items()}
  assert_bitwise_equal(load_state_dict(path), want)
  # The numpy-only fallback reader (for safetensors builds without bf16 support) agrees.
  assert_bitwise_equal(convert_io._read_safetensors_raw(str(path)), want)


class Opaque:
  """A non-tensor object pickled into a checkpoint (like Lightning hyper-parameters)."""

  def __init__(self):
    self.lr = 1e-4


def test_ckpt_round_trip(ref, tmp_path):
  torch = pytest.importorskip("torch", reason="torch not installed")
  state_dict = ref("causal_kl_488").params
  tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  lightning = tmp_path / "model.ckpt"
  torch.save({"state_dict": {**tensors, "loss.logvar": torch.zeros(())}, "epoch": 3,
              "global_step": 10, "hyper_parameters": {"cfg": Opaque()}}, lightning)
  loaded = load_state_dict(lightning)
  assert loaded.pop("loss.logvar").shape == ()
  assert_bitwise_equal(loaded, state_dict)
  bare = tmp_path / "model.pt"
  torch.save({k: t.bfloat16() for k, t in tensors.items()}, bare)
  want = {k: t.bfloat16().float().numpy() for k, t in tensors.items()}
  assert_bitwise_equal(load_state_dict(bare), want)


def test_ckpt_without_torch(tmp_path, monkeypatch):
  path = tmp_path / "model.ckpt"
  path.write_bytes(b"\0" * 16)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match="pip install torch"):
    load_state_dict(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_corrupt_file_is_named(tmp_path, suffix):
  if suffix == ".ckpt":
    pytest.importorskip("torch", reason="torch not installed")
  path = tmp_path / f"corrupt{suffix}"
  path.write_bytes(np.random.default_rng(1).bytes(4096))
  with pytest.raises(ValueError) as e:
    load_state_dict(path)
  assert str(path) in str(e.value)


def test_missing_and_unknown_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.ckpt"):
    load_state_dict(tmp_path / "nope.ckpt")
  path = tmp_path / "model.h5"
  path.write_bytes(b"x")
  with pytest.raises(ValueError, match="model.h5"):
    load_state_dict(path)


# ---------------------------------------------------------------- CLI


def run_cli(*args, rc=0):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-m", "vidtok_jax.cli.convert", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == rc, proc.stdout + proc.stderr
  return proc.stdout if rc == 0 else proc.stderr


def test_cli_round_trip(ref, tmp_path):
  state_dict = ref("causal_kl_488").params
  src = tmp_path / "official.safetensors"
  save_safetensors({**state_dict, "loss.logvar": np.zeros((), np.float32)}, src)
  variant, overrides = FIXTURES["causal_kl_488"]
  sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
  out = run_cli("to-flax", src, "--config", variant, *sets, "--out", tmp_path / "flax")
  assert f"converted {len(state_dict)} keys" in out and "ignored 1 keys" in out
  # The scripts' override spelling works too.
  dotted = [f"--config.model.{k}={v}" for k, v in overrides.items()]
  run_cli("to-torch", tmp_path / "flax", "--config", variant, *dotted,
          "--out", tmp_path / "back.safetensors")
  assert_bitwise_equal(load_state_dict(tmp_path / "back.safetensors"), state_dict)
  # An existing file is never replaced without --force (e.g. the official checkpoint itself);
  # no temporary file is left behind.
  before = src.read_bytes()
  err = run_cli("to-torch", tmp_path / "flax", "--config", variant, *sets, "--out", src, rc=1)
  assert f"{src} exists" in err and "--force" in err and err.count("\n") == 1
  assert src.read_bytes() == before
  run_cli("to-torch", tmp_path / "flax", "--config", variant, *sets, "--out", src, "--force")
  assert_bitwise_equal(load_state_dict(src), state_dict)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["back.safetensors", "flax",
                                                        "official.safetensors"]


def test_package_exports():
  import vidtok_jax.weights as convert

  assert sorted(convert.__all__) == ["load_state_dict", "params_from_state_dict",
                                     "save_safetensors", "state_dict_from_params", "torch_key"]
  assert all(callable(getattr(convert, name)) for name in convert.__all__)


def test_other_width_names_the_config_field(ref, tmp_path, capsys):
  from vidtok_jax.cli.convert import main

  src = tmp_path / "official.safetensors"
  save_safetensors(ref("causal_kl_488").params, src)
  variant, _ = FIXTURES["causal_kl_488"]  # made with ch=8
  assert main(["to-flax", str(src), "--config", variant, "--config.model.ch=16",
               "--out", str(tmp_path / "flax")]) == 1
  err = capsys.readouterr().err
  assert err == (f"error: {src} does not match {variant}: this checkpoint has ch=8 (the config "
                 "has ch=16); pass --config.model.ch=8\n")


def tiny_workdir(path, variant="kl_causal_488_4chn"):
  """A `vidtok-train` workdir (`<path>/checkpoints/<step>/`) holding one step of a tiny model:
  `(config, trained params, EMA params)`, random, with float32 edge values in one kernel."""
  from vidtok_jax import train
  from random_weights import random_params
  from vidtok_jax.models.autoencoder import abstract_params
  from vidtok_jax.train.checkpoint import Checkpoints
  from vidtok_jax.train.configs import get_config

  cfg = get_config(f"{variant},tiny")
  params, ema = (random_params(abstract_params(cfg.model), seed=s) for s in (3, 4))
  kernel = params["encoder"]["conv_in"]["conv"]["kernel"]
  kernel.flat[:4] = [-0.0, 1e-45, np.finfo(np.float32).max, np.finfo(np.float32).min]
  f = lambda: np.float32(0.5)
  state = train.TrainState(step=np.int32(7), g_params={"model": params, "logvar": f()},
                           d_params={"d": np.ones(2, np.float32)}, d_batch_stats={},
                           g_opt_state=(), d_opt_state=None,
                           ema_params={"model": ema, "logvar": f()}, lecam=(f(), f()),
                           rng=np.array([0, 1], np.uint32), nonfinite_streak=np.int32(0),
                           skipped=np.int32(0))
  with Checkpoints(path / "checkpoints", async_save=False) as c:
    c.save(7, state)
  return cfg, params, ema


def test_train_workdir_to_torch_and_back_is_bitwise(tmp_path, capsys):
  """`to-torch` exports a train workdir (issue 14): workdir -> .safetensors -> to-flax folder
  gives back the trained params bit for bit; `--use_ema` exports the EMA weights."""
  from vidtok_jax.cli.convert import main
  from vidtok_jax.weights.load import load_params

  workdir = tmp_path / "run"
  cfg, params, ema = tiny_workdir(workdir)
  m = cfg.model
  flags = ["--config", m.name, f"--config.model.ch={m.ch}",
           f"--config.model.ch_mult={tuple(m.ch_mult)}",
           f"--config.model.num_res_blocks={m.num_res_blocks}"]
  st, back = tmp_path / "run.safetensors", tmp_path / "back"
  assert main(["to-torch", str(workdir), *flags, "--out", str(st)]) == 0
  state_dict = load_state_dict(st)
  assert f"wrote {len(state_dict)} keys" in capsys.readouterr().out
  assert_bitwise_equal(state_dict, state_dict_from_params(params))
  assert main(["to-flax", str(st), *flags, "--out", str(back)]) == 0
  loaded, trained = load_params(back, cfg), load_params(workdir, cfg)
  for got in (loaded, trained):
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
      assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
  ema_st = tmp_path / "ema.safetensors"
  assert main(["to-torch", str(workdir / "checkpoints"), *flags, "--use_ema",
               "--out", str(ema_st)]) == 0
  assert_bitwise_equal(load_state_dict(ema_st), state_dict_from_params(ema))
  capsys.readouterr()
  # Another config: one error line naming the field, nothing written.
  bad = tmp_path / "bad.safetensors"
  assert main(["to-torch", str(workdir), *flags, "--config.model.ch=16", "--out", str(bad)]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: params in {workdir} do not match") and err.count("\n") == 1
  assert "pass --config.model.ch=8" in err and not bad.exists()
