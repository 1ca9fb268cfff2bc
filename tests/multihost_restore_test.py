"""`Checkpoints.restore` in a real 2-process JAX job (localhost coordinator, gloo CPU
collectives) where only process 1's read of the latest step fails: both processes must take the
same decision and none may hang.

One job runs three scenarios in turn on a tiny pytree (no model, no compile beyond the gather):
  persistent  process 1 cannot read step 2 (PermissionError): both raise, nothing moved;
  transient   process 1's first read fails (OSError): both restore step 2;
  corrupt     process 1 reads step 2 as broken (DATA_LOSS): both restore step 1, and step 2
              is moved aside once.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from vidtok_jax.train.checkpoint import Checkpoints

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 120  # a hang shows up as this timeout, not as a stuck CI job

WORKER = r"""
import json, sys
import jax
port, pid, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
import orbax.checkpoint as ocp
from vidtok_jax.train import checkpoint as ckpt_lib

ckpt_lib.RETRY_DELAYS_S = (0.01, 0.01)
original = ocp.PyTreeCheckpointHandler.restore
plan = {"fails": 0, "error": None}

def restore(self, path, *args, **kwargs):  # process 1's reads of step 2 fail as planned
  if pid == 1 and path.parent.name == "2" and plan["fails"]:
    plan["fails"] -= 1
    raise plan["error"]
  return original(self, path, *args, **kwargs)

ocp.PyTreeCheckpointHandler.restore = restore
target = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
ckpts = ckpt_lib.Checkpoints(directory)
for name, fails, error in (
    ("persistent", 99, PermissionError(13, "Permission denied")),
    ("transient", 1, OSError(5, "Input/output error")),
    ("corrupt", 1, ValueError("DATA_LOSS: Error decoding b-tree node"))):
  plan.update(fails=fails, error=error)
  try:
    restored, step = ckpts.restore(target)
    out = {"step": step, "w": np.asarray(restored["w"]).tolist()}
  except ckpt_lib.CheckpointError as e:
    out = {"error": type(e).__name__, "message": str(e)}
  print("RESULT", json.dumps(dict(out, scenario=name, steps=ckpts.all_steps())), flush=True)
ckpts.close()
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_one_process_failing_to_read_does_not_split_or_hang_the_job(tmp_path):
  directory = tmp_path / "checkpoints"
  with Checkpoints(directory, async_save=False) as ckpts:
    for step in (1, 2):
      ckpts.save(step, {"w": np.full(3, step, np.float32)})
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  port = free_port()
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO) for i in range(2)]
  outs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT_S)
      assert p.returncode == 0, stderr[-5000:]
      rows = [json.loads(line[len("RESULT "):]) for line in stdout.splitlines()
              if line.startswith("RESULT ")]  # gloo prints to stdout too
      outs.append({r["scenario"]: r for r in rows})
  except subprocess.TimeoutExpired:
    pytest.fail(f"the job hung (> {TIMEOUT_S} s)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  p0, p1 = outs
  path = directory / "2"
  # Persistent: process 1 raises its own error, process 0 one naming process 1; nothing moved.
  assert p1["persistent"]["error"] == p0["persistent"]["error"] == "CheckpointReadError"
  assert p1["persistent"]["message"].startswith(
      f"cannot read checkpoint step 2 at {path} (3 attempts): PermissionError")
  assert p0["persistent"]["message"] == (f"checkpoint step 2 at {path} could not be read by "
                                         "process(es) 1 (their logs give the error); nothing "
                                         "was moved")
  assert p0["persistent"]["steps"] == p1["persistent"]["steps"] == [1, 2]
  # Transient: retried on process 1; both restore step 2.
  for out in (p0, p1):
    assert (out["transient"]["step"], out["transient"]["w"]) == (2, [2.0] * 3)
  # Broken as read by process 1 alone: both move it aside (once) and restore step 1.
  for out in (p0, p1):
    assert (out["corrupt"]["step"], out["corrupt"]["w"], out["corrupt"]["steps"]) == (
        1, [1.0] * 3, [1])
  moved = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir())
  assert moved == ["2"] and not path.exists()
