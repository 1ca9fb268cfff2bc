r"""Device timing: time, memory and FLOP/s of encode / decode / forward / fwd_bwd / train_step.

  python benchmarks/bench.py --config vidtok_kl_causal_488_4chn --shape 1,17,64,64
  python benchmarks/bench.py --config vidtok_fsq_causal_488_262144 --ops forward,fwd_bwd \
      --dtype bfloat16 --remat blocks --set ch=64 --json out.json

Every op is one jitted program, compiled ahead of time (trace+lower and compile timed apart),
run `--warmup` times, then `--repeats` timed calls each ended by `jax.block_until_ready`; the
median is reported, with clips/s and frames/s. `fwd_bwd` is the forward plus the gradient of the
L1 reconstruction loss w.r.t. the params, on CPU by default with the staged gradient
(`--grad auto`: `benchmarks/staged_grad.py`, one small program per stage, faster and far leaner
on XLA:CPU; its compile time is the first call less a steady one; `--grad program` for one
program); `train_step` is the full GAN train step (autoencoder and discriminator updates,
`vidtok_jax.train.make_train_step`, LPIPS with random VGG weights of the right shapes: speed
does not depend on the values). The configs are the planner's (`vidtok_jax.planning.configs`).

Memory: on GPU/TPU the device's `peak_bytes_in_use`; on CPU the process's peak RSS (VmHWM) over
the timed calls, counted from a reset after compiling (so compilation's own memory, reported as
`compile_peak_rss_gib`, is excluded; params, the compiled program and the runtime are included,
like a PyTorch process's peak RAM). Each op runs in a fresh subprocess (`--no-isolate` to turn
off), so peaks are per op. FLOPs come from XLA's cost analysis of the lowered (device-independent)
program, so convolutions count on every backend; utilisation is against the device's dense peak
for the compute dtype where the device is known (`--peak_tflops` otherwise).

`--dtype auto` is the training default: bf16 compute on GPU/TPU, float32 on CPU; `--precision`
(auto: backend default with bf16, "highest" with float32; tf32, default, high, highest).

Plans without running (a TPU slice from this machine, the largest clip per memory budget) are
the planner's: `python -m vidtok_jax.planning --topology ... / --fit ...`.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
for _path in (str(HERE.parent), str(HERE)):  # the package of this checkout; bench_utils beside
  if _path not in sys.path:
    sys.path.insert(0, _path)

from bench_utils import (  # noqa: E402
  device_peak_tflops,
  random_lpips_params,
  reset_peak_rss,
  rss_kib,
)

GIB = 2**30
OPS = ("encode", "decode", "forward", "fwd_bwd", "train_step")


def build(op: str, a):
  """`(fn, args, batch_clips, frames)`: the jittable function of `op` and its inputs."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import vidtok_jax
  from bench_utils import random_params
  from vidtok_jax.planning.configs import model_config, resolve_stage, train_config

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
      from staged_grad import StagedGrad

      from vidtok_jax.train.compile_options import compiler_options

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
  from vidtok_jax.planning.configs import add_model_flags

  p = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p)
  p.add_argument("--shape", default="1,17,64,64", help="B,T,H,W of the input video")
  p.add_argument("--ops", default="encode,decode,forward,fwd_bwd", help=f"from {', '.join(OPS)}")
  p.add_argument("--remat", default="none", choices=("none", "convs", "blocks"))
  p.add_argument("--stage", default="auto", choices=("auto", "1", "2"),
                 help="train_step: the training stage (2: frozen encoder, decoder-only); auto: "
                      "the official recipe's, stage 2 at 256^2 and above, stage 1 below")
  p.add_argument("--grad", default="auto", choices=("auto", "program", "staged"),
                 help="fwd_bwd as one jitted program, or one program per stage "
                      "(benchmarks/staged_grad.py: faster and bounded memory on XLA:CPU); auto: "
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
  p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  from vidtok_jax.cli import model_overrides_as_set
  from vidtok_jax.planning.configs import parse_set

  argv = sys.argv[1:] if argv is None else list(argv)
  planned = [f for f in ("--topology", "--fit", "--mesh", "--hlo_dir")
             if any(v == f or v.startswith(f + "=") or v.startswith(f + "_") for v in argv)]
  if planned:  # these compile without running: the planner's
    raise SystemExit(f"error: {planned[0]} plans without running: "
                     "python -m vidtok_jax.planning " + " ".join(argv))
  a = p.parse_args(model_overrides_as_set(argv))
  try:
    a.shape = tuple(int(v) for v in a.shape.split(","))
    assert len(a.shape) == 4 and min(a.shape) > 0
  except (ValueError, AssertionError):
    p.error(f"--shape must be four positive integers B,T,H,W, got {a.shape!r}")
  a.overrides = parse_set(a.set)
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
  from vidtok_jax.train.precision import resolve_dtype

  a.dtype = resolve_dtype(a.dtype)
  if a._one:
    print("RECORD " + json.dumps(run_op(a._one, a)), flush=True)
    return
  print(f"== {a.config} {'x'.join(map(str, a.shape))} {a.dtype} remat={a.remat} "
        f"{a.overrides or ''}", flush=True)
  records = []
  for op in a.op_list:
    print(f"-- {op} ...", flush=True)
    if a.isolate:
      argv_one = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--_one={op}",
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
  return records


if __name__ == "__main__":
  main()
