"""The GPU check: train-step speed, a full-width learning run, codec speed, micro A/Bs, profile.

    python benchmarks/gpu_check.py --out OUT [--phases step1,micro,learn,codec,stage2,before]
        [--data .gpu/clips.npz] [--lpips .gpu/lpips_vgg_f16.npz] [--deadline 500] [--tiny]

Written for a GPU machine lent for minutes, without TensorFlow or PyAV: clips come pre-decoded
(`benchmarks/gpu_data.py`), LPIPS weights as an npz of float16 arrays (random weights of the
right shapes if absent). Every phase writes into `OUT/gpu_check.json` as soon as it ends, so a
killed run keeps what it measured; phases that would not finish before `--deadline` (seconds
from start) are skipped and recorded as such. Phases:

* `step1`: the stage-1 bf16 GAN train step (`--config`, `--batch1` x 17 x 128^2, LPIPS on),
  compiled ahead of time (compile s apart), `--warmup` + `--repeats` timed steps on real clips
  (median ms), device peak memory, a `jax.profiler` trace of 3 steps summarised into the top GPU
  kernels and kernel classes (`OUT/profile_step1.txt`), the optimised HLO (`OUT/step1.hlo.gz`).
* `learn`: continues training the same state on the clips for `--learn_s` seconds: validation
  PSNR (bf16 model, frames in [0, 1], mean over the real frames of the val windows) at the
  start, middle and end; loss curve every 10 steps.
* `micro`: block-level A/Bs at the real shapes, fwd+bwd (see MICRO below).
* `codec`: encode and decode at `--codec_batch` x 17 x 256^2, bf16, released width.
* `stage2`: the stage-2 step (17 x 256^2, frozen encoder, `--batch2`).
* `before`: `--before_tree`'s own benchmark train step at the stage-1 point (the code before
  this change: its `benchmarks/bench.py`, or `-m vidtok_jax.bench` in older trees), in a
  subprocess.

FLOPs: XLA's cost analysis of the same program lowered for the CPU backend
(`jit(f).lower(...).cost_analysis()["flops"]`, in a `JAX_PLATFORMS=cpu` subprocess), since on
GPU the compiled program's analysis leaves out the cuDNN convolutions; utilisation = FLOPs /
step time / the device's dense bf16 peak (`bench_utils.PEAKS`).
"""

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "benchmarks")):  # the package; bench_utils beside this file
  if _path not in sys.path:
    sys.path.insert(0, _path)

T0 = time.perf_counter()
GIB = 2**30


def log(msg):
  print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class Results:
  def __init__(self, path):
    self.path, self.data = pathlib.Path(path), {}

  def set(self, key, value):
    self.data[key] = value
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.data, indent=1, default=str))
    tmp.replace(self.path)


# ------------------------------------------------------------------ helpers (jax imported lazily)


def device_info():
  import jax

  dev = jax.devices()[0]
  info = dict(platform=dev.platform, device_kind=dev.device_kind, jax=jax.__version__,
              n_devices=jax.device_count())
  try:
    import flax

    info["flax"] = flax.__version__
  except ImportError:
    pass
  return info


def peak_gib():
  import jax

  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # CPU has none
    stats = {}
  return stats.get("peak_bytes_in_use", 0) / GIB or None


def timed(fn, args, warmup, repeats, chain=None):
  """Median/min/max seconds of `fn(*args)` (blocked); `chain(out, args)` gives the next args."""
  import jax

  for _ in range(warmup):
    out = fn(*args)
    jax.block_until_ready(out)
    args = chain(out, args) if chain else args
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
    args = chain(out, args) if chain else args
  return dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
              max_ms=1e3 * max(times), n=len(times)), args


def cpu_flops(spec: dict):
  """Starts a `JAX_PLATFORMS=cpu` subprocess that prints the lowered program's FLOPs."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  return subprocess.Popen([sys.executable, __file__, "--_flops", json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def collect_flops(proc, timeout=300):
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    return None
  m = re.search(r"^FLOPS (\S+)$", out or "", re.M)
  if not m:
    log(f"flop count failed: {(out or '')[-800:]}")
    return None
  return float(m.group(1))


def train_cfg(a, stage, batch, size):
  from vidtok_jax.planning.configs import train_config

  variant = a.config + (",tiny" if a.tiny else "")
  cfg = train_config(variant_name(a), {}, "bfloat16", batch, a.frames, size)
  if a.tiny:  # CPU dry run: the tiny topology at the requested shapes
    import importlib.util

    spec = importlib.util.spec_from_file_location("c", REPO / "configs" / "vidtok.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg.model = mod.get_config(variant).model
  cfg.unlock()
  if stage == 2:
    cfg.train.fix_encoder = True
  cfg.train.dtype = "bfloat16"
  cfg.train.lr = cfg.train.disc_lr = a.lr
  return cfg


def abstract_step(cfg, batch, frames, size):
  """The train step and shape-only (state, batch): lowering needs no values."""
  import jax
  import jax.numpy as jnp

  import vidtok_jax
  from vidtok_jax import train
  from vidtok_jax.planning.configs import lpips_abstract_params

  lp = lpips_abstract_params(cfg.loss.lpips_net) if cfg.loss.perceptual_weight > 0 else None
  state = jax.eval_shape(
      lambda p, lp: train.create_train_state(cfg, jax.random.key(0), p, lpips_params=lp),
      vidtok_jax.abstract_params(train.model_config(cfg)), lp)
  video = {"video": jax.ShapeDtypeStruct((batch, frames, size, size, 3), jnp.float32)}
  return train.make_train_step(cfg), (state, video)


def flops_main(spec):
  """`--_flops`: lower the program of `spec` on this (CPU) backend and print its FLOPs."""
  import jax
  import jax.numpy as jnp

  import vidtok_jax

  a = argparse.Namespace(**spec["args"])
  if spec["kind"] == "step":
    cfg = train_cfg(a, spec["stage"], spec["batch"], spec["size"])
    fn, args = abstract_step(cfg, spec["batch"], a.frames, spec["size"])
  else:
    cfg = codec_model_cfg(a)
    model = vidtok_jax.VidTok(cfg)
    params = vidtok_jax.abstract_params(cfg)
    x = jax.ShapeDtypeStruct((spec["batch"], a.frames, spec["size"], spec["size"], 3), jnp.float32)
    enc = lambda p, x: model.apply({"params": p}, x, method=model.encode)[0]  # noqa: E731
    if spec["kind"] == "encode":
      fn, args = enc, (params, x)
    else:
      z = jax.eval_shape(enc, params, x)
      fn, args = (lambda p, z: model.apply({"params": p}, z, method=model.decode)), (params, z)
  cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  print(f"FLOPS {float(cost['flops'])}", flush=True)


def variant_name(a):
  return "vidtok_" + a.config.removeprefix("vidtok_")


def codec_model_cfg(a):
  import vidtok_jax

  kw = dict(dtype="bfloat16")
  if a.tiny:
    kw.update(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
  return vidtok_jax.load_config(variant_name(a), **kw)


# ------------------------------------------------------------------ profile summary


KERNEL_CLASSES = [
    ("conv (cuDNN/cutlass conv)", r"conv|fprop|dgrad|wgrad|xmma|implicit|cudnn|sm\d+_.*(f|d|w)grad"),
    ("gemm", r"gemm|nvjet|cutlass|triton_gemm|matmul|cublas"),
    ("reduction fusion", r"reduce|reduction"),
    ("transpose/copy", r"transpose|copy|memcpy|concatenate|pad"),
    ("elementwise fusion", r"fusion|loop_|wrapped_|triton"),
    ("rng", r"rng|threefry|random"),
    ("memset", r"memset"),
]


def summarise_profile(logdir, steps, out_txt):
  """Top kernels and kernel classes of the GPU planes of the trace under `logdir`."""
  import jax

  pbs = sorted(pathlib.Path(logdir).rglob("*.xplane.pb"))
  if not pbs:
    return {"error": "no xplane.pb written"}
  data = jax.profiler.ProfileData.from_file(str(pbs[-1]))
  by_name, by_op, lines = collections.Counter(), collections.Counter(), collections.Counter()
  count = collections.Counter()
  span = [None, None]
  for plane in data.planes:
    if "GPU" not in plane.name and "gpu" not in plane.name.lower():
      continue
    for line in plane.lines:
      if not re.search(r"stream", line.name, re.I):
        continue  # derived lines (XLA Modules / Ops / Steps) would double count
      for ev in line.events:
        d = ev.duration_ns
        by_name[ev.name] += d
        count[ev.name] += 1
        lines[line.name] += d
        try:
          stats = dict(ev.stats)
        except Exception:  # noqa: BLE001 - stats are best effort
          stats = {}
        op = stats.get("hlo_op") or stats.get("tf_op") or ""
        if op:
          by_op[str(op)] += d
        s, e = ev.start_ns, ev.start_ns + d
        span[0] = s if span[0] is None else min(span[0], s)
        span[1] = e if span[1] is None else max(span[1], e)
  total = sum(by_name.values())
  if not total:
    return {"error": "no GPU kernel events", "planes": [p.name for p in data.planes]}
  classes = collections.Counter()
  for name, d in by_name.items():
    for cls, pat in KERNEL_CLASSES:
      if re.search(pat, name, re.I):
        classes[cls] += d
        break
    else:
      classes["other"] += d
  res = dict(kernel_ms_per_step=total / 1e6 / steps,
             span_ms_per_step=(span[1] - span[0]) / 1e6 / steps,
             classes_ms_per_step={k: v / 1e6 / steps for k, v in classes.most_common()},
             top_kernels=[(n[:160], d / 1e6 / steps, count[n] // steps)
                          for n, d in by_name.most_common(40)],
             top_hlo_ops=[(n[:120], d / 1e6 / steps) for n, d in by_op.most_common(60)],
             streams={k: v / 1e6 / steps for k, v in lines.items()})
  with open(out_txt, "w") as f:
    f.write(f"GPU kernel time per step {res['kernel_ms_per_step']:.1f} ms, span "
            f"{res['span_ms_per_step']:.1f} ms\n\nclasses (ms/step):\n")
    for k, v in res["classes_ms_per_step"].items():
      f.write(f"  {v:9.2f}  {k}\n")
    f.write("\ntop kernels (ms/step, calls/step):\n")
    for n, d, c in res["top_kernels"]:
      f.write(f"  {d:9.2f} {c:5d}  {n}\n")
    f.write("\ntop HLO ops (ms/step):\n")
    for n, d in res["top_hlo_ops"]:
      f.write(f"  {d:9.2f}  {n}\n")
  return res


# ------------------------------------------------------------------ data


class Clips:
  """Training windows (17 consecutive stored frames of one video) and the val windows."""

  def __init__(self, path, frames, size, seed=0):
    import numpy as np

    self.rng = np.random.default_rng(seed)
    self.frames = frames
    if path and os.path.exists(path):
      z = np.load(path)
      self.videos = [z[k] for k in sorted(z.files) if k.startswith("train_")]
      self.val = z["val"]
      if self.videos[0].shape[1] != size:  # --tiny: crop the stored frames
        self.videos = [v[:, :size, :size] for v in self.videos]
        self.val = self.val[:, :, :size, :size]
      self.val = self.val[:, :frames]
    else:  # random frames (timing does not depend on values)
      self.videos = [self.rng.integers(0, 256, (frames + 8, size, size, 3), np.uint8)]
      self.val = self.rng.integers(0, 256, (4, frames, size, size, 3), np.uint8)
    starts = [len(v) - frames + 1 for v in self.videos]
    self.p = np.asarray(starts, np.float64) / sum(starts)

  def batch(self, b):
    import numpy as np

    out = []
    for v in self.rng.choice(len(self.videos), size=b, p=self.p):
      s = self.rng.integers(0, len(self.videos[v]) - self.frames + 1)
      out.append(self.videos[v][s:s + self.frames])
    return (np.stack(out).astype(np.float32) / 127.5 - 1.0)


def lpips_params_from(path, net):
  import jax
  import numpy as np

  from bench_utils import random_lpips_params
  from vidtok_jax.planning.configs import lpips_abstract_params

  if not path or not os.path.exists(path):
    log("LPIPS: random params of the right shapes (no weight file given)")
    return random_lpips_params(net), "random"
  z = np.load(path)
  abstract = lpips_abstract_params(net)
  flat = {k: z[k].astype(np.float32) for k in z.files}
  return jax.tree_util.tree_map_with_path(
      lambda p, leaf: flat[jax.tree_util.keystr(p)].reshape(leaf.shape), abstract), "real(fp16)"


# ------------------------------------------------------------------ phases


def phase_step1(a, res, st):
  import jax
  import jax.numpy as jnp

  import vidtok_jax
  from vidtok_jax import train
  from vidtok_jax.models.autoencoder import _dummy_input

  cfg = train_cfg(a, 1, a.batch1, a.size1)
  st["cfg"] = cfg
  flops_proc = cpu_flops(dict(kind="step", stage=1, batch=a.batch1, size=a.size1, args=vars(a)))
  # Compile from shapes in a thread (XLA releases the GIL) while the state is built.
  step_fn, abstract = abstract_step(cfg, a.batch1, a.frames, a.size1)
  box = {}

  def compile_step():
    try:
      t = time.perf_counter()
      lowered = jax.jit(step_fn, donate_argnums=0).lower(*abstract)
      box["lower_s"] = time.perf_counter() - t
      t = time.perf_counter()
      box["compiled"] = lowered.compile()
      box["compile_s"] = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - re-raised below
      box["error"] = e

  th = threading.Thread(target=compile_step)
  th.start()
  t = time.perf_counter()
  lp, lp_kind = lpips_params_from(a.lpips, cfg.loss.lpips_net)
  with jax.default_device(jax.devices("cpu")[0]):  # init off the GPU: nothing to compile there
    model = vidtok_jax.VidTok(train.model_config(cfg))
    # Run once on a 1-frame 8x8 input: skip XLA's optimisations (they double the compile time).
    init = jax.jit(lambda r: model.init(r, _dummy_input(model.config), compute_aux=False),
                   compiler_options={"xla_backend_optimization_level": 0,
                                     "xla_llvm_disable_expensive_passes": True})
    params = init(jax.random.key(a.seed))["params"]
    state = train.create_train_state(cfg, jax.random.key(a.seed), params, lpips_params=lp)
  state = jax.device_put(state, jax.devices()[0])
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - t
  clips = Clips(a.data, a.frames, a.size1, a.seed)
  st["clips"] = clips
  st["val_fn"] = make_val_fn(cfg)
  th.join()
  if "error" in box:
    raise box["error"]
  compiled, compile_s, lower_s = box["compiled"], box["compile_s"], box["lower_s"]
  sig = lambda tree: jax.tree.map(  # noqa: E731
      lambda v: (v.shape, str(v.dtype), bool(getattr(v, "weak_type", False))),
      jax.eval_shape(lambda t: t, tree))
  if sig(abstract[0]) != sig(state):  # the shapes-only program would not take this state
    log("state signature differs from the abstract one: compiling again from the state")
    t = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=0).lower(state, abstract[1]).compile()
    compile_s += time.perf_counter() - t
  log(f"step1 compiled in {compile_s:.1f} s (lower {lower_s:.1f} s; state built in {setup_s:.1f} s"
      " meanwhile)")
  try:
    with gzip.open(os.path.join(a.out, "step1.hlo.gz"), "wt") as f:
      f.write(compiled.as_text())
  except Exception as e:  # noqa: BLE001
    log(f"no HLO text: {e}")
  mem = compiled.memory_analysis()
  rec = dict(config=a.config, batch=a.batch1, frames=a.frames, size=a.size1, dtype="bfloat16",
             lpips=lp_kind, compile_s=compile_s, lower_s=lower_s, setup_s=setup_s)
  if mem is not None:
    rec.update(xla_temp_gib=mem.temp_size_in_bytes / GIB, xla_args_gib=mem.argument_size_in_bytes
               / GIB)
  st["step"], st["state"] = compiled, state
  st["val"] = [(0, *run_val(st, a))]
  log(f"val PSNR at step 0: {st['val'][0][1]:.2f} dB")
  batches = [{"video": jnp.asarray(clips.batch(a.batch1))} for _ in range(2)]
  st["losses"] = []

  def call(state, i):
    state, m = compiled(state, batches[i % 2])
    return state, m

  def chain(out, args):
    return (out[0], args[1] + 1)

  timing, (state, n) = timed(call, (state, 0), a.warmup, a.repeats, chain)
  st["state"], st["steps"] = state, a.warmup + a.repeats
  rec.update(timing)
  rec["peak_gib"] = peak_gib()
  rec["clips_per_s"] = a.batch1 / (timing["median_ms"] / 1e3)
  rec["flops"] = collect_flops(flops_proc)
  add_util(rec, a)
  st["step1_rec"] = rec
  res.set("step1", rec)
  log(f"step1: {timing['median_ms']:.1f} ms/step, {rec['clips_per_s']:.2f} clips/s, "
      f"peak {rec['peak_gib']} GiB, util {rec.get('utilisation')}")


def phase_profile(a, res, st):
  """A `jax.profiler` trace of 3 stage-1 steps, summarised (last: a profiler hang loses least)."""
  import jax

  compiled, state = st["step"], st["state"]
  batch = {"video": jax.numpy.asarray(st["clips"].batch(a.batch1))}
  logdir = tempfile.mkdtemp(prefix="prof_")
  jax.profiler.start_trace(logdir)
  for _ in range(3):
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  jax.profiler.stop_trace()
  st["state"] = state
  prof = summarise_profile(logdir, 3, os.path.join(a.out, "profile_step1.txt"))
  res.set("profile_step1", prof)
  log(f"profile: {json.dumps(prof)[:1500]}")


def add_util(rec, a):
  import jax

  from bench_utils import device_peak_tflops

  if rec.get("flops"):
    rec["tflops_per_s"] = rec["flops"] / (rec["median_ms"] / 1e3) / 1e12
    peak = device_peak_tflops(jax.devices()[0].device_kind, "bfloat16")
    if peak:
      rec["peak_tflops"] = peak
      rec["utilisation"] = rec["tflops_per_s"] / peak


def make_val_fn(cfg):
  import jax
  import jax.numpy as jnp

  import vidtok_jax
  from vidtok_jax import train

  model = vidtok_jax.VidTok(train.model_config(cfg))

  def val(params, video):  # video uint8 (B, T, H, W, 3)
    x = video.astype(jnp.float32) / 127.5 - 1.0
    _, recon, _ = model.apply({"params": params}, x, False, 0, False)
    r01 = jnp.clip((recon.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    mse = jnp.mean(jnp.square((x + 1.0) / 2.0 - r01), axis=(2, 3, 4))
    return jnp.sum(-10.0 * jnp.log10(mse + 1e-8), axis=1)  # per clip: sum of frame PSNRs

  return jax.jit(val)


def run_val(st, a):
  """(mean PSNR over the val windows' frames, seconds)."""
  import jax.numpy as jnp
  import numpy as np

  t = time.perf_counter()
  val, b = st["clips"].val, a.batch1
  total, n = 0.0, 0
  params = st["state"].g_params["model"]
  for lo in range(0, len(val), b):
    chunk = val[lo:lo + b]
    real = len(chunk)
    if real < b:  # pad to the compiled batch; padded rows are not scored
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - real, 0)])
    rows = np.asarray(st["val_fn"](params, jnp.asarray(chunk)))
    total += float(rows[:real].sum())
    n += real * chunk.shape[1]
  return total / n, time.perf_counter() - t


def phase_learn(a, res, st):
  import jax
  import jax.numpy as jnp

  compiled, state, clips = st["step"], st["state"], st["clips"]
  t0 = time.perf_counter()
  mid_done = False
  nxt = {"video": jnp.asarray(clips.batch(a.batch1))}
  pending = []
  steps = st["steps"]
  while time.perf_counter() - t0 < a.learn_s:
    state, m = compiled(state, nxt)
    steps += 1
    nxt = {"video": jnp.asarray(clips.batch(a.batch1))}  # prepared while the step runs
    if steps % 10 == 0:
      pending.append((steps, m))
    if len(pending) > 2:
      s, m0 = pending.pop(0)
      m0 = jax.device_get(m0)
      st["losses"].append(dict(step=s, nll=float(m0.get("nll_loss", float("nan"))),
                               rec=float(m0.get("rec_loss", float("nan"))),
                               p=float(m0.get("p_loss", float("nan"))),
                               skipped=float(m0.get("nonfinite", 0.0))))
      if s % 100 == 0:
        log(f"learn step {s}: {st['losses'][-1]}")
    if not mid_done and time.perf_counter() - t0 > a.learn_s / 2:
      st["state"] = state
      v, vs = run_val(st, a)
      st["val"].append((steps, v, vs))
      log(f"val PSNR at step {steps}: {v:.2f} dB")
      mid_done = True
  jax.block_until_ready(state)
  learn_s = time.perf_counter() - t0
  st["state"], st["steps"] = state, steps
  v, vs = run_val(st, a)
  st["val"].append((steps, v, vs))
  log(f"val PSNR at step {steps}: {v:.2f} dB")
  res.set("learn", dict(config=a.config, batch=a.batch1, lr=a.lr, seconds=learn_s,
                        steps_total=steps, val=[dict(step=s, psnr_db=v, seconds=t)
                                                for s, v, t in st["val"]],
                        losses=st["losses"], val_windows=int(len(clips.val))))


def phase_codec(a, res, st):
  import jax
  import jax.numpy as jnp
  import numpy as np

  import vidtok_jax
  from bench_utils import random_params

  cfg = codec_model_cfg(a)
  model = vidtok_jax.VidTok(cfg)
  b, s = a.codec_batch, a.size2
  procs = {k: cpu_flops(dict(kind=k, batch=b, size=s, args=vars(a))) for k in ("encode", "decode")}
  params = jax.device_put(random_params(vidtok_jax.abstract_params(cfg), seed=0))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (b, a.frames, s, s, 3)), jnp.float32)
  enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)[0])
  dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
  out = {}
  for name, fn, arg in (("encode", enc, x), ("decode", dec, None)):
    if arg is None:
      arg = enc(params, x)
    t = time.perf_counter()
    c = fn.lower(params, arg).compile()
    rec = dict(batch=b, frames=a.frames, size=s, dtype="bfloat16", compile_s=time.perf_counter() - t)
    timing, _ = timed(c, (params, arg), 2, a.repeats)
    rec.update(timing)
    rec["clips_per_s"] = b / (timing["median_ms"] / 1e3)
    rec["flops"] = collect_flops(procs[name])
    add_util(rec, a)
    out[name] = rec
    log(f"{name} {b}x{a.frames}x{s}^2: {timing['median_ms']:.1f} ms, {rec['clips_per_s']:.1f} "
        f"clips/s, util {rec.get('utilisation')}")
  out["encode_plus_decode_clips_per_s"] = b / ((out["encode"]["median_ms"]
                                                + out["decode"]["median_ms"]) / 1e3)
  res.set("codec", out)


def phase_stage2(a, res, st):
  import jax
  import jax.numpy as jnp

  import vidtok_jax
  from vidtok_jax import train
  from bench_utils import random_params

  st.pop("state", None)  # free stage 1
  st.pop("step", None)
  cfg = train_cfg(a, 2, a.batch2, a.size2)
  flops_proc = cpu_flops(dict(kind="step", stage=2, batch=a.batch2, size=a.size2, args=vars(a)))
  lp, lp_kind = lpips_params_from(a.lpips, cfg.loss.lpips_net)
  params = random_params(vidtok_jax.abstract_params(train.model_config(cfg)), seed=0)
  state = jax.device_put(train.create_train_state(cfg, jax.random.key(0), params,
                                                  lpips_params=lp))
  clips = Clips(None, a.frames, a.size2)
  batches = [{"video": jnp.asarray(clips.batch(a.batch2))} for _ in range(2)]
  t = time.perf_counter()
  compiled = jax.jit(train.make_train_step(cfg), donate_argnums=0).lower(state,
                                                                         batches[0]).compile()
  rec = dict(config=a.config + ",stage=2", batch=a.batch2, frames=a.frames, size=a.size2,
             dtype="bfloat16", compile_s=time.perf_counter() - t)

  def chain(out, args):
    return (out[0], args[1] + 1)

  timing, _ = timed(lambda s, i: compiled(s, batches[i % 2]), (state, 0), a.warmup, a.repeats,
                    chain)
  rec.update(timing)
  rec["peak_gib"] = peak_gib()
  rec["clips_per_s"] = a.batch2 / (timing["median_ms"] / 1e3)
  rec["flops"] = collect_flops(flops_proc)
  add_util(rec, a)
  res.set("stage2", rec)
  log(f"stage2: {timing['median_ms']:.1f} ms/step, util {rec.get('utilisation')}")


def phase_before(a, res, st):
  """The code before this change (`--before_tree`): its own bench at the stage-1 point."""
  if not a.before_tree or not os.path.isdir(a.before_tree):
    res.set("before", {"skipped": "no --before_tree"})
    return
  st.pop("state", None)
  st.pop("step", None)
  out = os.path.join(a.out, "before.json")
  script = os.path.abspath(os.path.join(a.before_tree, "benchmarks", "bench.py"))
  bench = [script] if os.path.exists(script) else ["-m", "vidtok_jax.bench"]  # pre-move tree
  cmd = [sys.executable, *bench, "--config", "vidtok_" + a.config.removeprefix(
      "vidtok_"), "--ops", "train_step", "--dtype", "bfloat16", "--shape",
         f"{a.batch1},{a.frames},{a.size1},{a.size1}", "--warmup", str(a.warmup), "--repeats",
         str(a.repeats), "--no-isolate", "--json", out]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.abspath(a.before_tree), os.environ.get("PYTHONPATH", "")]))
  p = subprocess.run(cmd, cwd=a.before_tree, env=env, capture_output=True, text=True)
  log(f"before: rc {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
  try:
    res.set("before", json.load(open(out)))
  except Exception as e:  # noqa: BLE001
    res.set("before", {"error": str(e), "stderr": p.stderr[-3000:]})


# ------------------------------------------------------------------ micro A/Bs


def micro_cases(a):
  """(name, fn_a, fn_b, args): fwd+bwd of old (a) vs new (b) forms at the released shapes."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from vidtok_jax.models import layers

  b, t, s, c = (a.batch1, a.frames, a.size1, 128) if not a.tiny else (1, 9, 32, 16)
  rng = np.random.default_rng(0)
  bf = jnp.bfloat16
  x = jnp.asarray(rng.standard_normal((b, t, s, s, c)), bf)

  def grad_of(f):
    return jax.jit(jax.grad(lambda x, k: jnp.sum(f(x, k).astype(jnp.float32) ** 2), (0, 1)))

  def lax3(x, k, pad):
    return jax.lax.conv_general_dilated(x, k, (1, 1, 1), pad,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

  k333 = jnp.asarray(rng.standard_normal((3, 3, 3, c, c)) * 0.02, bf)
  k311 = jnp.asarray(rng.standard_normal((3, 1, 1, c, c)) * 0.02, bf)
  kout = jnp.asarray(rng.standard_normal((3, 3, 3, c, 3)) * 0.02, bf)
  cases = [
      ("causal 3x3x3 conv: concat+pad copy vs conv padding",
       grad_of(lambda x, k: lax3(jnp.pad(jnp.concatenate([jnp.zeros_like(x[:, :2]), x], 1),
                                         ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0))), k, "VALID")),
       grad_of(lambda x, k: lax3(x, k, ((2, 0), (1, 1), (1, 1)))), (x, k333)),
      ("temporal (3,1,1) conv: 3-D conv vs 2-D conv over (T, H*W)",
       grad_of(lambda x, k: lax3(x, k, ((2, 0), (0, 0), (0, 0)))),
       grad_of(lambda x, k: layers.conv3d(x, k, padding=((2, 0), (0, 0), (0, 0)))), (x, k311)),
      ("conv_out 3x3x3 C->3: conv_by_taps vs conv",
       grad_of(lambda x, k: layers.conv_by_taps(
           jnp.pad(x, ((0, 0), (2, 0), (1, 1), (1, 1), (0, 0))), k)),
       grad_of(lambda x, k: lax3(x, k, ((2, 0), (1, 1), (1, 1)))), (x, kout)),
  ]
  # LayerNorm + SiLU over channels, f32 statistics: two-pass vs one-pass variance.
  def ln_two(x, k):
    xf = x.astype(jnp.float32)
    m = xf.mean(-1, keepdims=True)
    v = jnp.square(xf - m).mean(-1, keepdims=True)
    return jax.nn.silu((xf - m) * jax.lax.rsqrt(v + 1e-6) * k[0, 0, 0, 0]).astype(x.dtype)

  def ln_one(x, k):
    xf = x.astype(jnp.float32)
    m = xf.mean(-1, keepdims=True)
    v = jnp.maximum(jnp.square(xf).mean(-1, keepdims=True) - jnp.square(m), 0.0)
    return jax.nn.silu((xf - m) * jax.lax.rsqrt(v + 1e-6) * k[0, 0, 0, 0]).astype(x.dtype)

  cases.append(("layernorm+silu: two-pass vs one-pass variance", grad_of(ln_two), grad_of(ln_one),
                (x, k311)))
  # LPIPS: one backbone pass over [x; y] vs a pass each (grad w.r.t. y only).
  import importlib

  from bench_utils import random_lpips_params

  lp_lib = importlib.import_module("vidtok_jax.metrics.lpips")  # the module, not the function

  lpp = jax.device_put(random_lpips_params("vgg"))
  fx = jnp.asarray(rng.uniform(-1, 1, (b * t, s, s, 3)), jnp.float32)
  net = lp_lib.LPIPS(net="vgg", dtype=bf)
  vgg = lp_lib.VGG16Features(dtype=bf)

  def joint(p, y):  # the form before this change: one pass over the concatenation
    z = (jnp.concatenate([fx, y]) - lp_lib.SHIFT) / lp_lib.SCALE
    taps = vgg.apply({"params": p["vgg"] if "vgg" in p else p[next(iter(p))]}, z.astype(bf))
    n = fx.shape[0]
    return sum(jnp.mean(jnp.square(lp_lib.normalize_channels(f[:n].astype(jnp.float32))
                                   - lp_lib.normalize_channels(f[n:].astype(jnp.float32))))
               for f in taps)

  def split(p, y):
    return jnp.sum(net.apply({"params": p}, fx, y))

  backbone_key = [k for k in lpp if not k.startswith("lin")][0]
  cases.append(("LPIPS fwd+bwd(recon): joint [x;y] pass vs split passes",
                jax.jit(jax.grad(lambda y, p: joint({"vgg": p[backbone_key]}, y))),
                jax.jit(jax.grad(lambda y, p: split(p, y))), (fx, lpp)))
  return cases


def phase_micro(a, res, st):
  import jax

  out = []
  for name, fa, fb, args in micro_cases(a):
    rec = dict(case=name)
    for tag, fn in (("old", fa), ("new", fb)):
      t = time.perf_counter()
      c = fn.lower(*args).compile()
      rec[f"{tag}_compile_s"] = time.perf_counter() - t
      timing, _ = timed(c, args, 2, max(5, a.repeats))
      rec[f"{tag}_ms"] = timing["median_ms"]
    rec["speedup"] = rec["old_ms"] / rec["new_ms"]
    out.append(rec)
    log(f"micro {name}: {rec['old_ms']:.2f} -> {rec['new_ms']:.2f} ms ({rec['speedup']:.2f}x)")
    res.set("micro", out)
  del jax


# ------------------------------------------------------------------ main

PHASES = {"step1": (phase_step1, 240), "micro": (phase_micro, 60), "learn": (phase_learn, None),
          "profile": (phase_profile, 20),
          "codec": (phase_codec, 110), "stage2": (phase_stage2, 220), "before": (phase_before, 220)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="gpu_check_out")
  p.add_argument("--phases", default="step1,micro,learn,profile,codec,stage2")
  p.add_argument("--config", default="kl_causal_488_4chn")
  p.add_argument("--data", default=".gpu/clips.npz")
  p.add_argument("--lpips", default=".gpu/lpips_vgg_f16.npz")
  p.add_argument("--before_tree", default=".gpu/before")
  p.add_argument("--batch1", type=int, default=8)
  p.add_argument("--batch2", type=int, default=2)
  p.add_argument("--codec_batch", type=int, default=1)
  p.add_argument("--frames", type=int, default=17)
  p.add_argument("--size1", type=int, default=128)
  p.add_argument("--size2", type=int, default=256)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--learn_s", type=float, default=150.0)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--deadline", type=float, default=520.0, help="seconds from start")
  p.add_argument("--cache_dir", default="", help="persistent compilation cache ('' = off)")
  p.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model")
  p.add_argument("--_flops", default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._flops:
    return flops_main(json.loads(a._flops))
  os.makedirs(a.out, exist_ok=True)
  import jax

  if a.cache_dir:
    jax.config.update("jax_compilation_cache_dir", a.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  res = Results(os.path.join(a.out, "gpu_check.json"))
  res.set("device", device_info())
  res.set("args", {k: v for k, v in vars(a).items() if not k.startswith("_")})
  log(f"device {res.data['device']}")
  st, skipped = {}, []
  for name in a.phases.split(","):
    fn, est = PHASES[name]
    left = a.deadline - (time.perf_counter() - T0)
    if name == "learn":
      a.learn_s = min(a.learn_s, left - 30)
      est = a.learn_s if a.learn_s > 20 else None
    if name in ("learn", "profile") and "step" not in st:
      skipped.append((name, "needs step1"))
      continue
    if est is None or left < est:
      skipped.append((name, f"{left:.0f} s left, needs ~{est}"))
      log(f"skip {name}: {skipped[-1][1]}")
      res.set("skipped", skipped)
      continue
    log(f"phase {name}")
    try:
      fn(a, res, st)
    except Exception as e:  # noqa: BLE001 - record and go on to the next phase
      import traceback

      log(f"phase {name} failed: {e}")
      res.set(f"{name}_error", traceback.format_exc()[-4000:])
  res.set("skipped", skipped)
  res.set("wall_s", time.perf_counter() - T0)
  log("done")


if __name__ == "__main__":
  main()
