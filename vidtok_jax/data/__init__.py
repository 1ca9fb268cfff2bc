"""Video data: PyAV decoding, the official clip sampling, a TFDS builder and the tf.data pipeline.

    from vidtok_jax.data import data_config, make_train_iterator
    config.data = data_config(dir="videos/", size=128, global_batch_size=16)
    it = make_train_iterator(config, start_step=0)   # step-indexed: restart at any step
    batch = next(it)["video"]                         # float32 (B_host, 17, 128, 128, 3), [-1, 1]

Check a folder before training: `python -m vidtok_jax.data --dir FOLDER [--csv FILE]`.
Names that need TensorFlow (builder, pipeline) are imported on first use, so decoding and
sampling stay light.
"""

import importlib

from vidtok_jax.data.config import data_config, resolve
from vidtok_jax.data.decode import (
  VIDEO_EXTENSIONS,
  VideoDecodeError,
  VideoInfo,
  decode,
  probe,
  read_video_list,
)
from vidtok_jax.data.sampling import (
  frame_interval,
  pad_to_length,
  resize_short_side_and_center_crop,
  sample_frame_indices,
  start_range,
  to_model_range,
)

_LAZY = {
    "build_video_folder": "tfds_builder", "VideoFolder": "tfds_builder",
    "discover_splits": "tfds_builder", "skipped_files": "tfds_builder",
    "make_train_iterator": "pipeline", "TrainIterator": "pipeline",
    "iterate_eval_clips": "pipeline", "iterate_long_videos": "pipeline",
    "open_builder": "pipeline", "Source": "pipeline",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"vidtok_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'vidtok_jax.data' has no attribute {name!r}")


__all__ = ["VIDEO_EXTENSIONS", "VideoDecodeError", "VideoInfo", "data_config", "decode",
           "frame_interval", "pad_to_length", "probe", "read_video_list", "resize_short_side_and_center_crop",
           "resolve", "sample_frame_indices", "start_range", "to_model_range", *_LAZY]
