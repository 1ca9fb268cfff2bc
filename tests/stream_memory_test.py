"""Host memory of `eval.py` and `reconstruct.py` is bounded by the windows in flight, not by the
video: the peak resident memory of an 18-second 1280x720 clip is that of a 9-second one (the
previous code decoded the whole file at full size first, +750 MB here, and resized it all at once
in float64). Both clips are long enough that frames are still being decoded and resized after
the model's first compile (whose memory adds to theirs), so the two peaks are comparable. The eval run of a tiny FSQ model also leaves `--batch_size` at its default, which
used to crash the rate figures after the evaluation (TypeError on None)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import random_params

import vidtok_jax

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = f"--config={REPO}/configs/vidtok.py:fsq_causal_488_4096,tiny"
SIZE, FPS = 32, 30
SHORT, LONG = 9, 18  # seconds
# The previous code held every decoded frame: 9 more seconds of 720p are 750 MB of uint8 alone.
GROWTH_MB = 150


def write_clip(path, seconds: int, h: int = 720, w: int = 1280):
  """A moving gradient, H.264 (ultrafast: generation stays quick)."""
  import av

  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx, yy, xx + yy], -1).astype(np.uint8)  # uint8 sums wrap: a moving pattern
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=FPS)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"preset": "ultrafast"}
    for i in range(seconds * FPS):
      img = base + np.array([4 * i, 2 * i, i], np.uint64).astype(np.uint8)
      f = av.VideoFrame.from_ndarray(img, format="rgb24")
      f.pts = i
      c.mux(s.encode(f))
    c.mux(s.encode())
  return path


def peak_rss_mb(cmd, log):
  """(exit status, peak resident MB) of `cmd` run alone in a child process."""
  with open(log, "w") as out:
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    _, status, usage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  return p.returncode, usage.ru_maxrss / 1024  # Linux: KiB


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  import orbax.checkpoint as ocp

  from vidtok_jax.train import configs as train_configs

  t = tmp_path_factory.mktemp("stream_memory")
  cfg = train_configs.get_config("fsq_causal_488_4096,tiny")
  ckpt = t / "params"
  c = ocp.StandardCheckpointer()
  c.save(ckpt, jax.tree.map(np.asarray, random_params(vidtok_jax.abstract_params(cfg.model), 1)))
  c.wait_until_finished()
  clips = {}
  for sec in (SHORT, LONG):
    (t / f"v{sec}").mkdir()
    clips[sec] = write_clip(t / f"v{sec}" / "clip.mp4", sec)
  return t, ckpt, clips


def test_eval_and_reconstruct_memory_does_not_grow_with_the_video(setup):
  t, ckpt, clips = setup
  peaks = {}
  for sec, clip in clips.items():
    out = t / f"eval{sec}.json"
    # Default --batch_size, --num_frames, --mode and --rate: the FSQ rate pass runs too.
    code, peaks["eval", sec] = peak_rss_mb(
        [sys.executable, str(REPO / "eval.py"), CONFIG, f"--checkpoint={ckpt}",
         f"--data_dir={clip.parent}", f"--output={out}", f"--size={SIZE}", "--sample_fps=4",
         "--lpips_net=none", "--nofvd"], t / f"eval{sec}.log")
    assert code == 0, (t / f"eval{sec}.log").read_text()[-5000:]
    res = json.loads(out.read_text())
    assert res["videos"][0]["frames"] == len(range(0, sec * FPS, 8))  # every 8th frame
    rate = res["rate"]
    assert rate["pixels"] == res["videos"][0]["windows"] * 17 * SIZE * SIZE
    assert 0 < rate["entropy_bpp"] <= rate["raw_bpp"] and rate["coded_bpp"] > 0
    code, peaks["reconstruct", sec] = peak_rss_mb(
        [sys.executable, str(REPO / "reconstruct.py"), CONFIG, f"--checkpoint={ckpt}",
         f"--input={clip}", f"--output_dir={t / f'rc{sec}'}", f"--size={SIZE}",
         "--sample_fps=4", "--num_frames=5"], t / f"rc{sec}.log")
    assert code == 0, (t / f"rc{sec}.log").read_text()[-5000:]
    summary = json.loads((t / f"rc{sec}" / "clip_psnr.json").read_text())
    assert summary["num_windows"] == len(range(0, sec * FPS, 8)) // 5
  for cmd in ("eval", "reconstruct"):
    growth = peaks[cmd, LONG] - peaks[cmd, SHORT]
    assert growth < GROWTH_MB, (cmd, peaks)
