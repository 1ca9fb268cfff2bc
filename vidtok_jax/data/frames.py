"""Videos as streams of sampled, resized frames and windows: host memory bounded by the windows
in flight, whatever a video's length or resolution.

    source = open_frames(item)                   # `.fps`, uint8 (n, H, W, 3) chunks, `close()`
    for window, valid in Windows(resized(source, (256, 256)), 17):
      ...                                        # float32 (17, 256, 256, 3) in [0, 1]

The evaluation, `reconstruct.py` and the tokenizer all read videos this way (decoded by
`decode.FrameStream`, or by a source's own `load`), so they see the same frames. The resize is
`sampling.resize_short_side_and_center_crop` applied a few frames at a time: it works per frame,
so the numbers equal those of one call on the whole video, but its float64 intermediates stay at
a few hundred MB instead of ~25x the video's uint8 size.
"""

import collections
import dataclasses
import queue
import threading
from typing import Iterator, Optional

import numpy as np

from vidtok_jax.data import sampling

# Source bytes (as float64) resized per call: one 1080p frame (50 MB; its taps gather ~120 MB
# more), a few 720p ones.
RESIZE_BYTES = 64 << 20


class ChunkFrames:
  """A frame source over chunks made by the caller (e.g. frames decoded from a TFDS example):
  `fps`, the uint8 `(n, H, W, 3)` chunks, `close()`."""

  def __init__(self, chunks, fps: float):
    self._chunks, self.fps = chunks, fps

  def __iter__(self):
    yield from self._chunks

  def close(self):
    if hasattr(self._chunks, "close"):
      self._chunks.close()
    self._chunks = ()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def array_frames(frames, fps: float, chunk: int = 16) -> ChunkFrames:
  """A frame source over frames already in memory (`(frames uint8 (T, H, W, 3), fps)`, as the
  `load()` of a VideoItem returns them); its chunks are views."""
  return ChunkFrames((frames[lo:lo + chunk] for lo in range(0, len(frames), chunk)), fps)


@dataclasses.dataclass
class VideoItem:
  """One source video. `load()` -> (uint8 (T, H, W, 3) of the sampled frames, fps): the whole
  video at once, or raises. `open()` (optional) -> a frame source that decodes as it is read
  (`vidtok_jax.data.frames.open_frames`): the evaluation, `reconstruct.py` and the tokenizer use
  it when there is one, so they never hold a whole video. `info` is filled by `load` / `open` and
  copied to the video's row."""
  path: str
  load: callable
  info: dict = dataclasses.field(default_factory=dict)
  open: Optional[callable] = None


def folder_videos(paths, sample_fps: float) -> Iterator[VideoItem]:
  """VideoItems of video files, decoded with PyAV when used (frames at `sample_fps` from 0),
  streamed (`decode.FrameStream`)."""
  from vidtok_jax.data.decode import FrameStream

  for path in paths:
    meta = {}

    def open_(path=path, meta=meta):
      stream = FrameStream(path, sample_fps=sample_fps)
      # Which video stream was read (FFmpeg's choice), for files with several.
      meta.update(stream=stream.info.stream, video_streams=stream.info.num_video_streams)
      return stream

    def load(open_=open_):
      with open_() as stream:
        frames = np.concatenate(list(stream))
      return frames, stream.fps
    yield VideoItem(path, load, meta, open_)


def tfds_videos(name: str, split: str, data_dir, sample_fps: float) -> Iterator[VideoItem]:
  """VideoItems of a prepared TFDS dataset's `split` (encoded or raw frames), in storage order;
  encoded frames are decoded 16 at a time when streamed."""
  from vidtok_jax.data import config as data_config_lib
  from vidtok_jax.data import pipeline

  cfg = data_config_lib.resolve(data_config_lib.data_config(
      tfds_name=name, tfds_data_dir=data_dir, eval_split=split, eval_sample_fps=sample_fps))

  def frames_of(ex, ids):
    sel = pipeline._select(ex["frames"], ids)  # pylint: disable=protected-access
    if not (isinstance(sel, np.ndarray) and sel.dtype == np.uint8):
      sel = pipeline.decode_frames(sel).numpy()
    return np.asarray(sel)

  for _, ex in pipeline._eval_videos(cfg, 0, 1):  # pylint: disable=protected-access
    ids = np.arange(0, len(ex["frames"]), sampling.frame_interval(ex["fps"], sample_fps))

    def open_(ex=ex, ids=ids):
      return ChunkFrames((frames_of(ex, ids[lo:lo + 16]) for lo in range(0, len(ids), 16)),
                         ex["fps"])
    yield VideoItem(str(ex["path"]), lambda ex=ex, ids=ids: (frames_of(ex, ids), ex["fps"]),
                    open=open_)


def open_frames(item):
  """The frame source of a video item: `item.open()` when it streams (`evaluation.VideoItem` of
  a file: a `decode.FrameStream`), else `array_frames(*item.load())`. A source has `fps`, yields
  uint8 `(n, H, W, 3)` chunks of the sampled frames and has `close()`; opening or reading it
  raises for an unusable video (`VideoDecodeError`, possibly after some chunks)."""
  opener = getattr(item, "open", None)
  if opener is not None:
    return opener()
  frames, fps = item.load()
  return array_frames(frames, fps)


class SourceError(ValueError):
  """Reading a frame source failed (the video is unusable, e.g. a file damaged midway): the
  original error is `__cause__` (`original()`); `reason` is its `reason` (VideoDecodeError) or
  type name."""

  def __init__(self, error: BaseException):
    super().__init__(str(error))
    self.reason = getattr(error, "reason", type(error).__name__)

  def original(self) -> BaseException:
    return self.__cause__ or self


def resized(chunks, size):
  """Chunks `(n, H, W, 3)` (uint8, or float in [0, 1]) -> float32 chunks `(m, h, w, 3)` in
  [0, 1]: `sampling.resize_short_side_and_center_crop` (`size`: an int or (h, w)) applied to at
  most RESIZE_BYTES of source frames per call. An error reading `chunks` is raised as
  SourceError (callers skip the video), any other as itself."""
  chunks = iter(chunks)
  while True:
    try:
      chunk = next(chunks)
    except StopIteration:
      return
    except Exception as e:  # noqa: BLE001 -- any failure of the source makes the video unusable
      raise SourceError(e) from e
    if not len(chunk):
      continue
    per = max(1, RESIZE_BYTES // (8 * chunk[0].size))
    for lo in range(0, len(chunk), per):
      yield sampling.resize_short_side_and_center_crop(chunk[lo:lo + per], size)


class Windows:
  """Consecutive, non-overlapping windows of `num_frames` frames from a stream of frame chunks:
  yields `(window (num_frames, ...), valid)`, valid = its real frames (a new array each time).

  `pad_last`: the last partial window is padded by repeating its last frame (the
  evaluation's and tokenizer's windows: `sampling.eval_windows`); otherwise it is dropped (the
  official reconstruction). `frames` counts the frames read so far (all of them once the
  iteration ends).
  """

  def __init__(self, chunks, num_frames: int, pad_last: bool = True):
    self._chunks, self.num_frames, self.pad_last = chunks, num_frames, pad_last
    self.frames = 0

  def __iter__(self):
    t, buf, fill = self.num_frames, None, 0
    for chunk in self._chunks:
      self.frames += len(chunk)
      pos = 0
      while pos < len(chunk):
        if buf is None:
          buf = np.empty((t,) + chunk.shape[1:], chunk.dtype)
        take = min(t - fill, len(chunk) - pos)
        buf[fill:fill + take] = chunk[pos:pos + take]
        fill, pos = fill + take, pos + take
        if fill == t:
          yield buf, t
          buf, fill = None, 0
    if fill and self.pad_last:
      buf[fill:] = buf[fill - 1]
      yield buf, fill


def long_clip(chunks, causal: bool):
  """Long mode (official): `(clip (1, T', h, w, 3), n)` of the first 16k(+1) of the `n` frames
  of a chunk stream, the clip None when the video is too short. The streamer takes the clip
  whole, so it is held at the model's resolution (frames beyond T' are read and dropped)."""
  kept, n = [], 0
  for chunk in chunks:
    kept.append(chunk)
    n += len(chunk)
  keep = sampling.long_clip_frames(n, causal)
  if not keep:
    return None, n
  clip = np.concatenate(kept)[None, :keep]
  return clip, n


class _Feed:
  """One source's items, produced by a worker thread into a bounded queue."""

  def __init__(self, source, depth: int, stop: threading.Event):
    self._source, self._q, self._stop = source, queue.Queue(depth), stop
    self._done = False

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def run(self):
    items = None
    try:
      items = iter(self._source())
      for item in items:
        if not self._put(("item", item)):
          return
      self._put(("end", None))
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, raised there
      self._put(("error", e))
    finally:
      if hasattr(items, "close"):  # a generator stopped early: its files close now
        items.close()

  def __iter__(self):
    while not self._done:
      kind, item = self._q.get()
      if kind == "item":
        yield item
        continue
      self._done = True
      if kind == "error":
        raise item

  def drain(self):
    """Read (and drop) what is left, so the worker finishes."""
    try:
      for _ in self:
        pass
    except Exception:  # noqa: BLE001 -- the consumer moved on; its error is moot
      pass


def prefetch(sources, ahead: int, depth: int):
  """For each of `sources` (zero-argument callables returning iterables) in order, an iterator
  over its items. Up to `ahead` sources are read at once by worker threads, each at most `depth`
  items ahead of the consumer, so memory is bounded by `ahead * depth` items. Moving to the next
  source drops what is left of the previous one; closing the generator (do it in a `finally`)
  stops the workers. Workers are daemon threads, so a consumer that dies cannot hang the exit."""
  stop = threading.Event()
  it = iter(sources)
  feeds, threads = collections.deque(), []

  def start():
    for src in it:
      feed = _Feed(src, max(depth, 1), stop)
      thread = threading.Thread(target=feed.run, daemon=True, name="vidtok-prefetch")
      thread.start()
      feeds.append(feed)
      threads.append(thread)
      return

  try:
    for _ in range(max(ahead, 1)):
      start()
    while feeds:
      feed = feeds.popleft()
      yield feed
      feed.drain()
      start()
  finally:
    stop.set()  # workers blocked on a full queue give up within 0.1 s of their current item
    for thread in threads:
      thread.join()
