r"""Train a VidTok tokenizer: both stages, every variant, on any JAX mesh.

  python train.py --config=configs/vidtok.py:kl_causal_488_4chn,stage=1 --workdir=runs/s1 \
      --config.data.dir=/path/to/videos
  vidtok-train --config=configs/vidtok.py:kl_causal_488_4chn,stage=2 --workdir=runs/s2 \
      --config.data.dir=/path/to/videos --config.train.init_from=runs/s1

Any config field can be overridden with `--config.FIELD=VALUE` (e.g. `--config.total_steps=N`,
`--config.checkpoint_every=N`, `--config.train.dtype=bfloat16`, `--config.eval_every=0` for no
validation). The video folder is built once into a TFDS dataset under `$VIDTOK_TFDS_DIR`, else
`~/tensorflow_datasets` (`--config.data.tfds_data_dir=DIR` moves it). Rerunning the same command in
the same workdir resumes from its latest good checkpoint. On a multi-host TPU slice / GPU
cluster add `--distributed` (calls `jax.distributed.initialize()`; every host runs the same
command and reads its own share of each batch). With `--distributed`, an error in any process
ends every process of the job with a non-zero status (within about a minute), and
SIGTERM to all processes saves the same step on all and exits 0.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/vidtok.py:VARIANT[,stage=N][,tiny]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints and TensorBoard events.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs); "
                  "the cluster (TPU pod, SLURM, Open MPI) is auto-detected unless the three "
                  "flags below are given.")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])

# `jax.distributed.initialize` settings (coordination service). A process that stops sending
# heartbeats (killed, hung host) is declared dead after HEARTBEAT_TIMEOUT_S; the service then
# ends every other process (XLA's missed-heartbeat handler aborts it), so nothing waits for it in
# a barrier or collective. JAX's default is 100 s; 60 s keeps a failure's end under 2 minutes.
# Heartbeats come from a background thread, so long compiles do not miss them.
HEARTBEAT_TIMEOUT_S = 60
# How long a finishing process waits at exit for the others to finish too (JAX default 300 s):
# they end the same last step within seconds of each other.
SHUTDOWN_TIMEOUT_S = 120


def _quiet_orbax(record) -> bool:
  return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # the input pipeline's; keep it off the accelerators

  tf.config.set_visible_devices([], "GPU")
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                               shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  from vidtok_jax.train.loop import NonFiniteError, train_and_evaluate

  logging.getLogger("vidtok_jax").setLevel(logging.INFO)
  for h in logging.getLogger().handlers:  # Orbax narrates every save at INFO; keep its warnings
    h.addFilter(_quiet_orbax)
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except NonFiniteError as e:
    logging.error("%s", e)
    sys.exit(3)


def run():
  """The console entry point (`vidtok-train`)."""
  from vidtok_jax.cli import run as run_command

  # With --distributed a failed process exits at once (`os._exit`, after printing its error):
  # the normal interpreter exit would wait in `jax.distributed.shutdown` for peers that wait in
  # a collective for it, and the job would hang. Peers see it gone and end too.
  run_command(__name__, main, hard_exit_when=lambda: FLAGS.distributed)


if __name__ == "__main__":
  run()
