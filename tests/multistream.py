"""A generated video file with two video streams (and an audio stream between them), for the
tests of which stream is read. Not a test module: imported by the tests that need the file."""

import fractions

import av
import numpy as np

# (width, height, fps, frames) of video streams #0 and #2. Both are flagged "default", so FFmpeg
# (`av_find_best_stream`) picks the one of higher bitrate: #2 (noise), not #0 (flat grey).
SMALL = (64, 48, 25, 10)
LARGE = (96, 64, 30, 14)
BEST_INDEX = 2


def write_two_stream_video(path) -> str:
  """Writes `path` (.mp4): video #0 SMALL, audio #1, video #2 LARGE; returns the str path."""
  path = str(path)
  rng = np.random.default_rng(0)
  with av.open(path, "w") as c:
    small = c.add_stream("libx264", rate=SMALL[2])
    audio = c.add_stream("aac", rate=8000)
    large = c.add_stream("libx264", rate=LARGE[2])
    for s, (w, h, _, _) in ((small, SMALL), (large, LARGE)):
      s.width, s.height, s.pix_fmt = w, h, "yuv420p"
      s.disposition = av.stream.Disposition.default
    for s, (w, h, _, n) in ((small, SMALL), (large, LARGE)):
      for i in range(n):
        x = (rng.integers(0, 255, (h, w, 3), dtype=np.uint8) if s is large
             else np.full((h, w, 3), 128, np.uint8))
        f = av.VideoFrame.from_ndarray(x, format="rgb24")
        f.pts = i
        f.time_base = fractions.Fraction(1, s.average_rate or 1)
        c.mux(s.encode(f))
      c.mux(s.encode())
    samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp",
                                         layout="mono")
    samples.sample_rate, samples.pts = 8000, 0
    c.mux(audio.encode(samples))
    c.mux(audio.encode())
  return path
