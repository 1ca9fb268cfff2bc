"""Clip sampling and frame preprocessing of VidTok's training loader, in numpy.

`sample_frame_indices` is the official `sample_frames_with_fps`; `resize_short_side_and_center_crop`
reproduces torchvision's `Resize(size, antialias=True)` (bilinear, PIL-style antialiasing) then
`CenterCrop`. These are the reference that the TF input pipeline is checked against; they are
plain numpy so the check needs neither torch nor PIL.
"""

import numpy as np


def frame_interval(fps: float, sample_fps: float) -> int:
  """Source frames between sampled frames: Python `round(fps / sample_fps)` (half to even), >= 1.

  The official code has no lower bound: for fps < sample_fps / 2 it gets 0 and its clip spans
  just two source frames. Clamping to 1 instead samples consecutive frames (the closest to the
  requested rate the video allows).
  """
  return max(1, round(fps / sample_fps))


def _span(total: int, fps: float, num_frames: int, sample_fps: float) -> tuple[int, int]:
  """(n, span): frames actually sampled and the source frames one clip covers."""
  n = min(num_frames, total)
  return n, (n - 1) * frame_interval(fps, sample_fps) + 1


def start_range(total: int, fps: float, num_frames: int, sample_fps: float) -> int:
  """Number of valid random start frames, `max(1, total - span)`.

  The official draw is `random.randint(0, total - span - 1)` (both ends inclusive), or 0 when
  that range is empty, so `start = floor(u * start_range)` with u uniform in [0, 1) draws the same
  distribution.
  """
  _, span = _span(total, fps, num_frames, sample_fps)
  return max(1, total - span)


def sample_frame_indices(total: int, fps: float, num_frames: int, sample_fps: float,
                         start: int | None = None,
                         rng: np.random.Generator | None = None) -> np.ndarray:
  """Indices of the frames of one clip: `int64 (n,)`, n = min(num_frames, total).

  Official formula: `linspace(start, min(total - 1, start + span), n)` truncated to int, where
  span = (n - 1) * interval + 1 — so the last step is slightly longer (n=17, interval 10 ->
  offsets 0, 10, ..., 150, 161). `start`: given, else uniform in `[0, start_range)` drawn with
  `rng` (default: a fresh unseeded generator). When total < num_frames the caller repeats the
  last frame (`pad_to_length`).
  """
  if total < 1:
    raise ValueError(f"total must be >= 1 frame, got {total}")
  n, span = _span(total, fps, num_frames, sample_fps)
  if start is None:
    rng = np.random.default_rng() if rng is None else rng
    start = int(rng.integers(0, start_range(total, fps, num_frames, sample_fps)))
  # np.linspace in float64 then astype(int) truncates toward zero, exactly as the official code.
  return np.linspace(start, min(total - 1, start + span), n).astype(np.int64)


# ------------------------------------------------------------------ resize + crop


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
  """torchvision `Resize(short)`: shorter side -> short, longer -> int(short * long / shorter)."""
  if width <= height:
    return int(short * height / width), short
  return short, int(short * width / height)


def _aa_bilinear_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Antialiased bilinear taps (PIL / torch `interpolate(antialias=True)`): indices and weights,
  both `(out_size, K)`; padded taps point at pixel 0 with weight 0.

  The triangle filter is stretched by the scale when downsampling (so every input pixel
  contributes: this is the antialiasing), rows are normalised to sum to 1.
  """
  scale = in_size / out_size
  support = max(scale, 1.0)  # bilinear support 1, widened by the downscale factor
  inv = 1.0 / support
  centers = (np.arange(out_size) + 0.5) * scale
  # int() truncation toward zero as in the C++ kernels (static_cast<int64_t>).
  xmin = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
  xmax = np.minimum(np.trunc(centers + support + 0.5), in_size).astype(np.int64)
  k = int(np.max(xmax - xmin))
  taps = np.arange(k)
  idx = xmin[:, None] + taps[None, :]
  w = np.clip(1.0 - np.abs((idx - centers[:, None] + 0.5) * inv), 0.0, None)
  w = np.where(taps[None, :] < (xmax - xmin)[:, None], w, 0.0)
  w /= w.sum(axis=1, keepdims=True)
  return np.where(w > 0, idx, 0), w


def _resize_axis(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
  """Antialiased bilinear resize of float64 `x` along `axis`."""
  if x.shape[axis] == out_size:
    return x
  idx, w = _aa_bilinear_weights(x.shape[axis], out_size)
  x = np.moveaxis(x, axis, -1)
  out = np.einsum("...ok,ok->...o", x[..., idx], w)  # gather K taps per output, weighted sum
  return np.moveaxis(out, -1, axis)


def resize_short_side_and_center_crop(frames: np.ndarray,
                                      size: int | tuple[int, int]) -> np.ndarray:
  """`(T, H, W, 3)` uint8 (0..255) or float ([0, 1]) -> float32 `(T, h, w, 3)` in [0, 1].

  `size` = (h, w) or an int for a square crop. As the official loader: the shorter side becomes
  h (`resized_size`, antialiased bilinear, computed in float64), then a centre crop of (h, w)
  at offsets `round((dim - crop) / 2)` (Python round, as torchvision); torchvision pads with
  zeros where the crop is larger than the resized frame, and so do we.
  """
  ch, cw = (size, size) if isinstance(size, int) else size
  x = np.asarray(frames)
  x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
  nh, nw = resized_size(x.shape[-3], x.shape[-2], ch)
  x = _resize_axis(_resize_axis(x, -3, nh), -2, nw)
  if ch > nh or cw > nw:  # torchvision center_crop: pad (left/top gets the floor half) first
    ph, pw = max(ch - nh, 0), max(cw - nw, 0)
    pad = [(0, 0)] * (x.ndim - 3) + [(ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)]
    x = np.pad(x, pad)
    nh, nw = x.shape[-3], x.shape[-2]
  top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
  return x[..., top:top + ch, left:left + cw, :].astype(np.float32)


def to_model_range(x) -> np.ndarray:
  """[0, 1] -> [-1, 1] (the official Normalize(mean=0.5, std=0.5)); float32, same shape."""
  return (np.asarray(x, np.float32) - 0.5) / 0.5


def pad_to_length(frames, n: int) -> np.ndarray:
  """`(T, ...)` -> `(max(T, n), ...)`: repeat the last frame until there are n (never truncates)."""
  frames = np.asarray(frames)
  if len(frames) == 0:
    raise ValueError("pad_to_length needs at least one frame")
  if len(frames) >= n:
    return frames
  return np.concatenate([frames, np.repeat(frames[-1:], n - len(frames), axis=0)])


LONG_CHUNK = 16  # The official evaluation's long mode: clips of 16k (+ 1 causal) frames


def eval_windows(n: int, num_frames: int) -> list:
  """Evaluation windows of `n` sampled frames: index arrays of consecutive, non-overlapping
  `num_frames`-long windows, the last partial one padded by repeating its last index."""
  return [pad_to_length(np.arange(a, min(a + num_frames, n)), num_frames)
          for a in range(0, n, num_frames)]


def long_clip_frames(n: int, causal: bool) -> int:
  """Long mode: frames kept of `n` sampled ones, 16 * floor((n - 1) / 16) + 1 (causal,
  needs n > 16) or 16 * floor(n / 16) (non-causal, needs n >= 16); 0 when too short."""
  if causal:
    return LONG_CHUNK * ((n - 1) // LONG_CHUNK) + 1 if n > LONG_CHUNK else 0
  return LONG_CHUNK * (n // LONG_CHUNK)
