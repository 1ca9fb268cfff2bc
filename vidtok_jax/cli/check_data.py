"""Dataset check, run before spending accelerator hours on a folder of videos:

    python -m vidtok_jax.data --dir FOLDER [--csv FILE] [--num_frames 17 --sample_fps 3 --size 128]

Decodes every file (by building the `video_folder` TFDS dataset, in a temporary directory unless
`--data_dir` is given), prints one line per file, a summary (clips available, skipped files with
reasons, fps / size / length statistics) and the training pipeline's throughput, and ends with
one JSON line: {"files", "usable", "skipped": [{"path", "reason"}], "clips_per_s", ...}.
Exit status 0 when at least one training video is usable, else 1.
"""

import argparse
import collections
import json
import logging
import math
import os
import sys
import tempfile
import time


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m vidtok_jax.data", description=__doc__.split("\n")[0])
  p.add_argument("--dir", required=True, help="folder of videos")
  p.add_argument("--csv", default=None, help="VidTok meta CSV of the train videos")
  p.add_argument("--num_frames", type=int, default=17)
  p.add_argument("--sample_fps", type=float, default=3.0)
  p.add_argument("--eval_sample_fps", type=float, default=8.0)
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--store_short_side", type=int, default=256)
  p.add_argument("--min_side", type=int, default=16)
  p.add_argument("--batch", type=int, default=8, help="batch of the throughput measurement")
  p.add_argument("--batches", type=int, default=10, help="timed batches (after 2 warm-up)")
  p.add_argument("--data_dir", default=None, help="keep the TFDS build here (default: temp dir)")
  p.add_argument("--strict", action="store_true", help="stop at the first bad file")
  return p.parse_args(argv)


class _PrintHandler(logging.Handler):
  """Builder log lines (one per file, skips included) -> stdout, as progress."""

  def emit(self, record):
    print(("! " if record.levelno >= logging.WARNING else "  ") + record.getMessage(), flush=True)


def _stats(values):
  if not values:
    return None
  v = sorted(values)
  return {"min": round(v[0], 3), "median": round(v[len(v) // 2], 3), "max": round(v[-1], 3)}


def _throughput(cfg, batches):
  from vidtok_jax.data.pipeline import make_train_iterator

  with make_train_iterator(cfg, 0, process_index=0, process_count=1) as it:
    for _ in range(2):  # warm-up: tracing, autotune, prefetch fill
      next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * cfg.global_batch_size / (time.perf_counter() - t0)


def run(args) -> dict:
  """Build + analyse; returns the summary dict (the JSON line)."""
  from vidtok_jax.data import sampling
  from vidtok_jax.data.config import data_config
  from vidtok_jax.data.tfds_builder import build_video_folder

  log = logging.getLogger("vidtok_jax.data")
  log.setLevel(logging.INFO)
  log.addHandler(_PrintHandler())
  log.propagate = False
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or tmp
    t0 = time.perf_counter()
    builder = build_video_folder(args.dir, data_dir, csv=args.csv,
                                 store_short_side=args.store_short_side, strict=args.strict,
                                 min_side=args.min_side)
    build_s = time.perf_counter() - t0
    meta = builder.info.metadata
    videos, skipped = meta.get("videos", []), meta.get("skipped", [])
    n, fps_s = args.num_frames, args.sample_fps
    rows, train_clips, eval_windows, short = [], 0, 0, []
    for v in videos:
      total, fps = v["num_frames"], v["fps"] if v["fps"] > 0 else 25.0
      span = (min(n, total) - 1) * sampling.frame_interval(fps, fps_s) + 1
      if v["split"] == "train":
        train_clips += max(1, total // span)  # non-overlapping clips
        if total < span or total < n:
          short.append(v["path"])
      else:
        ids = math.ceil(total / sampling.frame_interval(fps, args.eval_sample_fps))
        eval_windows += math.ceil(ids / n)
      rows.append(v)
    print(f"\n{'split':<11}{'video':<44}{'size (HxW)':>12}{'fps':>8}{'frames':>8}{'sec':>7}"
          f"{'starts':>8}")
    for v in rows:
      fps = v["fps"] or 25.0
      starts = sampling.start_range(v["num_frames"], fps, n, fps_s)
      print(f"{v['split']:<11}{v['path'][-43:]:<44}{v['orig_height']:>6}x{v['orig_width']:<5}"
            f"{v['fps']:>8.2f}{v['num_frames']:>8}{v['num_frames'] / fps:>7.1f}{starts:>8}")
      if v.get("video_streams", 1) > 1:  # FFmpeg's choice among several video streams
        print(f"{'':<11}  (video stream #{v['stream']} of {v['video_streams']}, as FFmpeg picks)")
    for s in skipped:
      print(f"{s.get('split', ''):<11}{s['path'][-43:]:<44} SKIPPED: {s['reason']}")
    usable_train = sum(v["split"] == "train" for v in videos)
    clips_per_s = None
    if usable_train:
      size = min(args.size, args.store_short_side)
      cfg = data_config(dir=args.dir, csv=args.csv, tfds_data_dir=data_dir,
                        num_frames=n, sample_fps=fps_s, size=size,
                        store_short_side=args.store_short_side, min_side=args.min_side,
                        global_batch_size=args.batch, strict=args.strict)
      clips_per_s = round(_throughput(cfg, args.batches), 2)
  reasons = collections.Counter(s["reason"] for s in skipped)
  summary = {
      "files": meta.get("files", len(videos) + len(skipped)),
      "usable": len(videos),
      "skipped": [{"path": s["path"], "reason": s["reason"]} for s in skipped],
      "clips_per_s": clips_per_s,
      "train_videos": usable_train,
      "validation_videos": len(videos) - usable_train,
      "train_clips": train_clips,
      "eval_windows": eval_windows,
      "short_videos": short,
      "fps": _stats([v["fps"] for v in videos]),
      "frames": _stats([v["num_frames"] for v in videos]),
      "seconds": _stats([v["num_frames"] / (v["fps"] or 25.0) for v in videos]),
      "build_s": round(build_s, 2),
  }
  print(f"\n{summary['files']} files: {summary['usable']} usable "
        f"({usable_train} train, {summary['validation_videos']} validation), "
        f"{len(skipped)} skipped {dict(reasons) if reasons else ''}")
  print(f"train clips ({n} frames at {fps_s:g} fps, non-overlapping): {train_clips}; "
        f"eval windows at {args.eval_sample_fps:g} fps: {eval_windows}")
  if short:
    print(f"{len(short)} train videos shorter than one clip span (frames get stretched/repeated)")
  for key in ("fps", "frames", "seconds"):
    if summary[key]:
      print(f"{key:>8}: min {summary[key]['min']}  median {summary[key]['median']}  "
            f"max {summary[key]['max']}")
  sizes = collections.Counter(f"{v['orig_height']}x{v['orig_width']}" for v in videos)
  print("   sizes: " + ", ".join(f"{s} ({c})" for s, c in sizes.most_common()))
  if clips_per_s is not None:
    print(f"pipeline: {clips_per_s} clips/s ({n}x{size}x{size}, batch {args.batch}, "
          f"{os.cpu_count()} CPUs); build {build_s:.1f} s")
  return summary


def main(argv=None) -> int:
  args = _parse(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow_datasets as tfds
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)
  tfds.disable_progress_bar()
  try:
    if not os.path.isdir(args.dir):
      raise ValueError(f"--dir {args.dir!r} is not a directory")
    summary = run(args)
  except Exception as e:  # noqa: BLE001 -- the last line must stay one JSON object
    print(f"error: {e}", file=sys.stderr)
    skipped = [{"path": s["path"], "reason": s["reason"]} for s in getattr(e, "skipped", [])]
    print(json.dumps({"error": str(e), "files": getattr(e, "files", None),
                      "usable": len(getattr(e, "videos", [])), "skipped": skipped,
                      "clips_per_s": None}))
    return 1
  print(json.dumps(summary))
  return 0 if summary["train_videos"] else 1


if __name__ == "__main__":
  sys.exit(main())
