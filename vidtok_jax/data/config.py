"""Data config: every `config.data.*` field of the input pipeline, with its default and meaning.

    from vidtok_jax.data import data_config
    config.data = data_config(dir="videos/", csv="videos/train.csv", size=256)

Exactly one source is used: a folder of videos (`dir`, built once into a TFDS dataset under
`tfds_data_dir` by `build_video_folder`) or a prepared TFDS dataset by name (`tfds_name`, e.g.
"ucf101", "bair_robot_pushing_small", "video_folder/my_config"). `dir` wins when both are set.
`resolve(config)` validates a config and raises ValueError naming the bad field.
"""

import os

import ml_collections
from ml_collections import config_dict

# Field -> (default, one-line meaning). The single source of truth for names and defaults.
FIELDS = dict(
    dir=(None, "folder of videos (mp4/webm/mkv/avi/mov/gif); built into TFDS on first use"),
    csv=(None, "VidTok meta CSV (header `videos`, paths relative to `dir`): the train split"),
    tfds_name=(None, "prepared TFDS dataset name[/config][:version], used when `dir` is None"),
    tfds_data_dir=(None, "TFDS data dir; None: $VIDTOK_TFDS_DIR, else ~/tensorflow_datasets"),
    train_split="train",
    eval_split="validation",
    num_frames=(17, "frames per clip: 17 causal (1 + 4k), 16 non-causal"),
    causal=(None, "None: odd num_frames means causal; picks the long-video frame rule"),
    sample_fps=(3.0, "training frame rate: frame interval = round(fps / sample_fps), >= 1"),
    eval_sample_fps=(8.0, "evaluation frame rate (officially 8, from frame 0)"),
    size=(128, "output size: int (square) or (height, width); the short side is resized to height"),
    store_short_side=(256, "folder builds store frames with short side <= this (None: native); "
                           "must be >= the training size or frames get upsampled"),
    default_fps=(25.0, "fps assumed for TFDS datasets that store none (ucf101, bair, ...)"),
    global_batch_size=(16, "clips per step over all hosts; each host gets global / process_count"),
    seed=(0, "data seed: epoch permutations and clip starts derive from (seed, step)"),
    strict=(False, "raise on the first bad video / record instead of skipping and logging it"),
    num_parallel_calls=(-1, "tf.data parallelism of fetch/decode/resize; -1 = AUTOTUNE"),
    prefetch=(2, "batches prefetched by tf.data"),
    min_side=(16, "videos whose shorter side is below this are skipped (reason too_small)"),
    shuffle_buffer=(256, "streaming (tfrecord) datasets only: example shuffle buffer"),
)
FIELDS = {k: v if isinstance(v, tuple) else (v, "") for k, v in FIELDS.items()}
_NONE_TYPES = dict(dir=str, csv=str, tfds_name=str, tfds_data_dir=str, causal=bool,
                   store_short_side=int)


def default_tfds_data_dir() -> str:
  """`$VIDTOK_TFDS_DIR`, else `~/tensorflow_datasets` (TFDS's own default)."""
  return os.environ.get("VIDTOK_TFDS_DIR") or os.path.expanduser("~/tensorflow_datasets")


def data_config(**overrides) -> ml_collections.ConfigDict:
  """A `ConfigDict` of all data fields (defaults in `FIELDS`), with `overrides` applied.

  Unknown override names raise ValueError. `size` may be given as an int or a (h, w) pair.
  """
  unknown = sorted(set(overrides) - set(FIELDS))
  if unknown:
    raise ValueError(f"data config: unknown field(s) {unknown}; known: {sorted(FIELDS)}")
  values = {k: v[0] for k, v in FIELDS.items()}
  values.update(overrides)
  for k, v in values.items():  # typed None: `--config.data.dir=...` overrides need the type
    if v is None and k in _NONE_TYPES:
      values[k] = config_dict.placeholder(_NONE_TYPES[k])
  if isinstance(values["size"], list):
    values["size"] = tuple(values["size"])
  # type_safe=False: `size` may switch between int and (h, w) in an override.
  return ml_collections.ConfigDict(values, type_safe=False)


def data_fields(config) -> ml_collections.ConfigDict:
  """The data ConfigDict of a full config (`config.data`) or of a data config itself."""
  if config is None:
    raise ValueError("config is None")
  if "data" in config and not isinstance(config["data"], (str, type(None))):
    return config.data
  return config


def size_hw(size) -> tuple[int, int]:
  """`size` (int or (h, w)) -> (h, w)."""
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def is_causal(cfg) -> bool:
  """`cfg.causal`, or when None, odd `num_frames` (17, 33: causal 1 + 4k)."""
  causal = cfg.get("causal", None)
  return bool(cfg.num_frames % 2 == 1) if causal is None else bool(causal)


def resolve(config, process_count: int = 1) -> ml_collections.ConfigDict:
  """Validated copy of the data fields (missing ones filled with defaults).

  Raises ValueError naming the field: no source, non-positive sizes/rates, a global batch not
  divisible by `process_count`, a store size smaller than the training size.
  """
  given = data_fields(config)
  unknown = sorted(set(given.keys()) - set(FIELDS))
  if unknown:
    raise ValueError(f"config.data.{unknown[0]}: unknown field; known: {sorted(FIELDS)}")
  cfg = data_config(**{k: given[k] for k in given.keys()})
  if cfg.dir is None and cfg.tfds_name is None:
    raise ValueError("config.data.dir / config.data.tfds_name: neither is set; give a folder of "
                     "videos (dir) or a prepared TFDS dataset name (tfds_name)")
  if cfg.dir is not None and not os.path.isdir(cfg.dir):
    raise ValueError(f"config.data.dir: {cfg.dir!r} " + (
        "is not a directory" if os.path.exists(cfg.dir) else "does not exist"))
  if cfg.csv is not None and cfg.dir is None:
    raise ValueError("config.data.csv: needs config.data.dir (paths in it are relative to dir)")
  if cfg.tfds_data_dir is None:
    cfg.tfds_data_dir = default_tfds_data_dir()
  for name in ("num_frames", "global_batch_size", "prefetch", "min_side", "shuffle_buffer"):
    if not isinstance(cfg[name], int) or cfg[name] < 1:
      raise ValueError(f"config.data.{name}: must be a positive int, got {cfg[name]!r}")
  for name in ("sample_fps", "eval_sample_fps", "default_fps"):
    if not float(cfg[name]) > 0:
      raise ValueError(f"config.data.{name}: must be > 0, got {cfg[name]!r}")
  try:
    h, w = size_hw(cfg.size)
  except (TypeError, ValueError):
    raise ValueError(f"config.data.size: int or (height, width), got {cfg.size!r}") from None
  if h < 1 or w < 1:
    raise ValueError(f"config.data.size: must be positive, got {cfg.size!r}")
  if cfg.dir is not None and cfg.store_short_side is not None and cfg.store_short_side < h:
    raise ValueError(f"config.data.store_short_side: {cfg.store_short_side} < training height {h}"
                     "; stored frames would be upsampled (raise it or set None for native)")
  if cfg.num_parallel_calls != -1 and cfg.num_parallel_calls < 1:
    raise ValueError(f"config.data.num_parallel_calls: -1 (AUTOTUNE) or >= 1, got "
                     f"{cfg.num_parallel_calls!r}")
  if process_count < 1 or cfg.global_batch_size % process_count:
    raise ValueError(f"config.data.global_batch_size: {cfg.global_batch_size} is not divisible by "
                     f"the process count {process_count}")
  return cfg
