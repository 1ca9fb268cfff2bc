"""The "space" mesh axis of training (`config.train.mesh.space`): height-split activations.

On 8 CPU devices (a subprocess: XLA_FLAGS must be set before jax is imported, started when this
module is set up so it compiles while the in-process tests run), two float64 train steps of
tiny causal v1.0, causal v1.1 and non-causal models with the height split 4 or 8 ways equal the
1-device steps to float64 precision, and the split step's compiled HLO exchanges conv halos
(collective-permutes) without all-gathering any full-resolution activation.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from vidtok_jax.train import mesh as mesh_lib

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
_SPEC = importlib.util.spec_from_file_location("vidtok_configs", REPO / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)

# (variant, frames, meshes as "data,space") -- every family, each mesh shape at least once.
CASES = [("kl_causal_488_4chn", 9, ["2,4"]),
         ("kl_causal_488_4chn_v1_1", 9, ["1,8"]),
         ("kl_noncausal_488_4chn", 8, ["2,4"])]

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from spatial_mesh_test import CASES, tiny
from vidtok_jax import train
from vidtok_jax.planning import aot
from random_weights import random_params
import vidtok_jax

from vidtok_jax.train import state as state_lib

assert jax.device_count() == 8
# float64 throughout (model, discriminator, state, inputs): float32 rounding, which the split
# reductions (norm statistics, weight gradients over split rows) reorder and Adam amplifies on
# near-zero gradient elements (+-lr steps), would hide a real difference of the same size.
jax.config.update("jax_enable_x64", True)
state_lib.train_dtype = lambda config, backend=None: "float64"
f64 = lambda tree: jax.tree.map(
    lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
    else a, tree)
out = {}
for variant, frames, meshes in CASES:
  cfg = tiny(variant, frames)
  params = random_params(vidtok_jax.abstract_params(cfg.model), 0)
  state = f64(train.create_train_state(cfg, jax.random.PRNGKey(0), params))
  x = [jax.random.uniform(jax.random.PRNGKey(s), (2, frames, 32, 32, 3), jnp.float64, -1, 1)
       for s in (1, 2)]

  def run(step, st, put=lambda v: v):
    mets = []
    for v in x:
      st, m = step(st, {"video": put(v)})
      mets.append(jax.device_get(m))
    return jax.device_get(st), mets

  ref, ref_m = run(jax.jit(train.make_train_step(cfg), device=jax.devices()[0]), state)
  for spec in meshes:
    data, space = (int(v) for v in spec.split(","))
    c = tiny(variant, frames)
    c.model.param_dtype = "float64"
    c.train.mesh.space = space
    mesh = train.make_mesh(c)
    assert dict(mesh.shape) == {"data": data, "space": space}, mesh.shape
    sh = train.state_shardings(mesh, train.abstract_train_state(c))
    bsh = train.batch_sharding(mesh)
    step = jax.jit(train.make_train_step(c, mesh=mesh), in_shardings=(sh, bsh),
                   out_shardings=(sh, None))
    compiled = step.lower(state, {"video": x[0]}).compile()
    st, mets = run(compiled, jax.device_put(state, sh), lambda v: jax.device_put(v, bsh))
    leaves = lambda t: jax.tree.leaves(t)
    scale = lambda b: max(1.0, float(np.max(np.abs(b))))
    err = {part: max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) / scale(b)
                     for a, b in zip(leaves(getattr(st, part)), leaves(getattr(ref, part))))
           for part in ("g_params", "d_params", "d_batch_stats")}
    err["metrics"] = max(abs(float(m[k]) - float(r[k])) / (abs(float(r[k])) + 1e-3)
                         for m, r in zip(mets, ref_m) for k in r)
    shards = sorted({s.data.shape[2] for s in jax.device_put(x[0], bsh).addressable_shards})
    # Gathers of a weight's shape (the partitioner gathers some weight gradients) apart, the
    # gathers of activations.
    weights = {"[" + ",".join(map(str, a.shape)) + "]"
               for a in jax.tree.leaves((state.g_params, state.d_params))}
    hlo = compiled.as_text().splitlines()
    gathers_weight = lambda l: any(f"{w}{{" in l.split(" all-gather")[0] for w in weights)
    acts = [l for l in hlo if not (" all-gather" in l and gathers_weight(l))]
    out[f"{variant} {spec}"] = dict(err=err, steps=int(st.step), shards=shards,
                                    collectives=aot.collectives("\n".join(hlo)),
                                    activation_collectives=aot.collectives("\n".join(acts)))
    print("CASE", variant, spec, json.dumps(out[f"{variant} {spec}"]), flush=True)
print("RESULT" + json.dumps(out))
"""


def tiny(variant, frames):
  """A narrow 3-level model (heights 32, 16, 8) with every loss term on but LPIPS."""
  import vidtok_jax

  cfg = configs.get_config(variant + ",tiny")
  cfg.model = vidtok_jax.load_config("vidtok_" + variant, ch=4, ch_mult=(1, 2, 2),
                                     num_res_blocks=1)
  cfg.loss.perceptual_weight = 0.0
  cfg.loss.disc_start = 0  # discriminator (and its BatchNorm over split frames) from step 0
  cfg.data.num_frames, cfg.data.size, cfg.data.global_batch_size = frames, 32, 2
  cfg.model.param_dtype = "float64"  # the script computes in float64 (see SCRIPT)
  return cfg


_TEST = "test_space_axis_equals_one_device"


@pytest.fixture(scope="module", autouse=True)
def spatial_run(request):
  if not any(item.name == _TEST and not item.get_closest_marker("skip")
             for item in request.session.items):
    yield None
    return
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(TESTS)], env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def test_space_axis_equals_one_device(spatial_run):
  out, _ = spatial_run.communicate(timeout=2400)
  assert spatial_run.returncode == 0, out[-6000:]
  res = json.loads(out.split("RESULT")[-1])
  assert set(res) == {f"{v} {m}" for v, _, ms in CASES for m in ms}
  for name, r in res.items():
    space = int(name.split(",")[-1])
    assert r["steps"] == 2 and r["shards"] == [32 // space], (name, r)
    # float64: only the reduction order differs (norms and grads sum over split rows);
    # measured 6.6e-14 (v1.0 data=2,space=4). The metrics are returned as float32.
    err = r["err"]
    assert max(err["g_params"], err["d_params"], err["d_batch_stats"]) < 1e-12, (name, err)
    assert err["metrics"] < 1e-6, (name, err)
    c = r["collectives"]
    assert c["collective-permute"]["count"] > 0, (name, c)  # conv halos between neighbours
    # No full-resolution activation is gathered: the largest activation all-gather (latent
    # attention keys/values, the discriminator's 8x8 maps: 147456 bytes for v1.1 1,8) is
    # smaller than one clip's narrowest full-resolution activation (T x 32 x 32 x ch=4 float64),
    # which any full-resolution gather of a device's clips would reach. (Weight gathers, e.g. a
    # discriminator kernel's gradient, are counted apart.)
    c = r["activation_collectives"]
    frames = 9 if "noncausal" not in name else 8
    assert c.get("all-gather", {"largest": 0})["largest"] < frames * 32 * 32 * 4 * 8, (name, c)


def test_bad_space_names_the_level():
  cfg = tiny("kl_causal_488_4chn", 9)
  cfg.train.mesh.space = 16  # heights 32, 16, 8: level 2 (8 rows) cannot split 16 ways
  with pytest.raises(ValueError, match=r"space=16 does not divide the height 8 of encoder "
                                       r"level 2 \(down\.2\)"):
    mesh_lib.check_mesh_config(cfg, 16)
  cfg.model.ch_mult = (1, 2, 2, 2)  # heights 32, 16, 8, 4
  cfg.train.mesh.space = 8
  with pytest.raises(ValueError, match=r"height 4 of encoder level 3 \(down\.3\)"):
    mesh_lib.check_mesh_config(cfg, 8)


def test_batch_divides_data_times_fsdp_only():
  cfg = tiny("kl_causal_488_4chn", 9)
  cfg.data.global_batch_size = 2
  cfg.train.mesh.space = 4
  mesh_lib.check_mesh_config(cfg, 8)  # 2 clips over data=2 x space=4: fine
  with pytest.raises(ValueError, match=r"global_batch_size: 2 is not divisible by data x "
                                       r"fsdp = 4 \(16 devices / config.train.mesh.space=4\)"):
    mesh_lib.check_mesh_config(cfg, 16)
  cfg.train.mesh.space = 3
  with pytest.raises(ValueError, match="space=3 does not divide the 8 devices"):
    mesh_lib.check_mesh_config(cfg, 8)


def test_space_groups_stay_on_one_host():
  """Devices listed in any order (here interleaved over 2 hosts of 4): after `host_major`, the
  mesh's last-axis (space) groups and fsdp groups each lie on one host."""
  import types

  import numpy as np

  devs = [types.SimpleNamespace(id=i, process_index=i % 2) for i in range(8)]
  ordered = mesh_lib.host_major(devs)
  assert [d.process_index for d in ordered] == [0, 0, 0, 0, 1, 1, 1, 1]
  assert [d.id for d in ordered] == [0, 2, 4, 6, 1, 3, 5, 7]
  grid = np.asarray(ordered).reshape(2, 4)  # data=2, space=4: what make_mesh builds
  assert all(len({d.process_index for d in row}) == 1 for row in grid)
