"""Pre-decodes clips for `benchmarks/gpu_check.py`, whose GPU machine has no TensorFlow or PyAV.

    python benchmarks/gpu_data.py --train DIR --val DIR --out .gpu/clips.npz [--size 128]

Train: every video's frames at the training rate (`--sample_fps`, frame 0, d, 2d, ... as the
official sampler's interval d) resized (short side) and centre-cropped to `--size`, so any 17
consecutive stored frames are one official training window (starts on multiples of d).
Val: the evaluation protocol's windows (`--eval_sample_fps` from frame 0, non-overlapping
17-frame windows, the last one padded), the same resize and crop. uint8, compressed.
"""

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vidtok_jax.data.decode import decode  # noqa: E402
from vidtok_jax.data import sampling  # noqa: E402


def frames_at(path, sample_fps, size):
  video, info = decode(path, max_short_side=2 * size)
  ids = np.arange(0, len(video), sampling.frame_interval(info.fps, sample_fps))
  x = sampling.resize_short_side_and_center_crop(video[ids], size)
  return np.round(x * 255.0).astype(np.uint8)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--train", required=True)
  p.add_argument("--val", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--frames", type=int, default=17)
  p.add_argument("--sample_fps", type=float, default=3.0)
  p.add_argument("--eval_sample_fps", type=float, default=8.0)
  a = p.parse_args()
  arrays = {}
  for i, path in enumerate(sorted(pathlib.Path(a.train).glob("*.mp4"))):
    x = frames_at(path, a.sample_fps, a.size)
    if len(x) >= a.frames:
      arrays[f"train_{i:02d}"] = x
    print(f"train {path.name}: {len(x)} frames", flush=True)
  val = []
  for path in sorted(pathlib.Path(a.val).glob("*.mp4")):
    x = frames_at(path, a.eval_sample_fps, a.size)
    val += [x[w] for w in sampling.eval_windows(len(x), a.frames)]
    print(f"val {path.name}: {len(x)} frames", flush=True)
  arrays["val"] = np.stack(val)
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(a.out, **arrays)
  print(f"{a.out}: {sum(v.nbytes for v in arrays.values()) / 2**20:.1f} MiB raw, "
        f"{len(val)} val windows", flush=True)


if __name__ == "__main__":
  main()
