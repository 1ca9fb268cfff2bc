"""Plot a run's validation PSNR and reconstruction loss from its TensorBoard events.

  python tools/plot_training.py runs/s1 --out docs/training_curve.png

Prints the `val/psnr` points (step, dB) and writes a two-panel PNG: validation PSNR, and the
training `rec_loss` (interval means) with `steps_per_sec` on the title.
"""

import argparse
import sys

import numpy as np


def read_scalars(workdir) -> dict:
  """{tag: (steps, values)} of every scalar in `workdir`'s event files (clu writes tensors)."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util

  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0,
                                                                       "scalars": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    events = acc.Tensors(tag)
    vals = [np.asarray(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
    if all(v.size == 1 and v.dtype.kind == "f" for v in vals):
      out[tag] = (np.array([e.step for e in events]), np.array([float(v.reshape(-1)[0]) for v in vals]))
  for tag in acc.Tags()["scalars"]:
    events = acc.Scalars(tag)
    out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("workdir")
  ap.add_argument("--out", required=True, help="PNG path")
  ap.add_argument("--title", default="")
  args = ap.parse_args(argv)
  s = read_scalars(args.workdir)
  if "val/psnr" not in s:
    sys.exit(f"{args.workdir}: no val/psnr scalars (was eval_clips 0?)")
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps, psnr = s["val/psnr"]
  order = np.argsort(steps, kind="stable")
  steps, psnr = steps[order], psnr[order]
  for st, p in zip(steps, psnr, strict=True):
    print(f"step {int(st):6d}  val PSNR {p:.2f} dB")
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  axes[0].plot(steps, psnr, "o-")
  axes[0].set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR")
  if "train/rec_loss" in s:
    st, v = s["train/rec_loss"]
    axes[1].plot(st, v)
    axes[1].set(xlabel="step", ylabel="rec_loss", title="training reconstruction loss",
                yscale="log")
  for ax in axes:
    ax.grid(alpha=0.3)
  if args.title:
    fig.suptitle(args.title, fontsize=9)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
