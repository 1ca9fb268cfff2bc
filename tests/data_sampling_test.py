"""vidtok_jax.data.sampling: the official frame sampling formula and torchvision resize + crop."""

import math
import random

import numpy as np
import pytest

from vidtok_jax.data.sampling import (frame_interval, pad_to_length, resize_short_side_and_center_crop,
                                      resized_size, sample_frame_indices, start_range,
                                      to_model_range)


def official_indices(total, fps, n, sample_fps, start):
  """VidTok `sample_frames_with_fps` (SPEC §8) with the start given, verbatim but for the name."""
  n = min(n, total)
  interval = round(fps / sample_fps)
  frames_range = (n - 1) * interval + 1
  return np.linspace(start, min(total - 1, start + frames_range), n).astype(int)


def test_spec_example():
  idx = sample_frame_indices(300, 30.0, 17, 3.0, start=0)
  assert idx.dtype == np.int64
  np.testing.assert_array_equal(idx, [*range(0, 151, 10), 161])  # last step 11: linspace 10.0625
  np.testing.assert_array_equal(sample_frame_indices(300, 30.0, 17, 3.0, start=7), idx + 7)


@pytest.mark.parametrize("total", [1, 5, 16, 17, 36, 161, 162, 163, 300, 768])
@pytest.mark.parametrize("fps,sample_fps", [(30, 3), (29.97, 3), (10.505, 3), (25, 10), (24, 8),
                                            (30, 30), (30.02, 15)])
def test_matches_official_formula(total, fps, sample_fps):
  for n in (1, 4, 17):
    for start in range(start_range(total, fps, n, sample_fps)):
      idx = sample_frame_indices(total, fps, n, sample_fps, start=start)
      np.testing.assert_array_equal(idx, official_indices(total, fps, n, sample_fps, start))
      assert len(idx) == min(n, total) and 0 <= idx.min() and idx.max() <= total - 1


def test_short_videos():
  # total < span (161): the only start is 0 and the last index is clipped to total - 1.
  assert start_range(100, 30, 17, 3) == 1
  idx = sample_frame_indices(100, 30, 17, 3, rng=np.random.default_rng(0))
  np.testing.assert_array_equal(idx, np.linspace(0, 99, 17).astype(int))
  # total == span: randint(0, -1) is empty in the official code, so start 0 too.
  assert start_range(161, 30, 17, 3) == 1 and start_range(162, 30, 17, 3) == 1
  assert start_range(163, 30, 17, 3) == 2
  # total < n: n shrinks to total (the caller pads); fire2 (25 frames, 10.505 fps) at 3 fps.
  np.testing.assert_array_equal(sample_frame_indices(10, 30, 17, 3, start=0), np.arange(10))
  idx = sample_frame_indices(25, 10.505, 17, 3, start=0)
  assert len(idx) == 17 and idx[0] == 0 and idx[-1] == 24


def test_round_half_to_even():
  assert frame_interval(25, 10) == 2  # 2.5 -> 2
  assert frame_interval(35, 10) == 4  # 3.5 -> 4
  assert frame_interval(15, 10) == 2  # 1.5 -> 2
  assert frame_interval(45, 10) == 4  # 4.5 -> 4
  assert frame_interval(10.505, 3) == 4 and frame_interval(29.97, 3) == 10
  assert frame_interval(10, 30) == 1  # official round gives 0; clamped so frames still advance
  np.testing.assert_array_equal(sample_frame_indices(300, 25, 3, 10, start=0), [0, 2, 5])


def test_random_starts():
  total, fps, n, sfps = 300, 30, 17, 3
  count = start_range(total, fps, n, sfps)
  assert count == total - 161  # random.randint(0, total - span - 1) has total - span values
  draws = [sample_frame_indices(total, fps, n, sfps, rng=np.random.default_rng(s))[0]
           for s in range(2000)]
  assert min(draws) == 0 and max(draws) == count - 1  # the whole range, nothing outside
  assert len(set(draws)) > 0.9 * count
  rng_a, rng_b = np.random.default_rng(42), np.random.default_rng(42)
  for _ in range(5):
    np.testing.assert_array_equal(sample_frame_indices(total, fps, n, sfps, rng=rng_a),
                                  sample_frame_indices(total, fps, n, sfps, rng=rng_b))
  # The official draw has the same support.
  official = {random.Random(s).randint(0, total - 161 - 1) for s in range(2000)}
  assert official <= set(range(count))


@pytest.mark.parametrize("total", [1, 17, 100, 161, 162, 200, 768])
def test_start_range_with_uniform_draw(total):
  """The pipeline draws start = floor(u * start_range) for u in [0, 1): every such start is valid."""
  count = start_range(total, 30, 17, 3)
  starts = {math.floor(u * count) for u in np.linspace(0, 1, 1001, endpoint=False)}
  assert starts == set(range(count))
  for start in starts:
    idx = sample_frame_indices(total, 30, 17, 3, start=start)
    assert idx.max() <= total - 1 and len(idx) == min(17, total)


# ------------------------------------------------------------------ resize + crop


def test_torchvision_long_side_rule():
  assert resized_size(720, 1280, 256) == (256, 455)  # int(455.1)
  assert resized_size(1280, 720, 256) == (455, 256)
  assert resized_size(272, 640, 64) == (64, 150)  # int(150.6): truncation, not rounding
  assert resized_size(256, 256, 128) == (128, 128)
  assert resized_size(360, 864, 128) == (128, 307)


@pytest.mark.parametrize("hw,size,out", [((72, 128), (32, 32), (32, 32)),
                                         ((128, 72), (32, 24), (32, 24)),
                                         ((64, 64), 24, (24, 24)),
                                         ((27, 64), (17, 33), (17, 33))])
def test_resize_shapes_and_range(hw, size, out):
  frames = np.random.default_rng(0).integers(0, 256, (3, *hw, 3), dtype=np.uint8)
  frames[0] = 0
  frames[1] = 255
  y = resize_short_side_and_center_crop(frames, size)
  assert y.shape == (3, *out, 3) and y.dtype == np.float32
  assert y.min() >= 0 and y.max() <= 1
  np.testing.assert_allclose(y[0], 0, atol=1e-6)
  np.testing.assert_allclose(y[1], 1, atol=1e-6)
  # Float input in [0, 1] is taken as is.
  np.testing.assert_allclose(resize_short_side_and_center_crop(frames / 255.0, size), y, atol=1e-6)


@pytest.mark.parametrize("width,left", [(13, 2), (15, 4), (14, 3), (8, 0)])
def test_center_crop_offsets(width, left):
  """No rescale (short side == crop height): the crop is the slice at round((W - w) / 2),
  Python's half-to-even round as torchvision (5 / 2 -> 2, 7 / 2 -> 4)."""
  cols = np.broadcast_to(np.arange(width, dtype=np.float32)[None, None, :, None] / 255,
                         (1, 8, width, 3))
  y = resize_short_side_and_center_crop(cols, (8, 8))
  np.testing.assert_allclose(y[0, 0, :, 0] * 255, np.arange(left, left + 8), atol=1e-4)
  rows = np.swapaxes(cols, 1, 2)  # portrait: the vertical offset follows the same rule
  y = resize_short_side_and_center_crop(rows, (8, 8))
  np.testing.assert_allclose(y[0, :, 0, 0] * 255, np.arange(left, left + 8), atol=1e-4)


def test_crop_wider_than_frame_pads_like_torchvision():
  frames = np.ones((1, 8, 8, 3), np.uint8) * 255
  y = resize_short_side_and_center_crop(frames, (8, 11))  # pad 3 columns: 1 left, 2 right
  np.testing.assert_array_equal(y[0, 0, :, 0], [0] + [1] * 8 + [0, 0])


def test_downscale_is_antialiased():
  """A 1-pixel checkerboard halved becomes flat grey (plain bilinear sampling would alias)."""
  board = ((np.indices((64, 96)).sum(0) % 2) * 255).astype(np.uint8)
  frames = np.repeat(board[None, ..., None], 3, axis=-1)
  y = resize_short_side_and_center_crop(frames, 32)
  np.testing.assert_allclose(y, 0.5, atol=1e-6)


@pytest.mark.parametrize("hw,size", [((72, 128), (32, 32)), ((90, 50), (40, 24)),
                                     ((40, 60), (96, 96)), ((33, 33), (17, 17))])
def test_matches_torch_antialiased_bilinear(hw, size):
  """The official transform: torchvision Resize(h, antialias=True) = F.interpolate(bilinear,
  antialias=True) to `resized_size`, then CenterCrop."""
  torch = pytest.importorskip("torch")
  frames = np.random.default_rng(1).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
  x = torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255
  nh, nw = resized_size(*hw, size[0])
  ref = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                                        antialias=True)
  top, left = int(round((nh - size[0]) / 2.0)), int(round((nw - size[1]) / 2.0))
  ref = ref[..., top:top + size[0], left:left + size[1]].permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(resize_short_side_and_center_crop(frames, size), ref, atol=1e-6)


def test_to_model_range():
  np.testing.assert_array_equal(to_model_range([0.0, 0.25, 0.5, 1.0]), [-1, -0.5, 0, 1])
  assert to_model_range(np.zeros((2, 2), np.float64)).dtype == np.float32


def test_pad_to_length():
  frames = np.arange(3 * 2 * 2 * 3).reshape(3, 2, 2, 3)
  out = pad_to_length(frames, 5)
  assert out.shape == (5, 2, 2, 3)
  np.testing.assert_array_equal(out[:3], frames)
  np.testing.assert_array_equal(out[3], frames[2])
  np.testing.assert_array_equal(out[4], frames[2])
  assert pad_to_length(frames, 3) is frames and pad_to_length(frames, 2) is frames
  with pytest.raises(ValueError):
    pad_to_length(frames[:0], 4)
