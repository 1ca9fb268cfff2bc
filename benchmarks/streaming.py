r"""Peak memory and time of long videos: streaming (`vidtok_jax.inference.streaming.Streamer`) vs whole clip.

  python benchmarks/streaming.py                          # 33/129/513 x 256^2 + a 1080p clip
  python benchmarks/streaming.py --variant=kl_causal_488_4chn_v1_1 --ch=128   # full width (GPU)

Every case runs in a fresh subprocess, so peaks do not carry over. The model has random weights
(speed and memory do not depend on their values). Per case: compile time (first call minus a
warm call), the median wall time of `--repeats` warm calls (`block_until_ready` / host copies
included, since streaming returns host arrays), and peak memory:
* GPU/TPU: the device's `peak_bytes_in_use`;
* CPU: the process's peak RSS (VmHWM) during the warm calls minus the RSS before them, minus
  the returned video (which any call that returns a whole array must hold) = "working memory";
  the raw peak is recorded too. Compilation's memory is excluded on both.
"Whole clip" is one jitted `model.apply` of the official forward on the whole video; "stream"
is `Streamer.reconstruct` (16-frame chunks with overlap; `--tile` for the 1080p case).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(args) -> dict:
  sys.path.insert(0, REPO)
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # bench_utils
  import jax
  import jax.numpy as jnp
  import numpy as np

  import vidtok_jax
  from bench_utils import random_params
  from bench_utils import reset_peak_rss, rss_kib
  from vidtok_jax.inference.streaming import Streamer

  mode, t, h, w = args.one.split(",")
  t, h, w = int(t), int(h), int(w)
  overrides = {"ch": args.ch} if args.ch else {}
  cfg = vidtok_jax.load_config("vidtok_" + args.variant, dtype=args.dtype, **overrides)
  params = jax.device_put(random_params(vidtok_jax.abstract_params(cfg), 0))
  model = vidtok_jax.VidTok(cfg)
  rng = np.random.default_rng(0)
  video = rng.uniform(-1, 1, (1, t, h, w, 3)).astype(np.float32)
  dev = jax.devices()[0]
  gpu = dev.platform != "cpu"

  if mode == "whole":
    fwd = jax.jit(lambda p, x: jnp.clip(model.apply({"params": p}, x, False, 0, False)[1], -1, 1))

    def call():
      return np.asarray(fwd(params, jnp.asarray(video)))
  else:
    tile = tuple(int(v) for v in args.tile.split(",")) if (args.tile and h > 256) else None
    codec = Streamer(cfg, params, t_chunk_enc=args.chunk, use_overlap=True, tile=tile,
                     tile_overlap=args.tile_overlap)

    def call():
      return codec.reconstruct(video)

  t0 = time.perf_counter()
  try:
    out = call()
  except Exception as e:  # e.g. RESOURCE_EXHAUSTED: a result, not a crash of the benchmark
    return dict(case=args.one, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
  first = time.perf_counter() - t0
  assert out.shape[1] == t, out.shape
  del out
  # Memory is measured over the warm calls only: compilation's own memory is not the model's.
  base = rss_kib("VmRSS")
  reset_peak_rss()
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - t0)
    del out
  run = statistics.median(times)
  res = dict(case=args.one, mode=mode, frames=t, height=h, width=w, run_s=run,
             compile_s=max(first - run, 0.0), frames_per_s=t / run, device=dev.device_kind,
             variant=args.variant, ch=int(cfg.ch), dtype=args.dtype)
  buffers = video.nbytes  # the returned video (the input is held before and after)
  if gpu:
    stats = dev.memory_stats() or {}
    res["peak_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20
    res["memory"] = "device peak_bytes_in_use"
  else:
    peak = rss_kib("VmHWM")
    res["raw_peak_mib"] = peak / 1024
    res["peak_mib"] = max(peak - base, 0) / 1024 - buffers / 2**20
    res["memory"] = "host peak RSS of a warm call - RSS before it - the output video"
  res["video_buffers_mib"] = buffers / 2**20
  return res


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--variant", default="kl_causal_488_4chn_v1_1")
  p.add_argument("--ch", type=int, default=8, help="base width (released: 128); 0 = released")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--frames", default="33,129,513")
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--hd", default="17,1080,1920", help="T,H,W of the large-frame case ('' = off)")
  p.add_argument("--modes", default="stream,whole")
  p.add_argument("--chunk", type=int, default=16)
  p.add_argument("--tile", default="256,256", help="spatial tile of the large-frame case")
  p.add_argument("--tile_overlap", type=int, default=64)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    print("RESULT " + json.dumps(run_one(args)), flush=True)
    return
  cases = [(m, int(t), args.size, args.size) for t in args.frames.split(",") if t
           for m in args.modes.split(",")]
  if args.hd:
    t, h, w = (int(v) for v in args.hd.split(","))
    cases += [(m, t, h, w) for m in args.modes.split(",")]
  results = []
  print(f"{'mode':7s} {'frames':>6s} {'size':>10s} {'compile s':>10s} {'run s':>8s} "
        f"{'frames/s':>9s} {'peak MiB':>9s}", flush=True)
  for m, t, h, w in cases:
    cmd = [sys.executable, os.path.abspath(__file__), f"--one={m},{t},{h},{w}",
           f"--variant={args.variant}", f"--ch={args.ch}", f"--dtype={args.dtype}",
           f"--chunk={args.chunk}", f"--tile={args.tile}", f"--tile_overlap={args.tile_overlap}",
           f"--repeats={args.repeats}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:  # killed (out of memory) or crashed
      tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
      r = dict(case=f"{m},{t},{h},{w}", mode=m, frames=t, height=h, width=w,
               error=f"exit {proc.returncode}: {tail}")
    else:
      r = json.loads(line[-1][len("RESULT "):])
      r.setdefault("mode", m)
    results.append(r)
    if "error" in r:
      print(f"{m:7s} {t:6d} {h:>4d}x{w:<5d} {'failed: ' + r['error']}", flush=True)
    else:
      print(f"{m:7s} {t:6d} {h:>4d}x{w:<5d} {r['compile_s']:10.1f} {r['run_s']:8.2f} "
            f"{r['frames_per_s']:9.2f} {r['peak_mib']:9.0f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
