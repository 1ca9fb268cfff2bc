r"""Tokenize a video dataset to ArrayRecord shards, or decode one record back to video.

  python -m vidtok_jax.tokenize --config=configs/vidtok.py:fsq_causal_488_262144 \
      --torch_checkpoint=vidtok_fsq_causal_488_262144.ckpt --data_dir=videos --out=tokens/
  python -m vidtok_jax.tokenize --config=... --torch_checkpoint=... --decode=tokens/ --index=0 \
      --output=clip.mp4

Weights as eval.py (`--workdir` / `--checkpoint` / `--torch_checkpoint`), data as eval.py
(`--data_dir` [+ `--csv`], or `--tfds_name` + `--split`), the evaluation clip protocol
(`--size`, `--sample_fps`, `--num_frames`, `--mode=clips|long`). A rerun of the same command
resumes (a folder holding another job is refused); SIGTERM finishes the current shard and exits
with status 3. Multi-host: add `--distributed` on every host. `--decode` does not replace an
existing `--output` unless `--force`. Usage and input errors are one `error:` line (as eval.py's).
"""

import logging
import os
import sys

from absl import app, flags

from vidtok_jax.cli import flags as cli_flags
from vidtok_jax.cli import check_positive

FLAGS = flags.FLAGS
cli_flags.define_model_flags()
cli_flags.define_data_flags("train", "TFDS split; also the shard name prefix.",
                            "Resolution (short side resized, centre crop).",
                            "A record per window, or per video (first 16k(+1) frames, streamed "
                            "chunk by chunk).")
flags.DEFINE_string("out", None, "Output folder (local or gs://).")
flags.DEFINE_enum("store", "mean", ["mean", "mean_logvar", "sample"], "KL models: what to store.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "KL latent dtype.")
flags.DEFINE_integer("batch_size", 1, "Windows per local device per call.")
flags.DEFINE_integer("seed", 42, "Seed of sampled latents (--store=sample).")
flags.DEFINE_integer("videos_per_shard", 100, "Videos per shard.")
flags.DEFINE_integer("max_videos", 0, "Only the first N videos (0 = all).")
flags.DEFINE_bool("progress", True, "Progress bar.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
flags.DEFINE_string("decode", None, "A tokenized folder: decode record --index to --output.")
flags.DEFINE_integer("index", 0, "--decode: the record.")
flags.DEFINE_string("output", "decoded.mp4", "--decode: the video file written.")
flags.DEFINE_bool("force", False, "--decode: replace an existing --output file.")

INTERRUPTED = 3


def _config():
  config = FLAGS.config
  config.data.size = FLAGS.size
  if FLAGS.sample_fps:
    config.data.eval_sample_fps = FLAGS.sample_fps
  config.data.num_frames = FLAGS.num_frames or (17 if config.model.causal else 16)
  return config


def _decode(config, params):
  from vidtok_jax.data.tokens import TokenDataset
  from vidtok_jax.tokenize.decode import decode_record
  from vidtok_jax.inference.reconstruct import to_uint8, write_video

  ds = TokenDataset(FLAGS.decode)
  if not 0 <= FLAGS.index < len(ds):
    raise app.UsageError(f"--index {FLAGS.index} out of range: {FLAGS.decode} holds {len(ds)} "
                         f"records")
  rec = ds[FLAGS.index]
  video01 = decode_record(config, params, rec, ds.manifest)
  fps = ds.manifest["protocol"]["sample_fps"]
  write_video(FLAGS.output, to_uint8(video01), fps)
  logging.info("record %d (%s, window %d): %d frames -> %s", FLAGS.index, rec["path"],
               rec["window"], len(video01), FLAGS.output)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("vidtok_jax").setLevel(logging.INFO)
  source = cli_flags.weights_source(*cli_flags.one_of(cli_flags.WEIGHT_FLAGS))
  check_positive(size=FLAGS.size, sample_fps=FLAGS.sample_fps, num_frames=FLAGS.num_frames,
                 batch_size=FLAGS.batch_size, videos_per_shard=FLAGS.videos_per_shard)
  if FLAGS.max_videos < 0:
    raise app.UsageError(f"--max_videos must be >= 0, got {FLAGS.max_videos}")
  if FLAGS.decode:
    from vidtok_jax.files import refuse_existing
    from vidtok_jax.weights.load import load_params

    if "://" not in FLAGS.decode and not os.path.isdir(FLAGS.decode):
      raise app.UsageError(f"--decode {FLAGS.decode} is not a tokenized folder")
    refuse_existing([FLAGS.output], FLAGS.force)  # before the weights load
    config = _config()
    _decode(config, load_params(source, config, use_ema=FLAGS.use_ema))
    return
  if bool(FLAGS.data_dir) == bool(FLAGS.tfds_name):
    raise app.UsageError("give exactly one of --data_dir, --tfds_name")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  if FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir):
    raise app.UsageError(f"--data_dir {FLAGS.data_dir} " + (
        "is not a folder" if os.path.exists(FLAGS.data_dir) else "does not exist"))
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from vidtok_jax.tokenize import TokenizeJob, finalize_dir, folder_items
  from vidtok_jax.weights.load import load_params

  config = _config()
  params = load_params(source, config, use_ema=FLAGS.use_ema)
  sample_fps = config.data.eval_sample_fps
  if FLAGS.data_dir:
    from vidtok_jax.data import read_video_list

    paths, bad = read_video_list(FLAGS.data_dir, FLAGS.csv)
    for b in bad:
      logging.warning("CSV entry skipped: %s (%s)", b["path"], b["reason"])
    if not paths:
      raise app.UsageError(f"no videos found under {FLAGS.data_dir}")
    items = folder_items(paths, FLAGS.data_dir, sample_fps)
    data = {"data_dir": FLAGS.data_dir, "csv": FLAGS.csv}
  else:
    import tensorflow as tf  # the data stack's; keep it off the accelerators

    tf.config.set_visible_devices([], "GPU")
    from vidtok_jax.evaluation.evaluator import tfds_videos

    bad = []
    items = list(tfds_videos(FLAGS.tfds_name, FLAGS.split, FLAGS.tfds_data_dir, sample_fps))
    data = {"tfds_name": FLAGS.tfds_name, "split": FLAGS.split}
  if FLAGS.max_videos:
    items = items[:FLAGS.max_videos]
  job = TokenizeJob(config, params, FLAGS.out, split=FLAGS.split, mode=FLAGS.mode,
                    store=FLAGS.store, dtype=FLAGS.dtype, batch_size=FLAGS.batch_size,
                    seed=FLAGS.seed, videos_per_shard=FLAGS.videos_per_shard, source=data)
  result = job.run(items, skipped_inputs=bad, progress=FLAGS.progress, handle_sigterm=True,
                   finalize=not FLAGS.distributed)
  if result["status"] == "interrupted":
    sys.exit(INTERRUPTED)
  if FLAGS.distributed:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("vidtok_tokenize_shards_done")
    if jax.process_index() == 0:
      result["manifest"] = finalize_dir(FLAGS.out)
  manifest = result.get("manifest")
  if manifest:
    c = manifest["counts"]
    print(f"{c['records']} records from {c['videos_encoded']} of {c['videos']} videos "
          f"({c['videos_skipped']} skipped) in {c['shards']} shards -> "
          f"{os.path.join(FLAGS.out, 'manifest.json')}")
    for s in manifest["skipped"]:
      print(f"skipped {s['path']}: {s['reason']}: {s.get('message', '')}")
    if "rate" in manifest:
      from vidtok_jax.metrics.rate import format_rate

      print(format_rate(manifest["rate"]))


def run():
  """The console entry point (`vidtok-tokenize`): one-line errors (vidtok_jax.cli.run)."""
  from vidtok_jax.cli import run as run_command

  run_command(__name__, main)


if __name__ == "__main__":
  run()
