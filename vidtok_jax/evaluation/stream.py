"""The host side of the evaluation: each video decoded, sampled, resized and cut into windows as
a stream of events, in worker threads ahead of the model.

    stream = VideoStream(size=256, num_frames=17, mode="clips", causal=True, sample_fps=30.0)
    for kind, x in stream.events(item):   # ("window", clip)..., ("end", fields) | ("skip", entry)
      ...

Host memory holds a bounded number of windows whatever the videos' length and resolution (long
mode holds each clip at the model's resolution: the streamer takes it whole).
"""

import logging
import time

import numpy as np

from vidtok_jax.data import frames as frames_lib
from vidtok_jax.data import sampling

log = logging.getLogger("vidtok_jax.eval")

PREFETCH = 3  # videos decoded + resized ahead of the model (worker threads)


def windows(frames01: np.ndarray, num_frames: int, mode: str, causal: bool):
  """`(clips (K, T', h, w, 3) float32 [0, 1], valid (K, T') bool)`; None if too short (long)."""
  n = len(frames01)
  if mode == "long":
    keep = sampling.long_clip_frames(n, causal)
    return (frames01[None, :keep], np.ones((1, keep), bool)) if keep else None
  idx = sampling.eval_windows(n, num_frames)
  valid = [np.arange(num_frames) < min(num_frames, n - a) for a in range(0, n, num_frames)]
  return frames01[np.stack(idx)], np.stack(valid)


class VideoStream:
  """Videos -> events under the evaluation protocol (`size`, `num_frames`, `mode`, ...)."""

  def __init__(self, size, num_frames: int, mode: str, causal: bool, sample_fps: float):
    self.size, self.num_frames, self.mode = size, num_frames, mode
    self.causal, self.sample_fps = causal, sample_fps

  def skip(self, item, reason: str, message: str) -> tuple:
    log.warning("skip %s: %s", item.path, message)
    return "skip", {"path": item.path, "reason": reason, "message": message}

  def events(self, item):
    """Host work of one video (a worker thread) as a stream: decode, resize and cut windows as
    frames arrive. Clips mode: `("window", clip)` per window, then `("end", fields)`; long mode:
    one `("long", fields)` (the streamer takes the clip whole). `("skip", entry)` instead of the
    rest when the video cannot be used; a file damaged midway says so after some windows."""
    try:
      source = frames_lib.open_frames(item)
    except Exception as e:  # unreadable / corrupt: report it, go on with the rest
      yield self.skip(item, getattr(e, "reason", type(e).__name__), str(e))
      return
    try:
      x01 = frames_lib.resized(source, self.size)
      if self.mode == "long":
        yield self._long_event(item, source, x01)
      else:
        yield from self._window_events(item, source, x01)
    except frames_lib.SourceError as e:  # damaged midway: the windows already sent are dropped
      yield self.skip(item, e.reason, str(e))
    finally:
      source.close()

  def _long_event(self, item, source, x01) -> tuple:
    """Long mode: `("long", fields)` of the video's one clip, or `("skip", entry)`."""
    clip, n = frames_lib.long_clip(x01, self.causal)
    if clip is None:
      need = f"> {sampling.LONG_CHUNK}" if self.causal else f">= {sampling.LONG_CHUNK}"
      return self.skip(item, "too_short", f"{n} frames at {self.sample_fps:g} fps; long "
                       f"mode needs {need}")
    return "long", {"path": item.path, "fps": source.fps, "frames": n, "clips": clip,
                    "valid": np.ones(clip.shape[:2], bool),
                    "meta": dict(getattr(item, "info", {}))}

  def _window_events(self, item, source, x01):
    """Clips mode: `("window", clip)` per window, then `("end", fields)` or `("skip", ...)`."""
    windows_ = frames_lib.Windows(x01, self.num_frames)
    valid = []
    for clip, n_valid in windows_:
      valid.append(n_valid)
      yield "window", clip
    n = windows_.frames
    if not n:
      yield self.skip(item, "no_frames", "no frames")
      return
    if n < self.num_frames:
      log.warning("%s: %d frames, shorter than one %d-frame window; padded by repeating the "
                  "last frame", item.path, n, self.num_frames)
    yield "end", {"path": item.path, "fps": source.fps, "frames": n,
                  "valid": np.arange(self.num_frames)[None] < np.asarray(valid)[:, None],
                  "meta": dict(getattr(item, "info", {}))}

  def prepare(self, item):
    """All host work of one video at once (`benchmarks/inference.py` times it): `("ok", fields)`
    with the video's `clips` stacked, or `("skip", entry)`."""
    clips = []
    for kind, x in self.events(item):
      if kind == "window":
        clips.append(x)
      elif kind == "end":
        return "ok", dict(x, clips=np.stack(clips))
      else:
        return kind if kind == "skip" else "ok", x
    raise AssertionError("unreachable: _events ends with end, long or skip")

  def prepared(self, videos, depth: int):
    """`(index, events)` per `(index, item)` of `videos` in order (`events`, each read to its
    end before the next); PREFETCH videos are decoded ahead in threads, each `depth` events
    ahead of the model."""
    feeds = frames_lib.prefetch([lambda item=item: self.events(item) for _, item in videos],
                                PREFETCH, depth)
    try:
      for (i, _), events in zip(videos, feeds, strict=False):
        yield i, events
    finally:
      feeds.close()


def timed(events, timing):
  """`events`, the seconds spent waiting for each added to `timing["host_wait"]`."""
  it = iter(events)
  while True:
    t = time.monotonic()
    try:
      item = next(it)
    except StopIteration:
      return
    finally:
      timing["host_wait"] += time.monotonic() - t
    yield item


__all__ = ["PREFETCH", "VideoStream", "timed", "windows"]
