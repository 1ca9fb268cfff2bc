"""Every reader of user videos reads the stream FFmpeg picks and records which (multi-stream
files): evaluation, reconstruction and the TFDS dataset build (hence training and the check CLI).
"""

import numpy as np
from multistream import BEST_INDEX, LARGE, write_two_stream_video

from vidtok_jax.evaluation import evaluator as evaluation

from vidtok_jax.inference import reconstruct


def test_eval_videos_read_and_record_the_best_stream(tmp_path):
  path = write_two_stream_video(tmp_path / "two.mp4")
  item = next(evaluation.folder_videos([path], sample_fps=30.0))
  frames, fps = item.load()
  assert frames.shape[:3] == (LARGE[3], LARGE[1], LARGE[0]) and fps == LARGE[2]
  assert item.info == {"stream": BEST_INDEX, "video_streams": 2}  # copied into the JSON row


def test_reconstruct_reads_and_records_the_best_stream(tmp_path):
  path = write_two_stream_video(tmp_path / "two.mp4")
  frames01, info = reconstruct.load_video(path, (32, 32), sample_fps=30.0)
  assert len(frames01) == LARGE[3] and info["source_size"] == [LARGE[1], LARGE[0]]
  assert (info["stream"], info["video_streams"]) == (BEST_INDEX, 2)


def test_dataset_build_records_the_stream(tmp_path):
  from vidtok_jax.data.tfds_builder import build_video_folder

  folder = tmp_path / "videos"
  (folder / "train").mkdir(parents=True)
  (folder / "val").mkdir()
  write_two_stream_video(folder / "train" / "two.mp4")
  write_two_stream_video(folder / "val" / "two.mp4")
  builder = build_video_folder(folder, tmp_path / "tfds", store_short_side=64)
  rows = builder.info.metadata["videos"]
  assert [(r["stream"], r["video_streams"], r["num_frames"]) for r in rows] == [
      (BEST_INDEX, 2, LARGE[3])] * 2
  ex = next(iter(builder.as_data_source("train")))
  assert int(ex["num_frames"]) == LARGE[3] and np.asarray(ex["orig_width"]) == LARGE[0]
