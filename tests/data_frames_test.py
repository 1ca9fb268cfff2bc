"""The streamed frame path (`vidtok_jax/data/frames.py`, `decode.FrameStream`): the same frames,
resized values and windows as the whole-video functions, bounded prefetching."""

import importlib
import threading
import time

import av
import numpy as np
import pytest

from vidtok_jax.data import frames, sampling
from vidtok_jax.data.decode import FrameStream, VideoDecodeError, decode


def write_clip(path, n=23, h=36, w=52, fps=30):
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    rng = np.random.default_rng(0)
    for i in range(n):
      f = av.VideoFrame.from_ndarray(rng.integers(0, 256, (h, w, 3), np.uint8), format="rgb24")
      f.pts = i
      c.mux(s.encode(f))
    c.mux(s.encode())
  return path


def test_frame_stream_samples_the_decoded_frames(tmp_path, monkeypatch):
  path = write_clip(tmp_path / "c.mp4")
  whole, info = decode(path)
  # (the package's `decode` attribute is the function: patch the module)
  monkeypatch.setattr(importlib.import_module("vidtok_jax.data.decode"), "CHUNK", 4)
  with FrameStream(path, sample_fps=10) as s:  # 30 fps at 10: every 3rd frame
    assert s.interval == 3 and s.fps == pytest.approx(30)
    chunks = list(s)
  assert [len(c) for c in chunks] == [4, 4]  # 8 of 23 frames, 4 per chunk
  np.testing.assert_array_equal(np.concatenate(chunks), whole[::3])
  assert s.info == info  # exact count once read to the end
  with FrameStream(path) as s:
    assert sum(len(c) for c in s) == 23


def test_resize_and_windows_equal_the_whole_video_functions():
  x = np.random.default_rng(1).integers(0, 256, (23, 40, 60, 3), np.uint8)
  chunks = [x[:5], x[5:6], x[6:23]]
  got = np.concatenate(list(frames.resized(chunks, (16, 24))))
  np.testing.assert_array_equal(got, sampling.resize_short_side_and_center_crop(x, (16, 24)))
  for pad in (True, False):
    w = frames.Windows(iter([got[:7], got[7:8], got[8:]]), 9, pad_last=pad)
    out = list(w)
    assert w.frames == 23
    want = [got[i] for i in sampling.eval_windows(23, 9)]
    assert len(out) == (3 if pad else 2)
    for (win, n), ref, n_ref in zip(out, want, (9, 9, 5)):
      np.testing.assert_array_equal(win, ref)
      assert n == n_ref
  assert list(frames.Windows(iter([got[:4]]), 9, pad_last=False)) == []


def test_a_source_error_is_marked_and_others_are_not():
  def broken():
    yield np.zeros((2, 8, 8, 3), np.uint8)
    raise VideoDecodeError("x.mp4", "truncated", "cut")

  with pytest.raises(frames.SourceError, match="x.mp4: truncated") as e:
    list(frames.resized(broken(), 4))
  assert e.value.reason == "truncated" and isinstance(e.value.original(), VideoDecodeError)
  with pytest.raises(Exception) as e:  # the resize's own failure: not the video's
    list(frames.resized([np.zeros((1, 8), np.uint8)], 4))
  assert not isinstance(e.value, frames.SourceError)


def test_prefetch_keeps_order_bounds_the_lead_and_stops_on_close():
  made = []

  def source(k):
    def gen():
      for j in range(50):
        made.append((k, j))
        yield k, j
    return gen

  feeds = frames.prefetch([source(k) for k in range(4)], ahead=2, depth=3)
  first = next(feeds)
  assert list(first)[:2] == [(0, 0), (0, 1)]
  second = next(feeds)
  time.sleep(0.3)
  assert next(iter(second)) == (1, 0)
  # Source 1 was read at most depth + 2 items ahead (queue, one blocked put, one in hand);
  # source 2 has started, source 3 has not.
  assert sum(k == 1 for k, _ in made) <= 6 and any(k == 2 for k, _ in made)
  assert not any(k == 3 for k, _ in made)
  feeds.close()
  assert not [t for t in threading.enumerate() if t.name == "vidtok-prefetch"]


def test_prefetch_hands_a_source_error_to_the_consumer():
  def bad():
    yield 1
    raise KeyError("boom")

  feeds = frames.prefetch([bad, lambda: iter([2])], ahead=2, depth=1)
  with pytest.raises(KeyError, match="boom"):
    list(next(feeds))
  assert list(next(feeds)) == [2]
  feeds.close()
