"""Command-line flags shared by `eval.py` and `reconstruct.py`: the model config and where its
weights come from (loaded by `vidtok_jax.train.checkpoint.load_init_params`)."""

import os

from absl import app, flags
from ml_collections import config_flags

WEIGHT_FLAGS = ("workdir", "checkpoint", "torch_checkpoint")


def define_model_flags():
  """`--config` and exactly-one-of `--workdir` / `--checkpoint` / `--torch_checkpoint`, plus
  `--use_ema`."""
  config_flags.DEFINE_config_file("config", None, "configs/vidtok.py:VARIANT[,tiny]",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Train workdir (its latest good checkpoint).")
  flags.DEFINE_string("checkpoint", None, "Checkpoints folder, step folder or `convert to-flax` "
                      "folder.")
  flags.DEFINE_string("torch_checkpoint", None, "Official .ckpt / .safetensors file.")
  flags.DEFINE_bool("use_ema", False, "Use the EMA weights of a train checkpoint.")
  flags.mark_flags_as_required(["config"])


def one_of(names) -> tuple:
  """`(name, value)` of the one flag of `names` that is set and names an existing path;
  `app.UsageError` otherwise."""
  given = [n for n in names if flags.FLAGS[n].value]
  if len(given) != 1:
    raise app.UsageError(f"give exactly one of {', '.join('--' + n for n in names)} "
                         f"(got {', '.join('--' + g for g in given) or 'none'})")
  value = flags.FLAGS[given[0]].value
  if not os.path.exists(value):
    raise app.UsageError(f"--{given[0]} {value} does not exist")
  return given[0], value
