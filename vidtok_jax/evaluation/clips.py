"""Clips mode of the evaluation: windows of consecutive videos packed into fixed-shape device
batches as they are decoded, the last batch padded with zero-weight rows; batch k+1 is
dispatched before batch k's results are read, and each video's scores are handed on once all
its windows are back.

    loop = ClipsLoop(run_step, (b, 17, 256, 256, 3), fvd=True, count=1, finish=..., skip=...,
                     timing=collections.Counter())
    loop.run(prepared)          # prepared: (video index, events) as `stream.VideoStream` gives
"""

import time

import jax
import numpy as np


class _OpenVideo:
  """A video whose windows are on their way through the clips loop."""

  def __init__(self, first_id: int):
    self.first_id, self.sent, self.received = first_id, 0, 0
    self.info, self.dropped = None, False
    self.scores, self.real, self.fake = {}, {}, {}

  def complete(self) -> bool:
    """Every window's result is back and the video's stream has ended (or was dropped)."""
    return (self.info is not None or self.dropped) and self.received == self.sent

  def finish(self, i, finish, fvd: bool):
    k = self.sent
    scores = {n: np.stack([self.scores[j][n] for j in range(k)]) for n in self.scores[0]}
    pair = None
    if fvd:
      pair = (np.stack([self.real[j] for j in range(k)]).astype(np.float64),
              np.stack([self.fake[j] for j in range(k)]).astype(np.float64))
    finish(i, self.info, scores, pair)


class ClipsLoop:
  """One pass of clips mode over `prepared` videos.

  `run_step(x (B, T, h, w, 3) float32, ids (B,) uint32)` dispatches a batch (device arrays out);
  `shape` is the batch's; `finish(i, info, scores, emb pair)` / `skip(i, entry)` receive each
  video's outcome; `timing` gets "dispatch" and "device" seconds. KL keys: windows numbered over
  this run's videos in order (`count` 1: one shard), else from `video index * 2**20`; a video
  dropped midway gives its numbers back.
  """

  def __init__(self, run_step, shape, *, fvd: bool, count: int, finish, skip, timing):
    self.run_step, self.shape, self.b = run_step, shape, shape[0]
    self.fvd, self.count, self.finish, self.skip, self.timing = fvd, count, finish, skip, timing
    self.open_videos = {}  # index -> _OpenVideo
    self.rows_x, self.rows_id, self.rows_of = [], [], []  # the batch being packed
    self.in_flight = None
    self.next_id = 0

  def run(self, prepared):
    for i, events in prepared:
      v = self.open_videos[i] = _OpenVideo(
          first_id=self.next_id if self.count == 1 else i << 20)
      for kind, x in events:
        if kind == "window":
          self._add_window(i, v, x)
        elif kind == "end":
          v.info = x
        else:  # skip: nothing of this video is scored; its packed windows leave the batch
          self._drop(i, v, x)
      if v.complete():  # nothing in flight (no windows, or all already collected)
        self._close(i, v)
    if self.rows_x:
      self._dispatch()
    if self.in_flight is not None:
      self._collect(self.in_flight)

  def _add_window(self, i: int, v: _OpenVideo, x):
    self.rows_x.append(x)
    self.rows_id.append(v.first_id + v.sent)
    self.rows_of.append((i, v.sent))
    v.sent += 1
    self.next_id += self.count == 1
    if len(self.rows_x) == self.b:
      self._dispatch()

  def _drop(self, i: int, v: _OpenVideo, entry):
    self.skip(i, entry)
    v.dropped = True
    while self.rows_of and self.rows_of[-1][0] == i:
      self.rows_x.pop(), self.rows_id.pop(), self.rows_of.pop()
      v.sent -= 1
    self.next_id = v.first_id if self.count == 1 else self.next_id

  def _close(self, i: int, v: _OpenVideo):
    self.open_videos.pop(i)
    if not v.dropped:
      v.finish(i, self.finish, self.fvd)

  def _dispatch(self):
    n = len(self.rows_x)
    x = np.zeros(self.shape, np.float32)
    x[:n] = np.stack(self.rows_x)
    if n < self.b:  # zero-weight padding rows: copies of the last window
      x[n:] = x[n - 1]
    ids = np.zeros((self.b,), np.uint32)
    ids[:n] = self.rows_id
    t1 = time.monotonic()
    out = self.run_step(x, ids)
    self.timing["dispatch"] += time.monotonic() - t1
    if self.in_flight is not None:
      self._collect(self.in_flight)
    self.in_flight = (out, list(self.rows_of))
    self.rows_x.clear(), self.rows_id.clear(), self.rows_of.clear()

  def _collect(self, done):
    out, owners = done
    t1 = time.monotonic()
    out = jax.device_get(out)  # the one result fetch per batch
    self.timing["device"] += time.monotonic() - t1
    for r, (i, j) in enumerate(owners):
      v = self.open_videos[i]
      v.received += 1
      if not v.dropped:
        v.scores[j] = {n: out[n][r] for n in out if not n.startswith("emb_")}
        if self.fvd:
          v.real[j], v.fake[j] = out["emb_real"][r], out["emb_fake"][r]
      if v.complete():
        self._close(i, v)


__all__ = ["ClipsLoop"]
