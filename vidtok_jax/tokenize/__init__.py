"""Dataset tokenization: `python -m vidtok_jax.tokenize` and its library (`TokenizeJob`).

    from vidtok_jax.tokenize import TokenizeJob, folder_items
    job = TokenizeJob(config, params, "tokens/", mode="clips")
    job.run(folder_items(paths, data_dir, sample_fps))

Read the result with `vidtok_jax.data.tokens`.
"""

import os

from vidtok_jax.tokenize.job import (
  JobMismatchError,
  Moments,
  TokenizeJob,
  finalize_dir,
  fsq_codes,
  token_dtype,
)


def folder_items(paths, root, sample_fps: float):
  """`evaluation.folder_videos` items named by their path relative to `root` (so the records
  and the job identity do not depend on where the dataset is mounted)."""
  from vidtok_jax.data.decode import printable_path
  from vidtok_jax.evaluation.evaluator import folder_videos

  items = list(folder_videos(paths, sample_fps))
  for item in items:
    item.path = printable_path(os.path.relpath(item.path, root))
  return items


__all__ = ["JobMismatchError", "Moments", "TokenizeJob", "finalize_dir", "folder_items",
           "fsq_codes", "token_dtype"]
