"""Ahead-of-time plans of the train step for a device slice: per-chip memory, cost, collectives.

    devices = topology_devices("v5p:4x4x4")            # needs libtpu (`pip install -e .[tpu]`)
    cfg = apply_mesh(cfg, parse_mesh("data=16,space=4", len(devices)))
    rec = plan_train_step(cfg, devices, chip=chip_of("v5p:4x4x4"))

`topology_devices` describes a TPU slice without a TPU (libtpu compiles real TPU programs on a
CPU-only machine); `jax.devices()` works too, which is how the tests exercise the same reporting.
The step is the project's own (`make_train_step`, `make_mesh`, `state_shardings`,
`batch_sharding`) on abstract inputs, so nothing is allocated. Every program is built for its
devices' platform, not this host's: the mesh is checked against those devices and their hosts,
`dtype="auto"` and the precision resolve for that platform, and the model takes that platform's
forms (`layers.lowering_platform`), so a TPU plan compiled here is the TPU's program. A record
holds, per chip: XLA's memory analysis (arguments, outputs, temporaries, aliased donations, their sum
against the chip's HBM), XLA's cost analysis (FLOPs, bytes accessed), a roofline step time
`max(FLOPs / peak, bytes / HBM bandwidth)`, the collectives of the compiled HLO with their bytes,
and the lower / compile times. `fit_batch` finds the largest per-chip batch that fits from two
compiles and a linear fit of memory in the batch, confirmed by one more compile.
`plan_inference` does the same for the model's encode or decode.
"""

import collections
import math
import re
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.planning import traffic

GIB = 2**30
TRAFFIC_TOP = 25  # ops listed by bytes in a plan record (all model parts are)

# Per chip: HBM (GiB), dense bf16 peak (TFLOP/s), HBM bandwidth (GB/s), from Google Cloud's TPU
# system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e).
CHIPS = {
    "v4": dict(hbm_gib=32.0, bf16_tflops=275.0, hbm_gbps=1228.0),
    "v5e": dict(hbm_gib=16.0, bf16_tflops=197.0, hbm_gbps=819.0),
    "v5p": dict(hbm_gib=95.0, bf16_tflops=459.0, hbm_gbps=2765.0),
    "v6e": dict(hbm_gib=32.0, bf16_tflops=918.0, hbm_gbps=1640.0),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "s8": 1, "u8": 1, "pred": 1, "s64": 8, "u64": 8}


def chip_of(topology: str) -> Optional[dict]:
  """The `CHIPS` row of a topology name ("v5p:4x4x4" -> v5p), with its name; None if unknown."""
  kind = topology.split(":")[0].lower()
  kind = _ALIASES.get(kind, kind)
  return dict(CHIPS[kind], name=kind) if kind in CHIPS else None


def topology_devices(topology: str):
  """The devices of TPU slice `topology` ("v5e:2x2", "v5p:4x4x4", ...), compiled for without a
  TPU. Needs libtpu: `pip install -e .[tpu]` (jax[tpu])."""
  try:
    import libtpu  # noqa: F401
  except ImportError as e:
    raise RuntimeError("--topology needs libtpu to compile TPU programs on this machine: "
                       "pip install -e '.[tpu]' (jax[tpu] of the installed jax version)") from e
  from jax.experimental import topologies

  return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def parse_mesh(spec: Optional[str], n_devices: int) -> dict:
  """`"data=16,space=4"` (axes data, fsdp, space) -> `{"data", "fsdp", "space"}` sizes whose
  product is `n_devices`; None / "" = data parallel over every device."""
  sizes = dict(data=0, fsdp=1, space=1)
  for part in (spec or "").split(","):
    if not part.strip():
      continue
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"--mesh: expected AXIS=N with AXIS in data, fsdp, space, got {part!r}")
    sizes[key] = int(value)
  rest = sizes["fsdp"] * sizes["space"]
  if sizes["data"] == 0:
    sizes["data"] = n_devices // rest if n_devices % rest == 0 else 0
  if sizes["data"] * rest != n_devices:
    raise ValueError(f"--mesh {spec!r}: data x fsdp x space = {sizes['data'] * rest}, but the "
                     f"slice has {n_devices} devices")
  return sizes


def apply_mesh(cfg, sizes: dict):
  """Sets `cfg.train.mesh` to the `parse_mesh` sizes."""
  m = cfg.train.mesh
  m.fsdp = sizes["fsdp"] > 1
  m.fsdp_size = sizes["fsdp"] if sizes["fsdp"] > 1 else 0
  m.space = sizes["space"]
  return cfg


def collectives(hlo_text: str) -> dict:
  """`{op: {"count", "bytes", "largest"}}` of the collectives in compiled HLO text (bytes: each
  op's result; for async `-start` ops the largest buffer of the result tuple)."""
  out = collections.defaultdict(lambda: dict(count=0, bytes=0, largest=0))
  pat = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(" +
                   "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    m = pat.search(line)
    if not m:
      continue
    sizes = [_BYTES.get(d, 4) * math.prod(int(v) for v in dims.split(",") if v)
             for d, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", m.group(1))]
    n = (max(sizes) if m.group(3) else sum(sizes)) if sizes else 0
    rec = out[m.group(2)]
    rec["count"] += 1
    rec["bytes"] += n
    rec["largest"] = max(rec["largest"], n)
  return dict(out)


def _abstract_inputs(cfg, mesh, shape, platform):
  from vidtok_jax import train
  from vidtok_jax.planning.configs import lpips_abstract_params
  from vidtok_jax.train import mesh as mesh_lib
  from vidtok_jax.train import state as state_lib

  lp = lpips_abstract_params(cfg.loss.lpips_net) if cfg.loss.perceptual_weight > 0 else None
  import vidtok_jax

  abstract = jax.eval_shape(
      lambda p, lp: train.create_train_state(cfg, jax.random.key(0), p, lpips_params=lp),
      vidtok_jax.abstract_params(state_lib.model_config(cfg, platform)), lp)
  shardings = mesh_lib.state_shardings(mesh, abstract, fsdp=cfg.train.mesh.fsdp,
                                       fsdp_axis=cfg.train.mesh.fsdp_axis)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  batch_sh = mesh_lib.batch_sharding(mesh)
  batch = {"video": jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=batch_sh)}
  return state, batch, shardings, batch_sh


def _lowered(jitted, args, rec):
  """`(jitted lowered on args, rec with its "lower_s")`."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  rec["lower_s"] = time.perf_counter() - t0
  return lowered, rec


def lower_train_step(cfg, devices, backend: Optional[str] = None, shape=None):
  """`(lowered, record)`: `cfg`'s train step lowered for `devices` (mesh from `cfg.train.mesh`,
  checked against those devices and their hosts) on abstract inputs of `shape`
  `(B, T, H, W, 3)` (default: the config's data shape). The program is built for the devices'
  platform (`backend`, default theirs): its dtype, precision and platform-dependent forms are
  the target's, and the record's `dtype` / `precision` are the program's. `cfg` is not changed."""
  from vidtok_jax.train.compile_options import compiler_options
  from vidtok_jax.train import mesh as mesh_lib
  from vidtok_jax.train import step as step_lib

  n = len(devices)
  platform = backend or mesh_lib.platform_of(devices)
  cfg = cfg.copy_and_resolve_references()  # the caller's config stays as it was
  if shape is None:
    d = cfg.data
    shape = (d.global_batch_size, d.num_frames, d.size, d.size, 3)
  with cfg.unlocked():
    cfg.data.global_batch_size = shape[0]
  mesh_lib.check_mesh_config(cfg, devices)
  mesh = mesh_lib.make_mesh(cfg, devices)
  state, batch, shardings, batch_sh = _abstract_inputs(cfg, mesh, shape, platform)
  step = step_lib.make_train_step(cfg, mesh=mesh, platform=platform)
  fn = jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
               donate_argnums=0, compiler_options=compiler_options(platform))
  batch_devices = n // mesh.shape.get("space", 1)
  rec = dict(devices=n, device_kind=devices[0].device_kind, platform=step.platform,
             mesh=dict(mesh.shape), shape=list(shape), clips_per_chip=shape[0] / batch_devices,
             dtype=step.compute_dtype, precision=step.model_config.precision,
             remat=cfg.model.remat, stage=cfg.get("stage", 1),
             lpips=cfg.loss.perceptual_weight > 0)
  return _lowered(fn, (state, batch), rec)


def plan_train_step(cfg, devices, backend: Optional[str] = None, chip: Optional[dict] = None,
                    shape=None, hlo_path=None) -> dict:
  """Compiles `cfg`'s train step for `devices` (see `lower_train_step`) and returns its record:
  the program's settings, `report` and the lower / compile times. `cfg` is not changed.
  `hlo_path`: also write the compiled program's text there (gzip), see `report`."""
  lowered, rec = lower_train_step(cfg, devices, backend, shape)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  rec["compile_s"] = time.perf_counter() - t0
  rec.update(report(compiled, chip, hlo_path))
  return rec


def lower_inference(model_cfg, op: str, devices, backend: Optional[str] = None,
                    shape=(1, 17, 256, 256, 3), sizes: Optional[dict] = None):
  """`(lowered, record)`: `encode` or `decode` of `model_cfg` lowered for `devices` (the
  platform-dependent forms of `backend`, default the devices' platform) on the video batch
  `shape` (for decode: its latent), params replicated. `sizes` (`parse_mesh`): the batch split
  over `data` x `fsdp`, the height over `space` (what `Streamer(mesh=...)` does); default: the
  batch over every device."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import vidtok_jax
  from vidtok_jax.train.compile_options import compiler_options
  from vidtok_jax.models import layers
  from vidtok_jax.train import mesh as mesh_lib

  if op not in ("encode", "decode"):
    raise ValueError(f"op must be encode or decode, got {op!r}")
  n = len(devices)
  platform = backend or mesh_lib.platform_of(devices)
  sizes = sizes or dict(data=n, fsdp=1, space=1)
  rows, space = sizes["data"] * sizes["fsdp"], sizes["space"]
  if shape[0] % rows:
    raise ValueError(f"the batch {shape[0]} must divide by data x fsdp = {rows}")
  mesh = Mesh(np.asarray(devices).reshape(rows, space), ("data", "space"))
  rep = NamedSharding(mesh, P())

  def split(a):  # batch over data, height over space where it divides (small latents: whole)
    h = "space" if a.shape[2] % space == 0 else None
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P("data", None, h)))

  model = vidtok_jax.VidTok(model_cfg)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                        vidtok_jax.abstract_params(model_cfg))
  x = split(jax.ShapeDtypeStruct(tuple(shape), jnp.float32))

  # The argument is named `params`: the traffic meter groups a weight's staging by that path.
  def encode(params, x):
    with layers.lowering_platform(platform):  # traced for the target, not this host
      return model.apply({"params": params}, x, method=model.encode)[0]

  def decode(params, z):
    with layers.lowering_platform(platform):
      return model.apply({"params": params}, z, method=model.decode)

  fn, arg = encode, x
  if op == "decode":
    fn, arg = decode, split(jax.eval_shape(encode, params, x))
  rec = dict(op=op, devices=n, device_kind=devices[0].device_kind, platform=platform,
             mesh={k: v for k, v in dict(data=rows, space=space).items() if v > 1} or {"data": 1},
             shape=list(shape), clips_per_chip=shape[0] / rows, dtype=str(model.config.dtype),
             precision=str(model.config.precision))
  return _lowered(jax.jit(fn, compiler_options=compiler_options(platform)), (params, arg), rec)


def plan_inference(model_cfg, op: str, devices, backend: Optional[str] = None,
                   chip: Optional[dict] = None, shape=(1, 17, 256, 256, 3),
                   sizes: Optional[dict] = None, hlo_path=None) -> dict:
  """Compiles `encode` or `decode` of `model_cfg` for `devices` (see `lower_inference`); its
  record (`report` plus the clips per second per chip the roofline allows)."""
  lowered, rec = lower_inference(model_cfg, op, devices, backend, shape, sizes)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  rec["compile_s"] = time.perf_counter() - t0
  rec.update(report(compiled, chip, hlo_path))
  if rec.get("roofline_s"):
    rec["roofline_clips_per_s_per_chip"] = shape[0] / rec["devices"] / rec["roofline_s"]
  return rec


def report(compiled, chip: Optional[dict] = None, hlo_path=None) -> dict:
  """Per-device memory, cost, roofline and collectives of a compiled SPMD program.

  `hlo_path`: write the compiled program's text there, gzip-compressed, so its traffic can be
  analysed again (`python -m vidtok_jax.planning.traffic report FILE`) without a recompile that
  takes minutes to tens of minutes."""
  rec = {}
  m = compiled.memory_analysis()
  if m is not None:
    parts = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                 temporaries=m.temp_size_in_bytes, aliased=m.alias_size_in_bytes,
                 code=getattr(m, "generated_code_size_in_bytes", 0))
    rec["memory_gib"] = {k: v / GIB for k, v in parts.items()}
    need = parts["arguments"] + parts["outputs"] + parts["temporaries"] - parts["aliased"]
    rec["hbm_needed_gib"] = need / GIB
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  rec["tflop"] = float(cost.get("flops", 0.0)) / 1e12
  rec["gb_accessed"] = float(cost.get("bytes accessed", 0.0)) / 1e9
  if chip:
    rec["chip"] = chip["name"]
    rec["hbm_gib"] = chip["hbm_gib"]
    if "hbm_needed_gib" in rec:
      rec["fits"] = rec["hbm_needed_gib"] <= chip["hbm_gib"]
    t_compute = rec["tflop"] / chip["bf16_tflops"]
    t_memory = rec["gb_accessed"] / chip["hbm_gbps"]
    rec["roofline_s"] = max(t_compute, t_memory)
    rec["roofline_bound"] = "compute" if t_compute >= t_memory else "memory"
  text = compiled.as_text()
  if hlo_path:
    import gzip
    with gzip.open(hlo_path, "wt") as f:
      f.write(text)
    rec["hlo"] = str(hlo_path)
  rec["collectives"] = collectives(text)
  # Where the bytes go (the model is memory-bound on accelerators): top ops and model parts.
  rec["traffic"] = traffic.report(text, top=TRAFFIC_TOP)
  return rec


def fit_batch(make_cfg, devices, backend, chip, frames, size, space: int = 1,
              log=print) -> dict:
  """The largest per-chip batch of `frames x size^2` clips whose step fits `chip`'s HBM.

  `make_cfg(global_batch)` gives the config. Compiles per-chip batches 1 and 2, fits memory =
  a + b * batch, predicts the largest batch that fits, and confirms it with one more compile
  (stepping down while the compiled figure does not fit)."""
  n_batch = len(devices) // space

  def need(per_chip):
    cfg = make_cfg(per_chip * n_batch)
    rec = plan_train_step(cfg, devices, backend, chip,
                          (per_chip * n_batch, frames, size, size, 3))
    log(f"  {chip['name']} {frames}x{size}^2 remat={cfg.model.remat} {per_chip} clip(s)/chip: "
        f"{rec['hbm_needed_gib']:.2f} GiB (compiled in {rec['compile_s']:.0f} s)")
    return rec["hbm_needed_gib"]

  compiled = {1: need(1), 2: need(2)}
  slope = compiled[2] - compiled[1]
  base = compiled[1] - slope
  hbm = chip["hbm_gib"]
  predicted = max(0, int((hbm - base) // slope)) if slope > 0 else None
  out = dict(chip=chip["name"], hbm_gib=hbm, clip=f"{frames}x{size}x{size}",
             fixed_gib=base, per_clip_gib=slope, predicted_max=predicted)
  best = predicted
  if best is not None and best >= 1:
    while best >= 1:
      if best not in compiled:
        compiled[best] = need(best)
      if compiled[best] <= hbm:
        break
      best -= 1
  out["compiled_gib"] = {str(k): round(v, 3) for k, v in sorted(compiled.items())}
  out["max_clips_per_chip"] = best if best and best >= 1 and compiled.get(best, 1e9) <= hbm else 0
  out["confirmed_by_compile"] = out["max_clips_per_chip"] in compiled
  return out
