"""Input-pipeline throughput (clips/s) of the training iterator over a `video_folder` build.

    python benchmarks/data_throughput.py [FOLDER] [--batch 8] [--batches 20] [--repeats 3]

FOLDER defaults to ../shared/data/videos/train beside the repository. The folder is built once
into a temporary TFDS dir (store_short_side 256), then for each clip shape (17x128x128,
17x256x256) a fresh iterator is timed: first batch (tf.data tracing + pipeline fill) reported
separately, one warm-up pass, then the median over `--repeats` of `--batches` batches.
Prints a table and, last, one JSON line.
"""

import argparse
import json
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(cfg, batches, repeats):
  """(first-batch seconds, median clips/s, per-repeat clips/s) for one data config."""
  from vidtok_jax.data import make_train_iterator

  t0 = time.perf_counter()
  it = make_train_iterator(cfg, start_step=0, process_index=0, process_count=1)
  next(it)
  first = time.perf_counter() - t0
  for _ in range(batches):  # warm-up: autotune settles, prefetch buffer filled
    next(it)
  rates = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    rates.append(batches * cfg.global_batch_size / (time.perf_counter() - t0))
  return first, statistics.median(rates), rates


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("folder", nargs="?", default=str(REPO.parent / "shared" / "data" / "videos" /
                                                   "train"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--sizes", default="128,256")
  p.add_argument("--num_frames", type=int, default=17)
  p.add_argument("--data_dir", default=None, help="keep the build here (default: a temp dir)")
  args = p.parse_args(argv)
  if not os.path.isdir(args.folder):
    p.error(f"folder {args.folder!r} not found")
  logging.basicConfig(level=logging.WARNING)
  from vidtok_jax.data import build_video_folder, data_config

  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or tmp
    t0 = time.perf_counter()
    builder = build_video_folder(args.folder, data_dir, store_short_side=256)
    build_s = time.perf_counter() - t0
    n = builder.info.splits["train"].num_examples
    results = {"cpus": os.cpu_count(), "train_videos": n, "build_s": round(build_s, 2),
               "batch": args.batch}
    print(f"built {n} train videos in {build_s:.1f} s ({os.cpu_count()} CPUs)")
    print(f"{'clip':>12} {'first batch s':>14} {'clips/s (median)':>17}  repeats")
    for size in (int(s) for s in args.sizes.split(",")):
      cfg = data_config(dir=args.folder, tfds_data_dir=data_dir, size=size, store_short_side=256,
                        num_frames=args.num_frames, global_batch_size=args.batch)
      first, med, rates = measure(cfg, args.batches, args.repeats)
      name = f"{args.num_frames}x{size}x{size}"
      print(f"{name:>12} {first:>14.2f} {med:>17.1f}  {[round(r, 1) for r in rates]}")
      results[name] = {"clips_per_s": round(med, 2), "first_batch_s": round(first, 2)}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
