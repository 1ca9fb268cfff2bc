"""Encoding throughput of `python -m vidtok_jax.tokenize` (clips mode): windows per second per
device of the jitted, device-sharded window encoder, decoding and resizing excluded.

  python benchmarks/tokenize_throughput.py --variant fsq_causal_488_262144 --size 128 --batch 1
  python benchmarks/tokenize_throughput.py --variant fsq_causal_488_262144 --tiny --size 128

Random weights (the speed does not depend on them); one warm-up call (compiles), then the
median of `--repeats` timed calls.
"""

import argparse
import importlib.util
import pathlib
import time

import jax
import numpy as np

import vidtok_jax
from bench_utils import random_params
from vidtok_jax.tokenize import TokenizeJob

REPO = pathlib.Path(__file__).resolve().parents[1]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="fsq_causal_488_262144")
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--size", type=int, default=128)
  ap.add_argument("--frames", type=int, default=17)
  ap.add_argument("--batch", type=int, default=1, help="windows per device per call")
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  spec = importlib.util.spec_from_file_location("c", REPO / "configs" / "vidtok.py")
  configs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(configs)
  cfg = configs.get_config(a.variant + (",tiny" if a.tiny else ""))
  cfg.data.size, cfg.data.num_frames = a.size, a.frames
  params = random_params(vidtok_jax.abstract_params(cfg.model), seed=0)
  job = TokenizeJob(cfg, params, None, batch_size=a.batch)
  n = a.batch * job.n_dev
  clips = np.random.default_rng(0).random((n, a.frames, a.size, a.size, 3), np.float32)
  t = time.perf_counter()
  job.encode_windows(clips)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(a.repeats):
    t = time.perf_counter()
    job.encode_windows(clips)
    times.append(time.perf_counter() - t)
  med = float(np.median(times))
  print(f"{cfg.variant}{' tiny' if a.tiny else ''} {a.frames}x{a.size}x{a.size} batch {n} on "
        f"{job.n_dev} {jax.devices()[0].platform} device(s): {med:.3f} s per call, "
        f"{n / med / job.n_dev:.2f} windows/s per device (first call {compile_s:.1f} s)")


if __name__ == "__main__":
  main()
