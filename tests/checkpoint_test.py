"""Train checkpoints (`vidtok_jax/train/checkpoint.py`) on tiny states: bitwise round trips,
retention, refusal of non-finite states, recovery from broken steps, and `load_init_params`.

States are built once per module with numpy-random params and every leaf then redrawn at random
(Adam moments and counters are zeros at init, which would make a round trip check weak).
"""

import copy
import importlib.util
import logging
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import random_params

import vidtok_jax
from vidtok_jax import train
from vidtok_jax.cli.convert import main as convert_main
from vidtok_jax.weights.io import save_safetensors
from vidtok_jax.weights.keys import state_dict_from_params
from vidtok_jax.train import checkpoint as ckpt_lib
from vidtok_jax.train.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    Checkpoints,
    NonFiniteStateError,
    load_init_params,
)

TESTS = pathlib.Path(__file__).resolve().parent
_SPEC = importlib.util.spec_from_file_location("vidtok_configs",
                                               TESTS.parent / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)

# A failed tensorstore read can leave a callback for Orbax's (already closed) per-call asyncio
# loop; Python reports it, whenever it is collected, as an unraisable "Event loop is closed".
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

KL, FSQ, STAGE2 = ("kl_causal_488_4chn,tiny", "fsq_causal_488_4096,tiny",
                   "kl_causal_488_4chn,stage=2,tiny")


def tiny_config(arg, **train_overrides):
  cfg = configs.get_config(arg)
  cfg.loss.perceptual_weight = 0.0
  for k, v in train_overrides.items():
    cfg.train[k] = v
  return cfg


def randomize(tree, seed):
  """Every leaf redrawn at random (same shape and dtype); a TrainState's logvar set to -0.0."""
  rng = np.random.default_rng(seed)

  def draw(x):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
      return rng.standard_normal(x.shape).astype(x.dtype)
    info = np.iinfo(x.dtype)
    return rng.integers(info.min, info.max, x.shape, dtype=x.dtype, endpoint=True)

  tree = jax.tree.map(draw, tree)
  if not hasattr(tree, "g_params"):
    return tree
  return tree.replace(g_params=dict(tree.g_params, logvar=np.array(-0.0, np.float32)))


def special_values(state):
  """A kernel holding the float32 edge cases (signed zero, subnormal, extremes)."""
  k = np.array(state.g_params["model"]["decoder"]["conv_out"]["conv"]["kernel"])
  k.flat[:5] = [-0.0, 1e-45, np.finfo(np.float32).max, np.finfo(np.float32).min, 1e-38]
  model = jax.tree.map(lambda x: x, state.g_params["model"])
  model["decoder"]["conv_out"]["conv"]["kernel"] = k
  return state.replace(g_params=dict(state.g_params, model=model))


@pytest.fixture(scope="module")
def states():
  """{name: (config, randomized host TrainState, abstract target)} for KL + EMA, FSQ, stage 2.

  The abstract target is what the train loop restores onto: `abstract_train_state` (eval_shape
  of `create_train_state`), not derived from the saved state."""
  out, disc = {}, None
  for name, arg, kw in (("kl_ema", KL, dict(ema_decay=0.99)), ("fsq", FSQ, {}),
                        ("stage2", STAGE2, {})):
    cfg = tiny_config(arg, **kw)
    params = random_params(vidtok_jax.abstract_params(cfg.model), seed=len(out))
    st = train.create_train_state(cfg, jax.random.PRNGKey(0), params, disc_variables=disc)
    disc = disc or {"params": st.d_params, "batch_stats": st.d_batch_stats}  # init once
    abstract = train.abstract_train_state(cfg, params=abstract_of(params))
    out[name] = (cfg, special_values(randomize(jax.device_get(st), seed=10 + len(out))), abstract)
  return out


def tiny_state(seed=0):
  """A small hand-built TrainState (fast to save): one kernel, Adam-like moments, no EMA."""
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  g = {"model": {"w": f(3, 3, 4)}, "logvar": f()}
  return train.TrainState(step=np.int32(seed), g_params=g, d_params={"d": f(2)},
                          d_batch_stats={}, g_opt_state=({"mu": g}, ()), d_opt_state=None,
                          ema_params=None, lecam=(f(), f()),
                          rng=np.array([seed, 1], np.uint32), nonfinite_streak=np.int32(0),
                          skipped=np.int32(0))


def abstract_of(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)


def assert_bitwise(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  flat_r = jax.tree_util.tree_leaves_with_path(restored)
  flat_e = jax.tree.leaves(expected)
  assert len(flat_r) == len(flat_e) > 0
  for (path, r), e in zip(flat_r, flat_e, strict=True):
    r, e = np.asarray(r), np.asarray(e)
    assert r.dtype == e.dtype and r.shape == e.shape, jax.tree_util.keystr(path)
    assert r.tobytes() == e.tobytes(), jax.tree_util.keystr(path)  # bitwise, -0.0 included


def dir_bytes(path):
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["kl_ema", "fsq", "stage2"])
def test_round_trip_is_bitwise(states, tmp_path, name):
  cfg, state, abstract = states[name]
  ckpts = Checkpoints(tmp_path / "checkpoints", config=cfg)
  assert ckpts.save(1234, state)
  ckpts.wait_until_finished()
  restored, step = ckpts.restore(abstract)
  assert step == 1234 and restored.lpips_params is None
  assert_bitwise(restored, state)
  assert (restored.ema_params is None) == (name != "kl_ema")
  if name == "stage2":  # the frozen encoder has MaskedNodes, not Adam moments
    masked = restored.g_opt_state.inner_states["train"].inner_state[1][0].mu["model"]["encoder"]
    assert jax.tree.leaves(masked) == [] and jax.tree.structure(masked).num_nodes > 10
  meta = ckpts.read_meta(1234)
  assert (meta["step"], meta["variant"], meta["stage"]) == (
      1234, cfg.variant, 2 if name == "stage2" else 1)
  assert meta["model"]["regularizer"] == cfg.model.regularizer
  ckpts.close()


def test_lpips_params_not_saved(states, tmp_path):
  _, state, _ = states["fsq"]
  lpips = {"lin": np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)}
  ckpts = Checkpoints(tmp_path, async_save=False)
  ckpts.save(1, state)
  ckpts.save(2, state.replace(lpips_params=lpips))
  size1, size2 = dir_bytes(tmp_path / "1"), dir_bytes(tmp_path / "2")
  # Random floats do not compress: saved, they would add 4 MB (identical saves vary by ~5%).
  assert size2 < size1 + lpips["lin"].nbytes // 2, (size1, size2)
  stored = ckpts._manager.item_metadata(2)["state"]
  assert stored["lpips_params"] is None and "g_params" in stored
  # Restores to None even when the target carries LPIPS.
  restored, step = ckpts.restore(abstract_of(state.replace(lpips_params=lpips)))
  assert step == 2 and restored.lpips_params is None
  assert state.lpips_params is None  # the caller's state was not touched either
  ckpts.close()


def test_restore_with_sharded_target(states, tmp_path):
  cfg, state, abstract = states["kl_ema"]
  ckpts = Checkpoints(tmp_path)
  ckpts.save(5, state)
  mesh = train.make_mesh(cfg)
  shardings = train.state_shardings(mesh, abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  restored, _ = ckpts.restore(target)
  assert_bitwise(restored, state)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
    assert isinstance(x, jax.Array) and x.sharding == s
  ckpts.close()


def test_wrong_target_is_an_error_not_corruption(states, tmp_path):
  _, state, _ = states["kl_ema"]
  ckpts = Checkpoints(tmp_path / "checkpoints")
  ckpts.save(3, state)
  with pytest.raises(CheckpointError, match=r"(?s)step 3 at .*unexpected keys.*ema_params/logvar"
                                      r".*mis-shaped keys.*g_params/model/encoder/conv_out"):
    ckpts.restore(states["fsq"][2])
  assert ckpts.all_steps() == [3] and (tmp_path / "checkpoints" / "3").is_dir()
  assert not (tmp_path / "checkpoints_corrupt").exists()
  ckpts.close()


# ---------------------------------------------------------------- save policy


def test_nonfinite_state_is_refused(tmp_path):
  state = tiny_state()
  w = np.array(state.g_params["model"]["w"])
  w[1, 2, 3] = np.nan
  bad = state.replace(g_params=dict(state.g_params, model={"w": w}),
                      lecam=(np.float32(np.inf), state.lecam[1]))
  ckpts = Checkpoints(tmp_path)
  with pytest.raises(NonFiniteStateError) as e:
    ckpts.save(1, bad)
  assert sorted(e.value.paths) == ["g_params/model/w", "lecam/0"]
  assert "g_params/model/w" in str(e.value) and "step 1" in str(e.value)
  assert ckpts.all_steps() == [] and not any(tmp_path.iterdir())
  assert ckpts.save(1, state)  # the same step saves once finite
  ckpts.wait_until_finished()
  assert ckpts.all_steps() == [1]
  ckpts.close()


def test_keep_last_and_best_also_after_restart(tmp_path):
  psnr = {1: 20.0, 2: 30.0, 3: 21.0, 4: float("nan"), 5: 23.0}
  ckpts = Checkpoints(tmp_path, keep_last=2, keep_best=1)
  for step, value in psnr.items():
    assert ckpts.save(step, tiny_state(step), metrics={"val/psnr": value, "loss": 1.0})
  ckpts.wait_until_finished()
  assert ckpts.all_steps() == [2, 4, 5] and ckpts.best_step() == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4", "5"]
  assert not ckpts.save(5, tiny_state(9)) and not ckpts.save(3, tiny_state(9), force=True)
  ckpts.close()
  # A new manager (a resumed run) reads the metrics back: step 2 stays the best.
  ckpts = Checkpoints(tmp_path, keep_last=2, keep_best=1)
  ckpts.save(6, tiny_state(6))  # no metrics: kept only while among the last 2
  ckpts.save(7, tiny_state(7), metrics={"val/psnr": 25.0})
  ckpts.wait_until_finished()
  assert ckpts.all_steps() == [2, 6, 7]
  restored, step = ckpts.restore(abstract_of(tiny_state()), step=2)
  assert step == 2
  assert_bitwise(restored, tiny_state(2))
  ckpts.close()
  ckpts = Checkpoints(tmp_path, keep_last=1, keep_best=1, best_mode="min")
  ckpts.save(8, tiny_state(8), metrics={"val/psnr": 24.0})
  ckpts.wait_until_finished()
  assert ckpts.all_steps() == [8]  # min mode: 24 beats 25 and 30
  ckpts.close()


# ---------------------------------------------------------------- broken steps



def _break(step_dir, how):
  data = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
  assert data, list(step_dir.rglob("*"))
  if how == "metadata":
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {"g_par')
    return
  for f in data:
    if how == "truncate":
      with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    else:
      f.unlink()


@pytest.mark.parametrize("how", ["truncate", "delete", "metadata"])
def test_broken_latest_step_falls_back_and_is_moved_aside(tmp_path, caplog, how):
  directory = tmp_path / "checkpoints"
  ckpts = Checkpoints(directory, async_save=False)
  ckpts.save(1, tiny_state(1))
  ckpts.save(2, tiny_state(2))
  _break(directory / "2", how)
  with pytest.raises(CheckpointError, match=rf"step 2 at {directory / '2'} is broken"):
    ckpts.restore(abstract_of(tiny_state()), step=2)  # explicit: an error, nothing moved
  assert (directory / "2").is_dir()
  with caplog.at_level(logging.WARNING):
    restored, step = ckpts.restore(abstract_of(tiny_state()))
  assert step == 1
  assert_bitwise(restored, tiny_state(1))
  assert any("step 2" in r.getMessage() and "failed to restore" in r.getMessage()
             for r in caplog.records)
  moved = list((tmp_path / "checkpoints_corrupt").iterdir())
  assert [m.name.split("-")[0] for m in moved] == ["2"] and (moved[0] / "state").is_dir()
  assert ckpts.all_steps() == [1] and not (directory / "2").exists()
  assert ckpts.save(2, tiny_state(22))  # the step number is free again
  restored, step = ckpts.restore(abstract_of(tiny_state()))
  assert step == 2
  assert_bitwise(restored, tiny_state(22))
  ckpts.close()


def test_all_steps_broken_or_none(tmp_path):
  ckpts = Checkpoints(tmp_path / "checkpoints", async_save=False)
  assert ckpts.restore(abstract_of(tiny_state())) is None and ckpts.latest_step() is None
  ckpts.save(1, tiny_state(1))
  _break(tmp_path / "checkpoints" / "1", "delete")
  assert ckpts.restore(abstract_of(tiny_state())) is None
  assert len(list((tmp_path / "checkpoints_corrupt").iterdir())) == 1
  with pytest.raises(CheckpointError, match=r"no checkpoint step 7 .*steps: none"):
    ckpts.restore(abstract_of(tiny_state()), step=7)
  ckpts.close()


def test_leftover_tmp_folder_is_ignored(tmp_path):
  ckpts = Checkpoints(tmp_path, async_save=False)
  ckpts.save(1, tiny_state(1))
  ckpts.save(2, tiny_state(2))
  ckpts.close()
  tmp = tmp_path / "3.orbax-checkpoint-tmp"  # what an interrupted save of step 3 leaves
  shutil.copytree(tmp_path / "2", tmp)
  _break(tmp, "truncate")
  reader = Checkpoints(tmp_path, read_only=True)  # no tmp cleanup: listing alone ignores it
  assert reader.all_steps() == [1, 2] and tmp.is_dir()
  assert reader.restore(abstract_of(tiny_state()))[1] == 2
  reader.close()
  ckpts = Checkpoints(tmp_path, async_save=False)
  assert ckpts.latest_step() == 2
  assert ckpts.save(3, tiny_state(3))
  restored, step = ckpts.restore(abstract_of(tiny_state()))
  assert step == 3
  assert_bitwise(restored, tiny_state(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3"]
  ckpts.close()


# ---------------------------------------------------------------- load_init_params


def test_load_init_params_from_train_checkpoints(states, tmp_path):
  cfg, state, _ = states["kl_ema"]
  workdir = tmp_path / "run"
  ckpts = Checkpoints(workdir / "checkpoints", async_save=False)
  ckpts.save(10, state)
  ckpts.save(20, state.replace(g_params=randomize(state.g_params, 5)))
  ckpts.close()
  _break(workdir / "checkpoints" / "20", "truncate")  # latest broken: step 10 is used, read-only
  for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "10"):
    assert_bitwise(load_init_params(path, cfg), state.g_params["model"])
  details = {}
  ema = load_init_params(str(workdir), cfg, use_ema=True, details=details)
  assert_bitwise(ema, state.ema_params["model"])
  assert details == {"step": 10, "source": "ema_params"}  # eval.py records the step used
  assert (workdir / "checkpoints" / "20").is_dir()  # read-only: the broken step stays
  assert not (workdir / "checkpoints_corrupt").exists()
  with pytest.raises(CheckpointError, match="step 20 at .* is broken"):
    load_init_params(workdir / "checkpoints" / "20", cfg)
  # No EMA saved: use_ema falls back to the trained params.
  fcfg, fstate, _ = states["fsq"]
  fdir = tmp_path / "fsq"
  with Checkpoints(fdir, async_save=False) as c:
    c.save(1, fstate)
  assert_bitwise(load_init_params(fdir, fcfg, use_ema=True), fstate.g_params["model"])


def test_load_init_params_from_safetensors_and_convert_folder(states, tmp_path):
  cfg = states["kl_ema"][0]
  params = random_params(abstract_of(states["kl_ema"][1].g_params["model"]), seed=7)
  st = tmp_path / "official.safetensors"
  save_safetensors(state_dict_from_params(params), st)
  details = {}
  assert_bitwise(load_init_params(st, cfg, details=details), params)
  assert details == {"step": None, "source": "state_dict"}
  out = tmp_path / "flax"
  tiny = [f"{k}={tuple(v) if isinstance(v, (list, tuple)) else v}"
          for k, v in cfg.model.items() if k in ("ch", "ch_mult", "num_res_blocks")]
  assert convert_main(["to-flax", str(st), "--config", cfg.variant, "--out", str(out)]
                      + [a for kv in tiny for a in ("--set", kv)]) == 0
  loaded = load_init_params(out, cfg)
  assert_bitwise(loaded, params)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
  with pytest.raises(ValueError, match=r"(?s)flax do not match config.model"
                                       r".*mis-shaped keys.*encoder/conv_out"):
    load_init_params(out, states["fsq"][0])
  with pytest.raises(CheckpointError, match="use_ema"):
    load_init_params(st, cfg, use_ema=True)
  # Another width: the field to change, read from the file, instead of every mis-shaped key.
  wide = copy.deepcopy(cfg)
  wide.model.ch = 2 * cfg.model.ch
  want = (f"this checkpoint has ch={cfg.model.ch} (the config has ch={2 * cfg.model.ch}); "
          f"pass --config.model.ch={cfg.model.ch}")
  for path in (st, out):
    with pytest.raises(CheckpointError) as e:
      load_init_params(path, wide)
    assert str(e.value).endswith(want) and "\n" not in str(e.value)


def test_load_init_params_errors(states, tmp_path):
  cfg = states["kl_ema"][0]
  missing = tmp_path / "nope"
  with pytest.raises(CheckpointNotFoundError, match=f"{missing} does not exist") as e:
    load_init_params(missing, cfg)
  assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="empty holds no checkpoint"):
    load_init_params(tmp_path / "empty", cfg)
  (tmp_path / "weights.npz").write_bytes(b"x")
  with pytest.raises(CheckpointError, match="unknown checkpoint file type"):
    load_init_params(tmp_path / "weights.npz", cfg)
  (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
  with pytest.raises(ValueError, match="bad.safetensors"):
    load_init_params(tmp_path / "bad.safetensors", cfg)
  with Checkpoints(tmp_path / "run" / "checkpoints", async_save=False) as c:
    c.save(1, tiny_state())
  _break(tmp_path / "run" / "checkpoints" / "1", "delete")
  with pytest.raises(CheckpointError, match=f"no checkpoint under {tmp_path / 'run'} could be"):
    load_init_params(tmp_path / "run", cfg)


def test_nonfinite_paths_ignores_integers():
  tree = {"a": np.array([1.0, np.inf]), "b": np.array([3], np.int32), "c": jax.numpy.ones(2)}
  assert ckpt_lib.nonfinite_paths(tree) == ["a"]
  assert ckpt_lib.nonfinite_paths({"c": jax.numpy.array([0.0, np.nan], jax.numpy.bfloat16)}) \
      == ["c"]


# ---------------------------------------------------------------- other read errors


def fail_reads(monkeypatch, step, error, times=None):
  """Orbax's state read of `step` raises `error` (the first `times` reads; None: always);
  returns the list of attempts, one per read of that step."""
  original, attempts = ocp.PyTreeCheckpointHandler.restore, []

  def restore(self, directory, *args, **kwargs):
    if directory.parent.name == str(step):
      attempts.append(directory)
      if times is None or len(attempts) <= times:
        raise error
    return original(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", restore)
  monkeypatch.setattr(ckpt_lib, "RETRY_DELAYS_S", (0.01, 0.01))
  return attempts


def two_steps(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpts = Checkpoints(directory, async_save=False)
  ckpts.save(1, tiny_state(1))
  ckpts.save(2, tiny_state(2))
  return directory, ckpts


def test_transient_read_error_is_retried_and_the_step_kept(tmp_path, monkeypatch, caplog):
  directory, ckpts = two_steps(tmp_path)
  attempts = fail_reads(monkeypatch, 2, OSError(5, "Input/output error"), times=1)
  with caplog.at_level(logging.WARNING):
    restored, step = ckpts.restore(abstract_of(tiny_state()))
  assert step == 2 and len(attempts) == 2
  assert_bitwise(restored, tiny_state(2))
  assert any("step 2" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)
  assert ckpts.all_steps() == [1, 2] and not (tmp_path / "checkpoints_corrupt").exists()
  ckpts.close()


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied"),
    RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4096 bytes."),
    ValueError("UNAVAILABLE: Error reading local file: connection reset")])
def test_persistent_read_error_stops_and_moves_nothing(tmp_path, monkeypatch, error):
  directory, ckpts = two_steps(tmp_path)
  attempts = fail_reads(monkeypatch, 2, error)
  with pytest.raises(ckpt_lib.CheckpointReadError,
                     match=rf"cannot read checkpoint step 2 at {directory / '2'} \(3 attempts\)"
                           rf": {type(error).__name__}.*nothing was moved") as e:
    ckpts.restore(abstract_of(tiny_state()))
  assert e.value.__cause__ is error and isinstance(e.value, CheckpointError)
  assert len(attempts) == 3
  assert ckpts.all_steps() == [1, 2] and (directory / "2" / "state").is_dir()
  assert not (tmp_path / "checkpoints_corrupt").exists()
  ckpts.close()


def test_read_errors_are_classified():
  shows = ckpt_lib._shows_corruption
  tensorstore = "{}: Error reading \"x/.zarray\" in OCDBT database at local file \"/c/2/state/\""
  for code, broken in (("NOT_FOUND", True), ("OUT_OF_RANGE", True), ("DATA_LOSS", True),
                       ("PERMISSION_DENIED", False), ("UNAVAILABLE", False),
                       ("RESOURCE_EXHAUSTED", False), ("DEADLINE_EXCEEDED", False)):
    for metadata in (True, False):
      assert shows(ValueError(tensorstore.format(code)), metadata) is broken, code
  assert shows(FileNotFoundError("no _METADATA"), False)
  assert not shows(PermissionError("denied"), True) and not shows(OSError(5, "EIO"), True)
  assert not shows(MemoryError(), False)
  assert shows(KeyError("tree_metadata"), metadata=True)  # valid JSON, not Orbax's metadata
  assert shows(AttributeError("'list' object has no attribute 'get'"), metadata=True)
  assert not shows(KeyError("tree_metadata"), metadata=False)
  wrapped = RuntimeError("restore failed")
  wrapped.__cause__ = ValueError("DATA_LOSS: Error decoding b-tree node")
  assert shows(wrapped, False)
