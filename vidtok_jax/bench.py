r"""Benchmark CLI: time, memory and FLOP/s of encode / decode / forward / fwd_bwd / train_step.

  python -m vidtok_jax.bench --config vidtok_kl_causal_488_4chn --shape 1,17,64,64
  python -m vidtok_jax.bench --config vidtok_fsq_causal_488_262144 --ops forward,fwd_bwd \
      --dtype bfloat16 --remat blocks --set ch=64 --json out.json
  python -m vidtok_jax.bench --fit 16,80 --shape 1,17,64,64     # largest trainable clip

Every op is one jitted program, compiled ahead of time (trace+lower and compile timed apart),
run `--warmup` times, then `--repeats` timed calls each ended by `jax.block_until_ready`; the
median is reported, with clips/s and frames/s. `fwd_bwd` is the forward plus the gradient of the
L1 reconstruction loss w.r.t. the params, on CPU by default with the staged gradient
(`--grad auto`: `vidtok_jax.staged_grad`, one small program per stage, faster and far leaner on
XLA:CPU; its compile time is the first call less a steady one; `--grad program` for one
program); `train_step` is the full GAN train step (autoencoder
and discriminator updates, `vidtok_jax.train.make_train_step`, LPIPS with random VGG weights of
the right shapes: speed does not depend on the values).

Memory: on GPU/TPU the device's `peak_bytes_in_use`; on CPU the process's peak RSS (VmHWM) over
the timed calls, counted from a reset after compiling (so compilation's own memory, reported as
`compile_peak_rss_gib`, is excluded; params, the compiled program and the runtime are included,
like a PyTorch process's peak RAM). Each op runs in a fresh subprocess (`--no-isolate` to turn
off), so peaks are per op. FLOPs come from XLA's cost analysis of the lowered (device-independent)
program, so convolutions count on every backend; utilisation is against the device's dense peak
for the compute dtype where the device is known (`--peak_tflops` otherwise).

`--topology v5p:4x4x4` (with `--ops train_step`): compiles the train step ahead of time for
that TPU slice from this machine (needs libtpu: `pip install -e .[tpu]`), with the project's
mesh (`--mesh data=16,space=4`) and shardings, and reports per chip: HBM needed (arguments,
outputs, temporaries, aliasing) against the chip's HBM, XLA's TPU cost analysis, a roofline
step time and the compiled collectives (`vidtok_jax.planning.aot`); nothing runs. `--topology cpu` does
the same for this host's devices. With `--topology`, `--fit 17x128,17x256` finds for each
topology (comma list) x `--fit_remats` the largest per-chip batch of those clips that fits
(batches 1 and 2 compiled, the rest predicted linearly, the prediction confirmed by a compile).
The train step is the official recipe's stage for the clip size (`--stage auto`: stage 2, the
frozen encoder and decoder-only training, at 256^2 and above; stage 1 below). `--ops
encode,decode` with `--topology` plans inference the same way (batch over `data`, height over
`space`, as `Streamer(mesh=...)` shards it), with the roofline's clips/s per chip.

`--dtype auto` is the training default: bf16 compute on GPU/TPU, float32 on CPU; `--precision`
(auto: backend default with bf16, "highest" with float32; tf32, default, high, highest).

`--fit 16,80`: for each dtype x remat setting, the largest clip (from `--fit_clips`) whose train
step at batch 1 fits each memory budget, from XLA's memory analysis of the compiled step
(arguments + outputs + temporaries - aliased donations): an estimate, compiled for this backend.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

GIB = 2**30
OPS = ("encode", "decode", "forward", "fwd_bwd", "train_step")

# Dense peak TFLOP/s (bfloat16, float32) by device kind, from vendor data sheets.
PEAKS = {
    "H100 80GB HBM3": (989.4, 66.9), "H100 PCIe": (756.0, 51.2), "H200": (989.4, 66.9),
    "A100": (312.0, 19.5), "TPU v4": (275.0, None), "TPU v5 lite": (197.0, None),
    "TPU v5p": (459.0, None), "TPU v6 lite": (918.0, None),
}


def device_peak_tflops(kind: str, dtype: str):
  for name, (bf16, f32) in PEAKS.items():
    if name in kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


def rss_kib(field: str) -> int:
  """A `/proc/self/status` memory field (VmRSS, VmHWM) in KiB; 0 where there is none."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def reset_peak_rss():
  """Resets VmHWM to the current RSS (Linux), so the peak is measured from here."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def train_config(variant: str, model_overrides: dict, dtype: str, batch: int, frames: int,
                 size: int, precision: str = "auto", lpips: bool = True, stage: int = 1):
  """The repo's training config (`configs/vidtok.py`) of `variant` and `stage` with the bench's
  overrides."""
  from vidtok_jax.train.configs import get_config  # what configs/vidtok.py re-exports

  cfg = get_config(f"{variant.removeprefix('vidtok_')},stage={stage}")
  import vidtok_jax

  cfg.model = vidtok_jax.load_config(variant, **model_overrides)
  cfg.train.dtype = dtype
  cfg.train.precision = precision
  if not lpips:
    cfg.loss.perceptual_weight = 0.0
  cfg.data.global_batch_size, cfg.data.num_frames, cfg.data.size = batch, frames, size
  return cfg


def model_config(a, dtype: str):
  """The model config of the model-only ops (timed, or `--topology` encode / decode plans):
  `--set` overrides, `--remat`, compute `dtype` and the precision `--precision` resolves to
  for it (auto: the backend default with bf16)."""
  import vidtok_jax
  from vidtok_jax.train.precision import resolve_precision

  precision = resolve_precision(a.precision, dtype, a.overrides.get("precision", "highest"))
  return vidtok_jax.load_config(a.config, **{**a.overrides, "remat": a.remat, "dtype": dtype,
                                             "precision": precision})


def resolve_stage(stage: str, size: int) -> int:
  """`--stage auto`: the official recipe's stage for that frame size (stage 2, the frozen encoder
  and decoder-only training, at 256^2 and above; stage 1 below)."""
  return (2 if size >= 256 else 1) if stage == "auto" else int(stage)


def lpips_abstract_params(net: str):
  """The shapes of the LPIPS params (no values)."""
  import jax
  import jax.numpy as jnp

  from vidtok_jax.metrics.lpips import LPIPS

  img = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda a, b: LPIPS(net=net).init(jax.random.key(0), a, b), img,
                        img)["params"]


def random_lpips_params(net: str):
  """LPIPS params of the right shapes with random values (timing does not depend on them)."""
  from vidtok_jax.models.autoencoder import random_params

  return random_params(lpips_abstract_params(net), seed=1)


def build(op: str, a):
  """`(fn, args, batch_clips, frames)`: the jittable function of `op` and its inputs."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import vidtok_jax
  from vidtok_jax.models.autoencoder import random_params

  b, t, h, w = a.shape
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32))
  if op == "train_step":
    from vidtok_jax import train

    cfg = train_config(a.config, {**a.overrides, "remat": a.remat}, a.dtype, b, t, h,
                       a.precision, a.lpips, resolve_stage(a.stage, h))
    params = random_params(vidtok_jax.abstract_params(cfg.model), seed=0)
    lp = random_lpips_params(cfg.loss.lpips_net) if cfg.loss.perceptual_weight > 0 else None
    state = train.create_train_state(cfg, jax.random.key(0), params, lpips_params=lp)
    return train.make_train_step(cfg), (state, {"video": x}), b, t
  cfg = model_config(a, a.dtype)
  model = vidtok_jax.VidTok(cfg)
  params = jax.device_put(random_params(vidtok_jax.abstract_params(cfg), seed=0))
  if op == "encode":
    return (lambda p, x: model.apply({"params": p}, x, method=model.encode)), (params, x), b, t
  if op == "forward":
    return (lambda p, x: model.apply({"params": p}, x)[1]), (params, x), b, t
  if op == "fwd_bwd":
    def l1(y, x, aux=None):
      return jnp.mean(jnp.abs(y.astype(jnp.float32) - x[:, x.shape[1] - y.shape[1]:]))

    if grad_mode(a.grad) == "staged":
      from vidtok_jax.train.compile_options import compiler_options
      from vidtok_jax.staged_grad import StagedGrad

      fn = StagedGrad(model, l1, compute_aux=False, residual_budget_mib=a.residual_budget_mib,
                      compiler_options=compiler_options())
      return fn, (params, x), b, t

    def loss(p, x):
      return l1(model.apply({"params": p}, x, compute_aux=False)[1], x)

    return jax.value_and_grad(loss), (params, x), b, t
  if op == "decode":
    z = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)[0])(params, x)
    dec = lambda p, z: model.apply({"params": p}, z, method=model.decode)
    frames = jax.eval_shape(dec, params, z).shape[1]
    return dec, (params, z), b, frames
  raise ValueError(f"unknown op {op!r}; ops: {', '.join(OPS)}")


def grad_mode(grad: str) -> str:
  """`--grad auto`: the staged gradient on CPU (faster and leaner there), one program elsewhere."""
  import jax

  if grad == "auto":
    return "staged" if jax.default_backend() == "cpu" else "program"
  return grad


def run_op(op: str, a) -> dict:
  """Compiles and times one op in this process; its record."""
  import jax

  from vidtok_jax.train.compile_options import compiler_options

  dev = jax.devices()[0]
  rec = dict(op=op, config=a.config, shape=list(a.shape), dtype=a.dtype,
             precision=a.precision, remat=a.remat,
             overrides=a.overrides, device=dev.device_kind, platform=dev.platform,
             jax=jax.__version__)
  if op == "fwd_bwd":
    rec["grad"] = grad_mode(a.grad)
  fn, args, clips, frames = build(op, a)
  jax.block_until_ready(args)
  if op == "fwd_bwd" and rec["grad"] == "staged":
    return run_staged(fn, args, clips, frames, rec, a)
  donate = (0,) if op == "train_step" else ()
  jitted = jax.jit(fn, donate_argnums=donate, compiler_options=compiler_options())
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  rec["lower_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  rec["compile_s"] = time.perf_counter() - t0
  flops = count_flops(lowered, lambda: compiled)
  mem = compiled.memory_analysis()
  if mem is not None:
    rec["xla_temp_gib"] = mem.temp_size_in_bytes / GIB
    rec["xla_args_gib"] = mem.argument_size_in_bytes / GIB
  rec["compile_peak_rss_gib"] = rss_kib("VmHWM") / 2**20

  def call(args):
    out = compiled(*args)
    jax.block_until_ready(out)
    return (out[0], args[1]) if op == "train_step" else args  # the donated state comes back

  return time_calls(call, args, clips, frames, flops, rec, a, dev)


def count_flops(lowered, compiled) -> float:
  """FLOPs of one program: XLA's cost analysis of the lowered program, else of the compiled one
  (`compiled`: the executable, or a callable making it). Backends and jax versions differ in which
  of the two they fill in (on an H200 with jax 0.11.2 the lowered one reported 0 FLOPs), so the
  first positive count wins; 0.0 only when neither has one."""
  for stage in (lowered, compiled):
    try:
      if callable(stage) and not hasattr(stage, "cost_analysis"):
        stage = stage()
      cost = stage.cost_analysis()
    except Exception:  # not implemented for this backend / version
      continue
    if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
      cost = cost[0] if cost else None
    flops = float((cost or {}).get("flops", 0.0) or 0.0)
    if flops > 0:
      return flops
  return 0.0


def run_staged(fn, args, clips, frames, rec, a):
  """`fwd_bwd --grad staged`: many small programs, compiled on the first call, so its time
  (less one steady call) is the compile time; FLOPs are the single program's (no recompute)."""
  import jax

  params, x = args
  model = fn.model
  rec["residual_budget_mib"] = a.residual_budget_mib
  loss = lambda p, x: fn.loss_fn(model.apply({"params": p}, x, compute_aux=False)[1], x, {})  # noqa: E731
  lowered = jax.jit(jax.value_and_grad(loss)).lower(params, x)
  flops = count_flops(lowered, lowered.compile)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, x))
  first = time.perf_counter() - t0
  rec["compile_peak_rss_gib"] = rss_kib("VmHWM") / 2**20
  rec["saved_stages"] = [fn.stages[k].name for k in fn.saved_stages(params, x)]

  def call(args):
    jax.block_until_ready(fn(*args))
    return args

  rec = time_calls(call, args, clips, frames, flops, rec, a, jax.devices()[0])
  rec["lower_s"], rec["compile_s"] = 0.0, max(first - rec["median_s"], 0.0)
  return rec


def time_calls(call, args, clips, frames, flops, rec, a, dev):
  """Warm-up, timed repeats (median) and the peak memory over them, into `rec`."""
  reset_peak_rss()
  rec["rss_before_gib"] = rss_kib("VmRSS") / 2**20  # params, programs and runtime, at rest
  for _ in range(a.warmup):
    args = call(args)
  times = []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    args = call(args)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  rec.update(median_s=med, times_s=times, clips_per_s=clips / med, frames_per_s=clips * frames / med,
             gflop=flops / 1e9, achieved_tflops=flops / med / 1e12)
  peak = a.peak_tflops or device_peak_tflops(dev.device_kind, a.dtype)
  if peak:
    rec["peak_tflops"] = peak
    rec["utilisation"] = rec["achieved_tflops"] / peak
  stats = {}
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # some backends raise instead of returning None
    pass
  if "peak_bytes_in_use" in stats:
    rec["peak_gib"], rec["memory"] = stats["peak_bytes_in_use"] / GIB, "device peak_bytes_in_use"
  else:
    rec["peak_gib"], rec["memory"] = rss_kib("VmHWM") / 2**20, "process peak RSS (VmHWM)"
  return rec


def fit(a) -> list:
  """The largest clip of `--fit_clips` whose batch-1 train step fits each budget (estimate)."""
  import jax

  from vidtok_jax.train.compile_options import compiler_options

  budgets = [float(v) for v in a.fit.split(",")]
  clips = [tuple(int(v) for v in c.split("x")) for c in a.fit_clips.split(",")]
  out = []
  for dtype in a.fit_dtypes.split(","):
    for remat in a.fit_remats.split(","):
      row = dict(dtype=dtype, remat=remat, needs_gib={})
      for t, s in clips:
        sub = argparse.Namespace(**{**vars(a), "dtype": dtype, "remat": remat,
                                    "shape": (1, t, s, s)})
        fn, args, _, _ = build_abstract(sub)
        compiled = jax.jit(fn, donate_argnums=(0,),
                           compiler_options=compiler_options()).lower(*args).compile()
        m = compiled.memory_analysis()
        need = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes) / GIB
        row["needs_gib"][f"{t}x{s}x{s}"] = round(need, 2)
        print(f"  {dtype:9s} remat={remat:6s} {t}x{s}x{s}: {need:7.2f} GiB", flush=True)
      for budget in budgets:
        fits = [c for c, g in row["needs_gib"].items() if g <= budget]
        row[f"largest_in_{budget:g}gib"] = fits[-1] if fits else None
      out.append(row)
  return out


def build_abstract(a):
  """The train step and abstract (shape-only) inputs, for memory analysis without running."""
  import jax
  import jax.numpy as jnp

  import vidtok_jax
  from vidtok_jax import train

  b, t, h, _ = a.shape
  cfg = train_config(a.config, {**a.overrides, "remat": a.remat}, a.dtype, b, t, h,
                     a.precision, a.lpips, resolve_stage(a.stage, h))
  lp = lpips_abstract_params(cfg.loss.lpips_net) if cfg.loss.perceptual_weight > 0 else None
  state = jax.eval_shape(
      lambda p, lp: train.create_train_state(cfg, jax.random.key(0), p, lpips_params=lp),
      vidtok_jax.abstract_params(cfg.model), lp)
  batch = {"video": jax.ShapeDtypeStruct((b, t, h, h, 3), jnp.float32)}
  return train.make_train_step(cfg), (state, batch), b, t


def topology_main(a):
  """`--topology`: ahead-of-time train-step plans (or `--fit` searches) for a device slice."""
  import jax

  from vidtok_jax.planning import aot
  from vidtok_jax.train.precision import resolve_dtype

  bad = [op for op in a.op_list if op not in ("train_step", "encode", "decode")]
  if bad and not a.fit:
    raise SystemExit(f"--topology compiles train_step, encode and decode, not {', '.join(bad)}")
  records = []
  for topo in a.topology.split(","):
    if topo == "cpu":
      devices, backend, chip = jax.devices(), "cpu", None
    else:
      devices, backend, chip = aot.topology_devices(topo), "tpu", aot.chip_of(topo)
    dtype = resolve_dtype(a.dtype, backend)
    sizes = aot.parse_mesh(a.mesh, len(devices))

    def make_cfg(batch, t=a.shape[1], s=a.shape[2], remat=a.remat):
      cfg = train_config(a.config, {**a.overrides, "remat": remat}, dtype, batch, t, s,
                         a.precision, a.lpips, resolve_stage(a.stage, s))
      return aot.apply_mesh(cfg, sizes)

    if a.fit:
      for clip in a.fit.split(","):
        t, s = (int(v) for v in clip.split("x"))
        for remat in a.fit_remats.split(","):
          print(f"-- fit {topo} {clip} {dtype} remat={remat}", flush=True)
          row = aot.fit_batch(lambda b: make_cfg(b, t, s, remat), devices, backend, chip, t, s,
                              space=sizes["space"])
          row.update(topology=topo, dtype=dtype, remat=remat, mesh=sizes,
                     stage=resolve_stage(a.stage, s))
          print("   " + json.dumps(row), flush=True)
          records.append(row)
      continue
    for op in [o for o in a.op_list if o in ("encode", "decode")]:
      model_cfg = model_config(a, dtype)
      print(f"== {a.config} {op} {'x'.join(map(str, a.shape))} {dtype} for {topo} "
            f"({len(devices)} devices, mesh {sizes})", flush=True)
      rec = aot.plan_inference(model_cfg, op, devices, backend, chip, (*a.shape, 3), sizes,
                               hlo_path=_hlo_path(a, topo, op))
      rec.update(config=a.config, topology=topo, overrides=a.overrides)
      print(plan_table(rec), flush=True)
      records.append(rec)
    if "train_step" not in a.op_list:
      continue
    stage = resolve_stage(a.stage, a.shape[2])
    print(f"== {a.config} stage {stage} train_step {'x'.join(map(str, a.shape))} {dtype} "
          f"remat={a.remat} for {topo} ({len(devices)} devices, mesh {sizes})", flush=True)
    rec = aot.plan_train_step(make_cfg(a.shape[0]), devices, backend, chip,
                              (*a.shape, 3), hlo_path=_hlo_path(a, topo, "train_step"))
    rec.update(config=a.config, topology=topo, overrides=a.overrides)
    print(plan_table(rec), flush=True)
    records.append(rec)
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(records, indent=1))
  return records


def _hlo_path(a, topo: str, op: str):
  """Where `--hlo_dir` keeps one plan's compiled program text (None: not kept)."""
  if not a.hlo_dir:
    return None
  d = pathlib.Path(a.hlo_dir)
  d.mkdir(parents=True, exist_ok=True)
  mesh = (a.mesh or "auto").replace("=", "").replace(",", "-")
  shape = "x".join(map(str, a.shape))
  return d / f"{topo.replace(':', '-')}_{op}_{shape}_{mesh}_{a.dtype}.hlo.txt.gz"


def plan_table(r) -> str:
  m = r.get("memory_gib", {})
  lines = [f"per chip ({r['device_kind']}, {r['clips_per_chip']:g} clip(s)/chip, "
           f"mesh {r['mesh']}, {r['dtype']}, precision {r['precision']}):",
           f"  HBM needed {r.get('hbm_needed_gib', float('nan')):.2f} GiB"
           + (f" of {r['hbm_gib']:g} GiB ({'fits' if r['fits'] else 'DOES NOT FIT'})"
              if "hbm_gib" in r else "")
           + f" = arguments {m.get('arguments', 0):.2f} + outputs {m.get('outputs', 0):.2f} + "
             f"temporaries {m.get('temporaries', 0):.2f} - aliased {m.get('aliased', 0):.2f}",
           f"  cost: {r['tflop']:.2f} TFLOP, {r['gb_accessed']:.1f} GB accessed"
           + (f"; roofline {1e3 * r['roofline_s']:.0f} ms ({r['roofline_bound']}-bound)"
              if "roofline_s" in r else ""),
           f"  lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s"]
  if "roofline_clips_per_s_per_chip" in r:
    lines.insert(-1, f"  roofline {r['roofline_clips_per_s_per_chip']:.1f} clips/s per chip")
  for op, c in sorted(r["collectives"].items()):
    lines.append(f"  {op:18s} x{c['count']:<4d} {c['bytes'] / 2**20:10.2f} MiB "
                 f"(largest {c['largest'] / 2**20:.2f} MiB)")
  if "traffic" in r:
    from vidtok_jax.planning import traffic

    lines.append(traffic.table(r["traffic"], rows=12))
  return "\n".join(lines)


def _parse_set(items):
  out = {}
  for item in items:
    key, _, value = item.partition("=")
    if not _:
      raise SystemExit(f"--set expects field=value, got {item!r}")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def table(records) -> str:
  lines = [f"{'op':10s} {'compile s':>9s} {'median s':>9s} {'clips/s':>8s} {'frames/s':>9s} "
           f"{'GFLOP':>8s} {'TFLOP/s':>8s} {'util':>6s} {'peak GiB':>9s}"]
  for r in records:
    if "error" in r:
      lines.append(f"{r['op']:10s} failed: {r['error']}")
      continue
    util = f"{100 * r['utilisation']:5.1f}%" if "utilisation" in r else "     -"
    lines.append(f"{r['op']:10s} {r['compile_s']:9.1f} {r['median_s']:9.3f} "
                 f"{r['clips_per_s']:8.3f} {r['frames_per_s']:9.2f} {r['gflop']:8.0f} "
                 f"{r['achieved_tflops']:8.3f} {util} {r['peak_gib']:9.2f}")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m vidtok_jax.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="vidtok_kl_causal_488_4chn", help="released variant name")
  p.add_argument("--shape", default="1,17,64,64", help="B,T,H,W of the input video")
  p.add_argument("--ops", default="encode,decode,forward,fwd_bwd", help=f"from {', '.join(OPS)}")
  p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype (params stay float32); auto: bf16 on GPU/TPU, float32 on "
                      "CPU (the training default)")
  p.add_argument("--precision", default="auto",
                 choices=("auto", "default", "high", "highest", "tf32"),
                 help="conv/matmul precision; auto: backend default with bf16, highest with "
                      "float32; tf32: float32 with TF32 tensor cores (A100/H100)")
  p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True,
                 help="train_step: include the LPIPS term (random VGG weights of the right shapes)")
  p.add_argument("--topology", default=None,
                 help="train_step ahead of time for a TPU slice, e.g. v5p:4x4x4 (needs libtpu), "
                      "or 'cpu' (this host's devices): per-chip memory, cost, collectives")
  p.add_argument("--mesh", default=None,
                 help="--topology: mesh axes, e.g. data=16,space=4 or data=4,fsdp=2,space=2 "
                      "(default: data over every device)")
  p.add_argument("--remat", default="none", choices=("none", "convs", "blocks"))
  p.add_argument("--stage", default="auto", choices=("auto", "1", "2"),
                 help="train_step: the training stage (2: frozen encoder, decoder-only); auto: "
                      "the official recipe's, stage 2 at 256^2 and above, stage 1 below")
  p.add_argument("--grad", default="auto", choices=("auto", "program", "staged"),
                 help="fwd_bwd as one jitted program, or one program per stage "
                      "(vidtok_jax.staged_grad: faster and bounded memory on XLA:CPU); auto: "
                      "staged on CPU, one program elsewhere")
  p.add_argument("--residual_budget_mib", type=float, default=320.0,
                 help="--grad staged: saved residuals that replace recomputation "
                      "(StagedGrad's default)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="model config override, e.g. ch=64 (repeatable; or --config.model.ch=64)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak, if unknown")
  p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                 help="each op in a fresh subprocess (per-op memory peaks)")
  p.add_argument("--json", default=None, help="write the records here")
  p.add_argument("--hlo_dir", default=None,
                 help="--topology: also write each compiled program's text here (gzip), to "
                      "re-read its traffic with `python -m vidtok_jax.planning.traffic report`")
  p.add_argument("--fit", default=None,
                 help="memory budgets in GiB, e.g. 16,80; with --topology: clips, e.g. "
                      "17x128,17x256 (per-chip batch search)")
  p.add_argument("--fit_clips", default="17x64,17x128,17x256,33x256,17x512,33x512,65x512")
  p.add_argument("--fit_dtypes", default="float32,bfloat16")
  p.add_argument("--fit_remats", default="none,convs,blocks")
  p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  from vidtok_jax.cli import model_overrides_as_set

  a = p.parse_args(model_overrides_as_set(sys.argv[1:] if argv is None else argv))
  try:
    a.shape = tuple(int(v) for v in a.shape.split(","))
    assert len(a.shape) == 4 and min(a.shape) > 0
  except (ValueError, AssertionError):
    p.error(f"--shape must be four positive integers B,T,H,W, got {a.shape!r}")
  a.overrides = _parse_set(a.set)
  ops = [o for o in a.ops.split(",") if o]
  bad = [o for o in ops if o not in OPS]
  if bad:
    p.error(f"unknown op(s) {bad}; ops: {', '.join(OPS)}")
  a.op_list = ops
  return a


def main(argv=None):
  a = parse_args(argv)
  import vidtok_jax  # config errors surface before any compile

  vidtok_jax.load_config(a.config, **a.overrides)
  if a.topology:
    return topology_main(a)
  from vidtok_jax.train.precision import resolve_dtype

  a.dtype = resolve_dtype(a.dtype)
  if a._one:
    print("RECORD " + json.dumps(run_op(a._one, a)), flush=True)
    return
  if a.fit:
    rows = fit(a)
    print(json.dumps(rows, indent=1))
    if a.json:
      pathlib.Path(a.json).write_text(json.dumps(rows, indent=1))
    return
  print(f"== {a.config} {'x'.join(map(str, a.shape))} {a.dtype} remat={a.remat} "
        f"{a.overrides or ''}", flush=True)
  records = []
  for op in a.op_list:
    print(f"-- {op} ...", flush=True)
    if a.isolate:
      argv_one = [sys.executable, "-m", "vidtok_jax.bench", f"--_one={op}",
                  f"--config={a.config}", "--shape=" + ",".join(map(str, a.shape)),
                  f"--dtype={a.dtype}", f"--precision={a.precision}",
                  f"--{'' if a.lpips else 'no-'}lpips", f"--remat={a.remat}",
                  f"--stage={a.stage}", f"--warmup={a.warmup}",
                  f"--repeats={a.repeats}", f"--grad={a.grad}",
                  f"--residual_budget_mib={a.residual_budget_mib}"] + [f"--set={s}" for s in a.set]
      if a.peak_tflops:
        argv_one.append(f"--peak_tflops={a.peak_tflops}")
      proc = subprocess.run(argv_one, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RECORD ")]
      if lines:
        rec = json.loads(lines[-1][len("RECORD "):])
      else:  # killed (out of memory) or crashed: a result, not a crash of the benchmark
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        rec = dict(op=op, error=f"exit {proc.returncode}: {tail}")
    else:
      rec = run_op(op, a)
    records.append(rec)
    print(table([rec]).splitlines()[-1], flush=True)
  print(table(records))
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
  main()
