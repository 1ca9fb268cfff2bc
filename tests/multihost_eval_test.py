"""`eval.py --distributed` as 2 real processes on this machine (localhost coordinator, gloo CPU
collectives, one CPU device each): what a pod runs, in miniature.

  one     1 process evaluates the 2 clips;
  two     2 processes (`--coordinator_address/--num_processes/--process_id`): each evaluates
          every 2nd video, the parts are gathered, process 0 alone writes the JSON: the same
          JSON as `one` but for the run's seconds and timings;
  failing process 1 alone has a bad flag: it prints its `error:` line and ends at once
          (`exit_now_on_failure`) instead of waiting in `jax.distributed.shutdown`.

The latent is deterministic (`--nosample_posterior`): sampled KL keys are numbered per video
with `--distributed` and over the run's windows in one process (README: evaluation), so sampled
numbers differ by the noise by design.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import random_params

import vidtok_jax

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = f"--config={REPO}/configs/vidtok.py:kl_causal_488_4chn,tiny"
FPS = 8
# Windows of 9 frames: video 0 has 1, video 1 has 2. With --batch_size=2 one process packs
# [v0w0, v1w0], [v1w1, pad]; two pack [v0w0, pad] and [v1w0, v1w1]: other batch neighbours.
SECONDS = (1, 2)
TIMEOUT_S = 300  # a hang shows up as this timeout, not as a stuck CI job
FAIL_BOUND_S = 90  # a failing process ends within this of its start (~15 s here: start-up)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def write_clip(path, seconds: int, seed: int, size: int = 64):
  """Smooth random colour fields drifting a pixel a frame, H.264 at FPS."""
  import av

  rng = np.random.default_rng(seed)
  field = np.kron(rng.integers(0, 256, (size // 8 + 2, size // 8 + 2, 3)),
                  np.ones((8, 8, 1))).astype(np.uint8)
  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=FPS)
    s.width, s.height, s.pix_fmt = size, size, "yuv420p"
    s.options = {"preset": "ultrafast"}
    for i in range(seconds * FPS):
      f = av.VideoFrame.from_ndarray(np.ascontiguousarray(field[i:i + size, i:i + size]),
                                     format="rgb24")
      f.pts = i
      c.mux(s.encode(f))
    c.mux(s.encode())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  import orbax.checkpoint as ocp

  from vidtok_jax.train import configs as train_configs

  t = tmp_path_factory.mktemp("multihost_eval")
  cfg = train_configs.get_config("kl_causal_488_4chn,tiny")
  c = ocp.StandardCheckpointer()
  c.save(t / "params", jax.tree.map(np.asarray,
                                    random_params(vidtok_jax.abstract_params(cfg.model), 5)))
  c.wait_until_finished()
  (t / "videos").mkdir()
  for i, sec in enumerate(SECONDS):
    write_clip(t / "videos" / f"clip{i}.mp4", sec, seed=i)
  return t


def command(t, output, *extra):
  return [sys.executable, str(REPO / "eval.py"), CONFIG, f"--checkpoint={t / 'params'}",
          f"--data_dir={t / 'videos'}", f"--output={output}", "--size=32", "--num_frames=9",
          f"--sample_fps={FPS}", "--batch_size=2", "--lpips_net=none", "--nofvd",
          "--nosample_posterior", *extra]


def env():
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  e.pop("XLA_FLAGS", None)  # one CPU device per process
  return e


def start_two(t, name, output, extra_for=None):
  port = free_port()
  procs, logs = [], [t / f"{name}.{i}.log" for i in range(2)]
  for i in range(2):
    cmd = command(t, output, "--distributed", f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}", *(extra_for or {}).get(i, ()))
    with open(logs[i], "w") as f:
      procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=env()))
  return procs, logs


def stop(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def assert_same(a, b, where="result"):
  """Equal JSON, floats to rel 1e-6: each window goes through the same jitted program (rows
  packed with other neighbours and padding, which XLA computes row by row) and the merge sums
  per-video scores in video order in both runs, so at most a few float32 roundings differ
  (measured: none)."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and sorted(a) == sorted(b), (where, sorted(a), sorted(b))
    for k in a:
      assert_same(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), (where, a, b)
    for i, (x, y) in enumerate(zip(a, b)):
      assert_same(x, y, f"{where}[{i}]")
  elif isinstance(a, float):
    assert b == pytest.approx(a, rel=1e-6, abs=0), (where, a, b)
  else:
    assert a == b, (where, a, b)


def test_two_processes_write_the_one_process_json_and_fail_fast(setup):
  t = setup
  one = t / "one.json"
  p = subprocess.run(command(t, one), capture_output=True, text=True, timeout=TIMEOUT_S,
                     cwd=REPO, env=env())
  assert p.returncode == 0, p.stderr[-5000:]

  out = t / "two.json"  # one path for both processes, as on a shared file system
  procs, logs = start_two(t, "two", out)
  try:
    codes = [q.wait(timeout=TIMEOUT_S) for q in procs]
  finally:
    stop(procs)
  for i, c in enumerate(codes):
    assert c == 0, f"process {i} exited {c}:\n{logs[i].read_text()[-5000:]}"
  # Process 1 evaluated its share (video 1) and wrote nothing; process 0 wrote the JSON.
  assert "wrote" not in logs[1].read_text() and "wrote" in logs[0].read_text()
  a, b = json.loads(one.read_text()), json.loads(out.read_text())
  assert [v["windows"] for v in a["videos"]] == [1, 2] and a["protocol"]["num_clips"] == 0
  assert a["psnr"] > 0 and -1 <= a["ssim"] <= 1 and a["lpips"] is None and a["fvd"] is None
  for r in (a, b):
    r.pop("seconds"), r.pop("timing")  # wall-clock figures of each run
  assert_same(a, b)

  # Process 1 fails after initialize (a size the model cannot take): it exits 1 without
  # waiting for process 0, which would wait for it in the gather (then it is killed here).
  procs, logs = start_two(t, "failing", t / "failing.json", extra_for={1: ["--size=36"]})
  try:
    code = procs[1].wait(timeout=FAIL_BOUND_S)
  except subprocess.TimeoutExpired:
    code = None  # still waiting for process 0 (the normal exit path)
  finally:
    stop(procs)
  log = logs[1].read_text()
  assert code == 1, log[-5000:]
  assert "error: evaluation size 36x36 is not divisible" in log, log[-5000:]
  assert "exiting with status 1 without waiting for the other processes" in log, log[-5000:]
  assert not (t / "failing.json").exists()
