r"""Inference and evaluation throughput: eval clips/s, encode / decode / reconstruct clips/s,
streamed frames/s, and XLA's memory figures of a 1080p frame. Needs neither TensorFlow nor PyAV.

  python benchmarks/inference.py --ch=32 --json=cpu.json             # CPU, narrow model
  python benchmarks/inference.py --dtype=bfloat16 --batch=8 --eval_videos=64 \
      --long_frames=257 --hd_frames=17 --json=gpu.json                # GPU/TPU, released width

Ops (`--ops`, comma-separated; default all):
* `eval`: `vidtok_jax.evaluation.evaluator.Evaluator` (PSNR, SSIM, LPIPS-VGG, I3D features on the device)
  over `--eval_videos` videos of `--eval_frames` frames: synthetic uint8 frames at
  `--eval_source` (resized to 256^2 on the host, as decoded videos are), or the pre-decoded
  uint8 `(T, H, W, 3)` `.npy` files of `--npy_dir`, or the video files of `--video_dir`
  (decoded with PyAV as `eval.py` does, frames at `--fps`). LPIPS and I3D weights are random arrays of
  the right shapes unless `--i3d_weights` is given (speed does not depend on the values). One
  warm-up run of two videos compiles; the timed run reports clips/s and the time split (host
  decode + resize per video; per device batch, each part jitted alone: model, PSNR + SSIM +
  LPIPS, I3D). The
  device-busy fraction is (calls x the step's time alone, on device-resident batches) / wall.
* `encode`, `decode`, `reconstruct`: one jitted program on `--batch` x 17x256^2 clips (decode:
  their latents), median of `--repeats` calls after a warm-up; clips/s.
* `long`: `Streamer.reconstruct` of one `--long_frames` x 256^2 video (16-frame chunks, overlap),
  frames/s after a warm-up on the same length.
* `hd`: the same for one `--hd_frames` x 1080x1920 video, untiled (`--hd_tile=h,w` to tile).
* `memory`: XLA's memory analysis (compile only) of a 1080x1920 single-frame encode / decode.

Weights are random (`random_params`); times include host<->device copies of inputs/outputs for
the streamer ops (they return host arrays) and exclude them for the jitted ops.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))  # bench_utils (runpy.run_path adds no folder)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 2**30


def eval_config(args):
  spec = importlib.util.spec_from_file_location("vidtok_configs", REPO / "configs" / "vidtok.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(args.variant)
  cfg.model = model_config(args)
  cfg.data.size, cfg.data.num_frames = args.size, 17 if cfg.model.causal else 16
  return cfg


def model_config(args):
  import vidtok_jax

  overrides = {"ch": args.ch} if args.ch else {}
  return vidtok_jax.load_config("vidtok_" + args.variant, dtype=args.dtype, **overrides)


def timed(fn, repeats):
  fn()  # warm-up (compile)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def random_eval_weights(args):
  """(lpips params, i3d variables): random of the right shapes, or the real I3D file."""
  from bench_utils import random_lpips_params
  from vidtok_jax.metrics import i3d
  from bench_utils import random_params

  if args.i3d_weights:
    variables = i3d.load_i3d_variables(args.i3d_weights)
  else:
    variables = random_params(i3d._template(), 2)  # pylint: disable=protected-access
    variables = jax.tree_util.tree_map_with_path(  # variances must be positive
        lambda p, v: np.abs(v) + 1e-3 if "var" in jax.tree_util.keystr(p) else v, variables)
  return random_lpips_params("vgg"), variables


def eval_items(args, n, seed=0):
  from vidtok_jax.evaluation.evaluator import VideoItem

  if args.video_dir:  # real files, decoded with PyAV at --fps sampling (eval.py's path)
    from vidtok_jax.evaluation.evaluator import folder_videos
    from vidtok_jax.data import read_video_list
    paths = read_video_list(args.video_dir)[0][:n]
    if not paths:
      raise FileNotFoundError(f"no videos in {args.video_dir}")
    return list(folder_videos(paths, args.fps))
  if args.npy_dir:
    files = sorted(pathlib.Path(args.npy_dir).glob("*.npy"))[:n]
    if not files:
      raise FileNotFoundError(f"no .npy videos in {args.npy_dir}")
    return [VideoItem(str(f), lambda f=f: (np.load(f), args.fps)) for f in files]
  h, w = (int(v) for v in args.eval_source.split("x"))
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (args.eval_frames, h, w, 3), np.uint8)
  # Each video a shifted copy: distinct content, no per-video RNG cost in the timed run.
  return [VideoItem(f"synthetic_{i}", lambda i=i: (np.roll(base, i, axis=2), args.fps))
          for i in range(n)]


def run_eval(args, out):
  from vidtok_jax.evaluation import evaluator as evaluation

  # The module (the package attribute `vidtok_jax.metrics.lpips` is the function).
  lpips_lib = importlib.import_module("vidtok_jax.metrics.lpips")
  from bench_utils import random_params

  cfg = eval_config(args)
  params = jax.device_put(random_params(vidtok_jax_abstract(cfg.model), 0))
  lp, i3d = random_eval_weights(args)
  lpips_lib_load = lpips_lib.load_lpips_params
  lpips_lib.load_lpips_params = lambda net="vgg", path=None: lp  # random weights, same shapes
  try:
    ev = evaluation.Evaluator(cfg, params, lpips_net="vgg", fvd=True, batch_size=args.batch,
                              sample_posterior=True, i3d_variables=i3d)
  finally:
    lpips_lib.load_lpips_params = lpips_lib_load
  t = time.perf_counter()
  ev.run(eval_items(args, 2, seed=1), progress=False)
  compile_s = time.perf_counter() - t
  items = eval_items(args, args.eval_videos)
  t = time.perf_counter()
  res = ev.run(items, progress=False)
  wall = time.perf_counter() - t
  n_clips = res["protocol"]["num_clips"]
  b = ev.batch_size * ev.n_dev
  calls = -(-n_clips // b)
  # The step alone on a device-resident batch: the device's share of one call.
  x = jax.device_put(np.random.default_rng(0).uniform(0, 1, (b, ev.num_frames, args.size,
                                                                args.size, 3))
                     .astype(np.float32), ev._batch_sharding)  # pylint: disable=protected-access
  ids = jax.device_put(np.arange(b, dtype=np.uint32), ev._batch_sharding)  # pylint: disable=protected-access
  step_s = timed(lambda: jax.block_until_ready(ev._step(ev.params, ev.lpips_params, ev.i3d,  # pylint: disable=protected-access
                                                        x, ids)), args.repeats)
  # The time split of one device batch: reconstruction alone, the metrics alone, I3D alone.
  split = eval_split(args, ev, x, ids)
  # The host side alone: decode (load) + resize + windows of each video, once.
  host_s = []
  for item in items:
    t = time.perf_counter()
    ev._prepare(item)  # pylint: disable=protected-access
    host_s.append(time.perf_counter() - t)
  out["eval"] = {
      "videos": len(items), "clips": n_clips, "batch_per_device": ev.batch_size,
      "devices": ev.n_dev, "wall_s": wall, "clips_per_s": n_clips / wall,
      "step_s": step_s, "device_busy_fraction": min(calls * step_s / wall, 1.0),
      "split_s_per_call": split,
      "split_s_total": {k: v * calls for k, v in split.items()},
      "host_prepare_s_per_video": statistics.mean(host_s), "host_prepare_s_total": sum(host_s),
      "main_thread_timing_s": res["timing"], "warmup_and_compile_s": compile_s,
      "source": (args.video_dir or args.npy_dir
                 or f"synthetic {args.eval_frames}x{args.eval_source}")}


def eval_split(args, ev, x, ids):
  """Seconds per device batch of each part of the eval step, each jitted alone on
  device-resident inputs: the model (sampled reconstruction), PSNR + SSIM + LPIPS, and I3D on the
  real and reconstructed windows. Their sum exceeds the fused step's (no overlap, extra
  launches)."""
  model, seed = ev.model, ev.seed

  def recon(params, x01, wid):
    def one(xi, w):
      key = jax.random.fold_in(jax.random.PRNGKey(seed), w)
      return model.apply({"params": params}, xi[None] * 2.0 - 1.0, True, 0, False,
                         rngs={"sample": key})[1][0]
    return (jnp.clip(jax.vmap(one)(x01, wid).astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0

  recon = jax.jit(recon)
  r = jax.block_until_ready(recon(ev.params, x, ids))
  split = {"model": timed(lambda: jax.block_until_ready(recon(ev.params, x, ids)), args.repeats),
           "psnr_ssim_lpips": timed(lambda: jax.block_until_ready(
               ev._metrics(ev.lpips_params, x, r)), args.repeats)}  # pylint: disable=protected-access
  if ev.fvd:
    logits = jax.jit(ev.fvd_lib._logits)  # pylint: disable=protected-access
    u8 = lambda v: jnp.round(jnp.clip(v, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    xu, ru = jax.block_until_ready((u8(x), u8(r)))
    split["i3d"] = timed(lambda: jax.block_until_ready((logits(ev.i3d, xu), logits(ev.i3d, ru))),
                         args.repeats)
  return split


def vidtok_jax_abstract(model_cfg):
  import vidtok_jax

  return vidtok_jax.abstract_params(model_cfg)


def run_codec(args, out):
  import vidtok_jax
  from bench_utils import random_params

  cfg = model_config(args)
  model = vidtok_jax.VidTok(cfg)
  params = jax.device_put(random_params(vidtok_jax_abstract(cfg), 0))
  t = 17 if model.config.causal else 16
  s = args.size
  x = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (args.batch, t, s, s, 3))
                     .astype(np.float32))
  enc = jax.jit(lambda p, x: model.apply({"params": p}, x, compute_aux=False,
                                         method=vidtok_jax.VidTok.encode)[0])
  dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vidtok_jax.VidTok.decode))
  rec = jax.jit(lambda p, x: model.apply({"params": p}, x, False, 0, False)[1])
  z = jax.block_until_ready(enc(params, x))
  fns = {"encode": lambda: enc(params, x), "decode": lambda: dec(params, z),
         "reconstruct": lambda: rec(params, x)}
  for op in ("encode", "decode", "reconstruct"):
    if op in args.ops:
      sec = timed(lambda f=fns[op]: jax.block_until_ready(f()), args.repeats)
      out[op] = {"shape": [args.batch, t, s, s], "s_per_call": sec,
                 "clips_per_s": args.batch / sec}


def run_stream(args, out, op):
  import vidtok_jax
  from bench_utils import random_params
  from vidtok_jax.inference.streaming import Streamer

  cfg = model_config(args)
  params = jax.device_put(random_params(vidtok_jax_abstract(cfg), 0))
  t, h, w = ((args.long_frames, args.size, args.size) if op == "long"
             else (args.hd_frames, 1080, 1920))
  tile = tuple(int(v) for v in args.hd_tile.split(",")) if op == "hd" and args.hd_tile else None
  codec = Streamer(cfg, params, t_chunk_enc=16, use_overlap=True, tile=tile,
                   tile_batch=args.tile_batch if tile else 1)
  video = np.random.default_rng(0).uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32)
  s = timed(lambda: codec.reconstruct(video), max(1, args.repeats // 2))
  out[op] = {"shape": [1, t, h, w], "tile": tile, "tile_batch": codec.tile_batch, "s": s,
             "frames_per_s": t / s}


def run_memory(args, out):
  import vidtok_jax

  cfg = model_config(args)
  model = vidtok_jax.VidTok(cfg)
  p = vidtok_jax_abstract(cfg)
  sf, zc = model.config.spatial_factor, model.config.z_channels
  x = jax.ShapeDtypeStruct((1, 1, 1080, 1920, 3), jnp.float32)
  z = jax.ShapeDtypeStruct((1, 1, 1080 // sf, 1920 // sf, zc), jnp.float32)
  res = {}
  for name, fn, arg in [
      ("encode", lambda p, x: model.apply({"params": p}, x, compute_aux=False,
                                          method=vidtok_jax.VidTok.encode)[0], x),
      ("decode", lambda p, z: model.apply({"params": p}, z, method=vidtok_jax.VidTok.decode), z)]:
    m = jax.jit(fn).lower(p, arg).compile().memory_analysis()
    res[name] = {"temp_gib": m.temp_size_in_bytes / GIB,
                 "argument_gib": m.argument_size_in_bytes / GIB,
                 "output_gib": m.output_size_in_bytes / GIB}
  out["memory_1080p_frame"] = res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="kl_causal_488_4chn")
  p.add_argument("--ch", type=int, default=0, help="model width (0: the released 128)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--ops", default="eval,encode,decode,reconstruct,long,hd,memory")
  p.add_argument("--batch", type=int, default=1, help="clips per device per call")
  p.add_argument("--size", type=int, default=256, help="clip side for eval / codec / long")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--eval_videos", type=int, default=8)
  p.add_argument("--eval_frames", type=int, default=33, help="frames per synthetic video")
  p.add_argument("--eval_source", default="270x480", help="synthetic frame size HxW")
  p.add_argument("--npy_dir", default=None, help="pre-decoded uint8 (T, H, W, 3) .npy videos")
  p.add_argument("--video_dir", default=None,
                 help="real video files for eval (decoded with PyAV, frames at --fps)")
  p.add_argument("--fps", type=float, default=8.0, help="frame rate of the eval inputs")
  p.add_argument("--i3d_weights", default=None)
  p.add_argument("--long_frames", type=int, default=65)
  p.add_argument("--hd_frames", type=int, default=1)
  p.add_argument("--hd_tile", default=None, help="h,w pixel tile for the 1080p video")
  p.add_argument("--tile_batch", type=int, default=1, help="tiles per call with --hd_tile")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
  unknown = set(args.ops) - {"eval", "encode", "decode", "reconstruct", "long", "hd", "memory"}
  if unknown:
    p.error(f"unknown ops {sorted(unknown)}")
  dev = jax.devices()[0]
  out = {"device": f"{dev.platform} {dev.device_kind}", "devices": jax.local_device_count(),
         "variant": args.variant, "ch": args.ch or 128, "dtype": args.dtype,
         "cpus": os.cpu_count()}
  t0 = time.perf_counter()
  for op in args.ops:
    t = time.perf_counter()
    if op == "eval":
      run_eval(args, out)
    elif op in ("encode", "decode", "reconstruct"):
      if not any(k in out for k in ("encode", "decode", "reconstruct")):
        run_codec(args, out)
    elif op in ("long", "hd"):
      run_stream(args, out, op)
    elif op == "memory":
      run_memory(args, out)
    print(f"{op}: done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    if args.json:  # after every op: a later op that fails (e.g. out of memory) loses nothing
      pathlib.Path(args.json).write_text(json.dumps(out, indent=1, default=str))
  out["total_s"] = time.perf_counter() - t0
  text = json.dumps(out, indent=1, default=str)
  print(text)
  if args.json:
    pathlib.Path(args.json).write_text(text)


if __name__ == "__main__":
  main()
