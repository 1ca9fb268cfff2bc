"""Video files in and out for reconstruction: sampled, resized frames in; H.264 files out.

    frames01, info = load_video("clip.mp4", (256, 256), sample_fps=30)
    windows = split_windows(frames01, 17)                 # (K, 17, 256, 256, 3), tail dropped
    write_video("clip_recon.mp4", to_uint8(recon01), fps=30)
    with VideoWriter("long.mp4", 256, 256, fps=30) as w:  # batch by batch
      w.write(batch_u8)

Every file is written under a temporary name and renamed when complete (`vidtok_jax.files`).
"""

import contextlib
import fractions
import logging
from typing import Optional

import numpy as np

from vidtok_jax.data import frames as frames_lib
from vidtok_jax.data import sampling
from vidtok_jax.data.decode import FrameStream
from vidtok_jax.files import atomic_path

log = logging.getLogger("vidtok_jax.inference.video_io")


# ------------------------------------------------------------------ video in


def lossy_crop(src_h: int, src_w: int, size) -> Optional[str]:
  """A sentence when resizing the short side to h and centre-cropping to `size` (h, w) keeps
  less than half of a `src_h x src_w` frame, or fills more than half of the output with
  padding; else None."""
  ch, cw = (size, size) if isinstance(size, int) else tuple(size)
  nh, nw = sampling.resized_size(src_h, src_w, ch)
  kept = min(ch, nh) * min(cw, nw)
  if kept < 0.5 * nh * nw:
    return (f"the {ch}x{cw} centre crop keeps {100 * kept / (nh * nw):.0f}% of each "
            f"{src_h}x{src_w} frame")
  if kept < 0.5 * ch * cw:
    return f"{100 * (1 - kept / (ch * cw)):.0f}% of each {ch}x{cw} output frame is zero padding"
  return None


def warn_lossy_crop(what, src_h: int, src_w: int, size):
  """Logs a warning with `lossy_crop`'s sentence, if any."""
  problem = lossy_crop(src_h, src_w, size)
  if problem:
    log.warning("%s: %s (the short side is resized to the height, then centre-cropped; choose "
                "--height/--width closer to the video's aspect)", what, problem)


def load_video(path, size, sample_fps: float = 30.0):
  """`(frames01 float32 (N, h, w, 3) in [0, 1], info)` of the frames sampled from `path`.

  `size`: (h, w) or an int. `info`: dict(path, fps, num_source_frames, frame_interval). Raises
  `VideoDecodeError` (a ValueError whose message starts with the path and says why) for a file
  that cannot be decoded. Decoded as a stream (`decode.FrameStream`): only the sampled frames,
  at `size`, are held.
  """
  if sample_fps <= 0:
    raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
  with FrameStream(path, sample_fps=sample_fps) as stream, decode_errors():
    warn_lossy_crop(stream.path, stream.info.height, stream.info.width, size)
    frames01 = np.concatenate(list(frames_lib.resized(stream, size)))
  return frames01, stream_info(stream)


@contextlib.contextmanager
def decode_errors():
  """A file damaged midway raises its VideoDecodeError, as one found on opening does."""
  try:
    yield
  except frames_lib.SourceError as e:
    raise e.original() from None


def stream_info(stream) -> dict:
  """`load_video`'s info of a FrameStream read to its end."""
  info = stream.info
  return dict(path=info.path, fps=info.fps, num_source_frames=info.num_frames,
              frame_interval=stream.interval, source_size=[info.height, info.width],
              stream=info.stream, video_streams=info.num_video_streams)


def split_windows(frames, num_frames: int, what: str = "the video", hint: str = "") -> np.ndarray:
  """`(N, ...)` -> `(K, num_frames, ...)`, K = N // num_frames: the incomplete tail is dropped
  (official). ValueError when not even one window fits (`what` and `hint` go in its message)."""
  n = len(frames)
  k = n // num_frames
  if k == 0:
    raise ValueError(f"{what} has {n} sampled frame(s); one window needs {num_frames}"
                     + (f" ({hint})" if hint else ""))
  if n % num_frames:
    log.info("%s: dropping the last %d of %d frames (incomplete window, as official)", what,
             n % num_frames, n)
  frames = np.asarray(frames)[:k * num_frames]
  return frames.reshape((k, num_frames) + frames.shape[1:])


# ------------------------------------------------------------------ video out


def to_uint8(frames01) -> np.ndarray:
  """[0, 1] float -> uint8 by `x * 255` truncation (the official `(x + 1) / 2 * 255` cast)."""
  return (np.clip(np.asarray(frames01, np.float32), 0.0, 1.0) * np.float32(255.0)).astype(
      np.uint8)


def side_by_side(left, right) -> np.ndarray:
  """Two `(T, H, W, C)` videos -> `(T, H, 2W, C)` (left | right), as `--concate_input`."""
  left, right = np.asarray(left), np.asarray(right)
  if left.shape != right.shape:
    raise ValueError(f"side_by_side needs equal shapes, got {left.shape} and {right.shape}")
  return np.concatenate([left, right], axis=2)


class VideoWriter:
  """Writes uint8 `(T, H, W, 3)` RGB frames as H.264 (libx264, yuv420p) at `fps`, appended batch
  by batch (`write`), under a temporary name renamed to `path` by `close()` (`abort()` or an
  exception inside `with` deletes it instead: no half file under the final name).

  yuv420p needs even H and W. `crf` 18: visually near-lossless (x264's default is 23).
  """

  def __init__(self, path, height: int, width: int, fps: float, crf: int = 18):
    import av

    if height % 2 or width % 2:
      raise ValueError(f"H.264 yuv420p needs even sizes, got {height}x{width}")
    if not fps > 0:
      raise ValueError(f"fps must be > 0, got {fps}")
    self.shape = (height, width, 3)
    self._rate = fractions.Fraction(fps).limit_denominator(1001)  # 29.97... -> 30000/1001
    self._stack = contextlib.ExitStack()
    tmp = self._stack.enter_context(atomic_path(path))
    self._container = self._stack.enter_context(av.open(tmp, mode="w"))
    self._stream = self._container.add_stream("libx264", rate=self._rate)
    self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
    self._stream.options = {"crf": str(crf)}
    self.frames = 0

  def write(self, frames):
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.shape[1:] != self.shape:
      raise ValueError(f"VideoWriter expects uint8 frames (T, {', '.join(map(str, self.shape))}),"
                       f" got {frames.dtype} {frames.shape}")
    for frame in frames:
      vf = _av_frame(frame)
      vf.pts = self.frames
      vf.time_base = fractions.Fraction(1) / self._rate
      self._container.mux(self._stream.encode(vf))
      self.frames += 1

  def close(self):
    if not self.frames:
      self.abort()
      raise ValueError("VideoWriter: no frames were written")
    self._container.mux(self._stream.encode())  # flush the encoder's delayed frames
    self._stack.close()  # closes the container, then renames it over the final name

  def abort(self):
    self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self._stack.__exit__(exc_type, exc, tb)


def _av_frame(frame):
  import av

  return av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")


def write_video(path, frames, fps: float, crf: int = 18):
  """Writes uint8 `(T, H, W, 3)` RGB frames as H.264 (libx264, yuv420p) at `fps` (see
  `VideoWriter`), atomically."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise ValueError(f"write_video expects uint8 frames (T>0, H, W, 3), got {frames.dtype} "
                     f"{frames.shape}")
  with VideoWriter(path, frames.shape[1], frames.shape[2], fps, crf) as w:
    w.write(frames)


__all__ = ["VideoWriter", "decode_errors", "load_video", "lossy_crop", "side_by_side",
           "split_windows", "stream_info", "to_uint8", "warn_lossy_crop", "write_video"]
