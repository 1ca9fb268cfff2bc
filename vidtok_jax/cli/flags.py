"""Command-line flags shared by `eval.py`, `reconstruct.py` and the tokenizer command: the model
config and where its weights come from (loaded by `vidtok_jax.weights.load.load_params`;
`weights_source` turns the chosen flag into its argument)."""

import os

from absl import app, flags
from ml_collections import config_flags

WEIGHT_FLAGS = ("workdir", "checkpoint", "torch_checkpoint", "pretrained")
# Flags naming something other than a local path (never checked for existence).
NOT_PATHS = ("pretrained",)


def define_pretrained_flag():
  """`--pretrained=NAME`: the official weights of variant NAME from the Hugging Face hub."""
  flags.DEFINE_string("pretrained", None, "Official variant whose released weights to use, "
                      "fetched from the Hugging Face hub (microsoft/VidTok) and cached, e.g. "
                      "kl_causal_488_4chn (HF_HOME / HF_HUB_OFFLINE apply).")


def define_data_flags(split: str, split_help: str, size_help: str, mode_help: str, *,
                      sample_fps=None, sample_fps_help: str = "Frame rate frames are sampled at "
                      "(default: the config's data.eval_sample_fps)."):
  """The video source (`--data_dir` [+ `--csv`] or `--tfds_name` + `--split`) and the clip
  protocol (`--size`, `--sample_fps`, `--num_frames`, `--mode`) of eval.py and tokenize
  (eval.py's `--sample_fps` defaults to the official evaluation's 30)."""
  from absl import flags

  flags.DEFINE_string("data_dir", None, "Folder of videos (searched recursively).")
  flags.DEFINE_string("csv", None, "VidTok meta CSV (header `videos`) relative to --data_dir.")
  flags.DEFINE_string("tfds_name", None, "Prepared TFDS dataset instead of --data_dir.")
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data dir for --tfds_name.")
  flags.DEFINE_string("split", split, split_help)
  flags.DEFINE_integer("size", 256, size_help)
  flags.DEFINE_float("sample_fps", sample_fps, sample_fps_help)
  flags.DEFINE_integer("num_frames", None, "Window length (default: 17 causal, 16 non-causal).")
  flags.DEFINE_enum("mode", "clips", ["clips", "long"], mode_help)


def define_model_flags():
  """`--config` and exactly-one-of `--workdir` / `--checkpoint` / `--torch_checkpoint` /
  `--pretrained`, plus `--use_ema`."""
  config_flags.DEFINE_config_file("config", None, "configs/vidtok.py:VARIANT[,tiny]",
                                  lock_config=False)
  flags.DEFINE_string("workdir", None, "Train workdir (its latest good checkpoint).")
  flags.DEFINE_string("checkpoint", None, "Checkpoints folder, step folder or `convert to-flax` "
                      "folder.")
  flags.DEFINE_string("torch_checkpoint", None, "Official .ckpt / .safetensors file.")
  define_pretrained_flag()
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
  if given[0] in NOT_PATHS:
    return given[0], value
  if not os.path.exists(value):
    raise app.UsageError(f"--{given[0]} {value} does not exist")
  return given[0], value


def weights_source(kind, value) -> str:
  """The `load_params` source for the weight flag `kind` (`--pretrained=N` -> `hf:N`)."""
  return f"hf:{value}" if kind == "pretrained" else value
