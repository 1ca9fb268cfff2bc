"""Video decoding with PyAV: frames streamed (or whole clips) as uint8 RGB, or cheap metadata;
clear errors otherwise.

The training loader of the original trains silently on a black frame when a file fails
to decode. Here every unusable file raises `VideoDecodeError` with a short `reason` code and a
message naming the path, and the caller decides whether to skip or stop.

Conventions:
* Frames are `uint8 (T, H, W, 3)` RGB in **display orientation**: the container's display matrix
  (e.g. the 180° of `moviepy_fire2.mp4`) is applied exactly like the FFmpeg CLI's autorotate.
* Every frame goes through `frame.to_ndarray(format="rgb24")` (FFmpeg's swscale), so gray,
  gray16, 4:4:4, paletted and alpha pixel formats all become RGB. Alpha is **dropped**, not
  composited: the colour channels of a transparent pixel are kept as stored.
* Files are opened as Python file objects, so paths with any bytes work (str, bytes, PathLike).
* A file that decodes some frames and then fails is an error ("truncated"), never a short clip.
* A file with several video streams is read from the stream FFmpeg itself picks
  (`av_find_best_stream`, as the FFmpeg CLI and decord do), not the first one listed;
  `VideoInfo.stream` says which (`select_stream`).
"""

import dataclasses
import os
from collections.abc import Sequence

import numpy as np


class _LazyAV:
  """PyAV, imported on first use: configs and the model import this package but decode nothing
  (a TPU/GPU job reading a prepared TFDS dataset needs no PyAV)."""

  def __getattr__(self, name):
    import av  # pylint: disable=import-outside-toplevel

    return getattr(av, name)


av = _LazyAV()

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")

# FFmpeg console spam: PyAV's default `av.logging` level (None) drops every FFmpeg log line, so
# corrupt files decode quietly; `quiet_ffmpeg()` restores that if something turned logging on.
# We do not install a Python log level ourselves: a Python log callback (any level but None)
# deadlocks when a frame-threaded decoder is freed (seen with PyAV 18, FFmpeg 8), and the level is
# process-wide. We keep PyAV's default slice threading for the same reason.


def quiet_ffmpeg():
  """Drop FFmpeg's log output (PyAV's default); error messages then omit FFmpeg's last log line."""
  av.logging.set_level(None)


# Leading bytes of the containers we read: such a file that FFmpeg cannot open is a damaged
# video ("truncated"), not some other kind of file ("not_a_video").
_SIGNATURES = ((0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (0, b"GIF8"), (4, b"ftyp"), (4, b"mdat"),
               (4, b"moov"), (4, b"free"), (4, b"wide"), (4, b"skip"))


class VideoDecodeError(ValueError):
  """A video that cannot be used.

  Attributes: `path` (printable str), `reason` (one of "missing", "empty_file", "not_a_video",
  "no_video_stream", "unsupported_codec", "no_decodable_frame", "truncated", "too_small",
  "bad_path"). The message starts with the path and says why.
  """

  def __init__(self, path, reason, detail):
    self.path = printable_path(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """Metadata of one video stream, sizes in display orientation (after rotation)."""

  path: str  # printable: undecodable bytes shown as \xNN escapes
  fps: float  # average frame rate (0.0 when the container states none)
  num_frames: int  # decodable frames: exact from `decode`, the container's count from `probe`
  height: int
  width: int
  rotation: int  # clockwise degrees (0/90/180/270) applied to reach display orientation; a
  # mirror in the display matrix (rare) is applied to the frames too but not reported here
  codec: str
  pix_fmt: str
  stream: int = 0  # container index of the video stream read (see `select_stream`)
  num_video_streams: int = 1


def printable_path(path) -> str:
  """`path` (str/bytes/PathLike) as a str that always encodes: bad bytes become `\\xNN`."""
  try:
    s = os.fsdecode(path)
  except TypeError:
    return repr(path)
  s = s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)  # NUL, newline, ... escaped


def _ffmpeg(e: Exception) -> str:
  """An FFmpeg error without PyAV's repr of the file name (already at the start of the message)."""
  log = getattr(e, "log", None)
  text = getattr(e, "strerror", None) or str(e)
  return f"{text} ({log[-1].strip()})" if log and isinstance(log, tuple) and log[-1] else text


# ------------------------------------------------------------------ orientation


def _display_op(frame) -> str:
  """The numpy op (see `_orient`) that brings `frame` to display orientation.

  Mirrors FFmpeg's CLI autorotate (fftools `get_rotation` + its transpose/hflip/vflip choice),
  so mirrored matrices, which `frame.rotation` alone misreads, come out as players show them.
  """
  matrix = None
  for side_data in frame.side_data:
    if side_data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
      matrix = np.frombuffer(bytes(side_data), np.int32)
  if matrix is None:
    return "none"
  # `frame.rotation` is av_display_rotation_get (counter-clockwise); the CLI negates it.
  theta = -float(round(frame.rotation))
  theta -= 360 * np.floor(theta / 360 + 0.9 / 360)
  if abs(theta - 90) < 1:
    return "transpose" if matrix[3] > 0 else "cw"
  if abs(theta - 180) < 1:
    ops = ("h" if matrix[0] < 0 else "") + ("v" if matrix[4] < 0 else "")
    return {"hv": "rot180", "h": "hflip", "v": "vflip", "": "none"}[ops]
  if abs(theta - 270) < 1:
    return "antitranspose" if matrix[3] < 0 else "ccw"
  # Not a multiple of 90°: the CLI would resample the image; we keep frames as stored.
  return "vflip" if matrix[4] < 0 else "none"


# Clockwise rotation part of each op; the mirrored ops are that rotation followed by an hflip.
_ROTATION = {"none": 0, "cw": 90, "rot180": 180, "ccw": 270,
             "hflip": 0, "transpose": 90, "vflip": 180, "antitranspose": 270}


def _orient(x: np.ndarray, op: str) -> np.ndarray:
  """Apply a `_display_op` op to `(..., H, W, C)` frames."""
  h, w = x.ndim - 3, x.ndim - 2
  if op == "none":
    return x
  if op == "cw":
    return np.rot90(x, -1, axes=(h, w))
  if op == "ccw":
    return np.rot90(x, 1, axes=(h, w))
  if op == "rot180":
    return np.rot90(x, 2, axes=(h, w))
  if op == "hflip":
    return np.flip(x, w)
  if op == "vflip":
    return np.flip(x, h)
  if op == "transpose":
    return np.swapaxes(x, h, w)
  if op == "antitranspose":
    return np.swapaxes(np.rot90(x, 2, axes=(h, w)), h, w)
  raise ValueError(op)


# ------------------------------------------------------------------ opening


def _open(path):
  """(container, python file, video stream) or VideoDecodeError; caller closes both."""
  try:
    fspath = os.fsencode(path)  # bytes: any file name works, whatever the locale
  except TypeError as e:
    raise VideoDecodeError(path, "bad_path", f"not a path ({type(path).__name__})") from e
  try:
    f = open(fspath, "rb")
  except FileNotFoundError as e:
    raise VideoDecodeError(path, "missing", "no such file") from e
  except (OSError, ValueError) as e:  # a directory, no permission, a NUL in the name
    raise VideoDecodeError(path, "bad_path", f"cannot open: {e}") from e
  try:
    if os.fstat(f.fileno()).st_size == 0:
      raise VideoDecodeError(path, "empty_file", "file has 0 bytes")
    head = f.read(12)
    f.seek(0)
    try:
      container = av.open(f, "r")
    except (av.FFmpegError, UnicodeDecodeError) as e:  # garbled metadata raises the latter
      if any(head[i:i + len(sig)] == sig for i, sig in _SIGNATURES):
        raise VideoDecodeError(path, "truncated",
                               f"video container header found but it cannot be opened "
                               f"(truncated or corrupt): {_ffmpeg(e)}") from e
      raise VideoDecodeError(path, "not_a_video",
                             f"FFmpeg cannot read it as media: {_ffmpeg(e)}") from e
  except BaseException:
    f.close()
    raise
  try:
    if not container.streams.video:
      kinds = sorted({s.type for s in container.streams}) or ["no"]
      raise VideoDecodeError(path, "no_video_stream",
                             f"container has {'/'.join(kinds)} streams only")
    stream = select_stream(container)
    if stream.codec_context is None:
      raise VideoDecodeError(path, "unsupported_codec",
                             "this FFmpeg build has no decoder for the video stream's codec")
  except BaseException:
    container.close()
    f.close()
    raise
  return container, f, stream


def select_stream(container):
  """The video stream FFmpeg would read: `av_find_best_stream` (the FFmpeg CLI's and decord's
  choice: the default-disposition stream, else the largest / most-decodable one), not simply
  `streams.video[0]`. A file with several video streams (e.g. a low-resolution preview as
  stream #0) otherwise yields other frames, frame counts and metrics than the official reader.
  """
  best = container.streams.best("video")
  return best if best is not None else container.streams.video[0]


def _fps(stream) -> float:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate:
      return float(rate)
  return 0.0


def _check_size(path, h, w, min_side):
  if min(h, w) < min_side:
    raise VideoDecodeError(path, "too_small", f"{w}x{h} frames, shorter side < min_side={min_side}")


def _iter_frames(path, container, stream):
  """Yield decoded frames; raise VideoDecodeError when the stream is cut short or undecodable.

  Demuxer errors and packets missing from the index (mp4/avi index every sample, mkv only
  keyframe cues) mean a cut or damaged file: "truncated". A decoder error is "truncated" after
  some frames or on a packet the demuxer flagged corrupt (a short read), and otherwise
  "no_decodable_frame".
  """
  promised = len(stream.index_entries or ())
  packets = frames = 0
  demuxer = container.demux(stream)
  while True:
    try:
      packet = next(demuxer)
    except StopIteration:
      break
    except av.FFmpegError as e:
      raise VideoDecodeError(path, "truncated", f"container unreadable after {frames} "
                             f"decoded frame(s): {_ffmpeg(e)}") from e
    packets += bool(packet.size)  # the final flush packet is empty
    try:
      decoded = packet.decode()
    except av.FFmpegError as e:
      if frames or packet.is_corrupt:
        raise VideoDecodeError(path, "truncated",
                               f"decoding failed after {frames} frame(s): {_ffmpeg(e)}") from e
      raise VideoDecodeError(path, "no_decodable_frame", f"packet {packets} does not decode, "
                             f"no frame before it: {_ffmpeg(e)}") from e
    for frame in decoded:
      frames += 1
      yield frame
  if packets < promised:
    raise VideoDecodeError(path, "truncated", f"only {packets} of {promised} indexed packets "
                           f"present, {frames} frame(s) decoded")
  if frames == 0:
    raise VideoDecodeError(path, "no_decodable_frame", f"{packets} packet(s) read, none decodes")


def probe(path, *, min_side: int = 16) -> VideoInfo:
  """Container/stream metadata, after decoding the first frame to prove the stream decodes.

  `num_frames` is the container's frame count (or, when it states none, the number of video
  packets, found by demuxing without decoding); `decode` counts exactly. Only the start of the
  file is decoded, so a file cut after its first frame passes here and fails in `decode`.
  Raises VideoDecodeError.
  """
  container, f, stream = _open(path)
  try:
    if stream.codec_context.width and stream.codec_context.height:
      _check_size(path, stream.codec_context.height, stream.codec_context.width, min_side)
    frames = _iter_frames(path, container, stream)
    try:
      first = next(frames)
    except StopIteration:  # unreachable: _iter_frames raises when nothing decodes
      raise VideoDecodeError(path, "no_decodable_frame", "no frame decodes") from None
    finally:
      frames.close()
    _check_size(path, first.height, first.width, min_side)
    rotation = _ROTATION[_display_op(first)]
    num_frames = stream.frames
    if num_frames <= 0:  # e.g. mkv/webm state no count: count packets (demux only, no decoding)
      try:
        container.seek(0)
        num_frames = sum(1 for p in container.demux(stream) if p.size)
      except av.FFmpegError as e:
        raise VideoDecodeError(path, "truncated", f"container unreadable: {_ffmpeg(e)}") from e
    h, w = (first.width, first.height) if rotation in (90, 270) else (first.height, first.width)
    return VideoInfo(printable_path(path), _fps(stream), int(num_frames), h, w, rotation,
                     stream.codec_context.name, first.format.name, stream.index,
                     len(container.streams.video))
  finally:
    container.close()
    f.close()


def _scaled_size(h: int, w: int, max_short_side: int | None) -> tuple[int, int]:
  """Stored (h, w) scaled so the short side is <= max_short_side, aspect kept (rounded)."""
  short = min(h, w)
  if max_short_side is None or short <= max_short_side:
    return h, w
  scale = max_short_side / short
  return max(1, round(h * scale)), max(1, round(w * scale))


# Decoded uint8 bytes per chunk a FrameStream yields (at most CHUNK frames): 1080p RGB frames
# are 6 MB each, so a chunk stays small whatever the resolution.
CHUNK = 16
_CHUNK_BYTES = 64 << 20


class FrameStream:
  """The frames of one video, decoded as they are read: the one decode path of `decode`, the
  evaluation, reconstruction and tokenization (none of which holds a whole video any more).

      with FrameStream(path, sample_fps=30) as s:
        s.fps, s.interval                # known at once
        for chunk in s:                  # uint8 (n, H, W, 3) RGB, display orientation
          ...
        s.info                           # VideoInfo; num_frames exact once exhausted

  Opening reads the container and decodes the first frame, so every error `decode` raises for
  an unopenable, too small or undecodable file is raised here; a file that fails later
  ("truncated") raises VideoDecodeError from the iteration, after the frames before the damage.
  `sample_fps`: keep only frames 0, d, 2d, ... with d = `sampling.frame_interval(fps,
  sample_fps)` (1 when the container states no rate); frames skipped are decoded (the stream
  must decode to the end to be valid) but never converted to RGB. `max_short_side` and
  `min_side` as `decode`. Chunks hold at most CHUNK frames and about 64 MB.
  """

  def __init__(self, path, *, sample_fps: float | None = None,
               max_short_side: int | None = None, min_side: int = 16):
    from vidtok_jax.data import sampling  # pylint: disable=import-outside-toplevel

    self._container, self._file, self._stream = _open(path)
    try:
      self.path = printable_path(path)
      self.fps = _fps(self._stream)
      self.interval = (sampling.frame_interval(self.fps, sample_fps)
                       if sample_fps and self.fps > 0 else 1)
      self._frames = _iter_frames(path, self._container, self._stream)
      first = next(self._frames)  # _iter_frames raises rather than end with no frame
      _check_size(path, first.height, first.width, min_side)
      self._op = _display_op(first)
      self._size = _scaled_size(first.height, first.width, max_short_side)
      h, w = self._size if _ROTATION[self._op] in (0, 180) else self._size[::-1]
      self.decoded = 0  # source frames decoded so far
      self.stated_frames = max(int(self._stream.frames or 0), 0)  # the container's count, or 0
      self.info = VideoInfo(self.path, self.fps, 0, h, w, _ROTATION[self._op],
                            self._stream.codec_context.name, first.format.name,
                            self._stream.index, len(self._container.streams.video))
      self._first = first
      self._chunk = max(1, min(CHUNK, _CHUNK_BYTES // (3 * h * w)))
      self.done = False
    except BaseException:
      self.close()
      raise

  def _rgb(self, frame) -> np.ndarray:
    # Fixed output size also guards against mid-stream resolution changes.
    return frame.to_ndarray(format="rgb24", height=self._size[0], width=self._size[1],
                            interpolation="AREA" if self._size != (frame.height, frame.width)
                            else None)

  def __iter__(self):
    out = []
    try:
      frames = self._frames
      if self._first is not None:
        frames = _chain_first(self._first, frames)
        self._first = None
      for frame in frames:
        if self.decoded % self.interval == 0:
          out.append(self._rgb(frame))
        self.decoded += 1
        if len(out) == self._chunk:
          yield np.ascontiguousarray(_orient(np.stack(out), self._op))
          out = []
      if out:
        yield np.ascontiguousarray(_orient(np.stack(out), self._op))
      self.done = True
      self.info = dataclasses.replace(self.info, num_frames=self.decoded)
    finally:
      self.close()

  def close(self):
    frames = getattr(self, "_frames", None)
    if frames is not None:
      frames.close()
    self._container.close()
    self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _chain_first(first, rest):
  yield first
  yield from rest


def decode(path, *, max_short_side: int | None = None,
           min_side: int = 16) -> tuple[np.ndarray, VideoInfo]:
  """Every frame of the video stream FFmpeg picks (`select_stream`) as `uint8 (T, H, W, 3)` RGB
  in display orientation (a `FrameStream` read to the end; prefer the stream for long videos).

  `max_short_side`: downscale (swscale area averaging, i.e. antialiased; aspect kept, sizes
  rounded) so that the shorter side is at most this; never upscales. Scaling happens per frame
  during decoding, so a long HD clip never sits in memory at full size. All frames come out at
  the first frame's size. `min_side` applies to the stored size. The returned info's
  height/width are those of the returned frames, `num_frames` their exact count.
  Raises VideoDecodeError.
  """
  with FrameStream(path, max_short_side=max_short_side, min_side=min_side) as stream:
    video = np.concatenate(list(stream))
  return video, stream.info


# ------------------------------------------------------------------ file lists


def _csv_entry(raw: bytes) -> tuple[str | None, str]:
  """One meta-file line -> (path or None, why): None with "blank" (pandas `dropna` drops it
  silently) or "garbled" (pandas `on_bad_lines="skip"` would drop it: several fields,
  unbalanced quotes, control characters). Bytes that are not UTF-8 are kept as path bytes."""
  line = raw.decode("utf-8", "surrogateescape").strip()
  if line.lower() in ("", "nan", "none", "null", '""'):
    return None, "blank"
  if len(line) >= 2 and line[0] == line[-1] == '"':  # CSV quoting (names with commas)
    inner = line[1:-1]
    if '"' in inner.replace('""', ""):
      return None, "garbled"
    line = inner.replace('""', '"')
  elif "," in line or '"' in line:
    return None, "garbled"
  if any(ord(c) < 32 or ord(c) == 127 for c in line):
    return None, "garbled"
  return line, ""


def read_video_list(root, csv=None,
                    extensions: Sequence[str] = VIDEO_EXTENSIONS) -> tuple[list[str], list[dict]]:
  """Video paths under `root`: `(paths, skipped)`.

  With `csv`: a VidTok meta file, header `videos`, then one path per line relative to `root`
  (absolute paths are kept). Blank / NaN lines are dropped (pandas `dropna`); garbled lines and
  lines naming a missing file go to `skipped` as `{"path": printable, "line": 1-based line
  number, "reason": "garbled" | "missing"}`.
  Without `csv`: every file under `root` whose extension (any case) is in `extensions`,
  recursively, sorted by path bytes; `skipped` is empty.
  Paths are str from os.fsdecode: undecodable bytes survive as surrogates, so they open again
  (`printable_path` makes them printable).
  """
  root_b = os.fsencode(root)
  paths, skipped = [], []
  if csv is None:
    exts = tuple(os.fsencode(e.lower()) for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root_b):  # bytes walk: any file name works
      dirnames.sort()
      found += [os.path.join(dirpath, n) for n in filenames if n.lower().endswith(exts)]
    return [os.fsdecode(p) for p in sorted(found)], skipped
  with open(os.fsencode(csv), "rb") as fh:
    lines = fh.read().splitlines()
  header = lines[0].decode("utf-8", "replace").lstrip("\ufeff").strip().strip('"') if lines else ""
  if header != "videos":
    raise ValueError(f"{printable_path(csv)}: first line must be the header 'videos', "
                     f"got {header!r}")
  for n, raw in enumerate(lines[1:], start=2):
    entry, why = _csv_entry(raw)
    if why == "blank":
      continue
    if why:
      skipped.append({"path": printable_path(raw), "line": n, "reason": why})
      continue
    full = os.path.join(root_b, os.fsencode(entry))
    if not os.path.isfile(full):
      skipped.append({"path": printable_path(full), "line": n, "reason": "missing"})
      continue
    paths.append(os.fsdecode(full))
  return paths, skipped
