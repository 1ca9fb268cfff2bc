"""`benchmarks/inference.py`: runs without TensorFlow and PyAV and records its figures."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent

# TensorFlow and PyAV made unimportable (as on a GPU machine without them), then the script.
CHILD = """
import runpy, sys
sys.modules["tensorflow"] = None
sys.modules["av"] = None
sys.argv = ["inference.py"] + sys.argv[1:]
runpy.run_path("benchmarks/inference.py", run_name="__main__")
"""


def test_runs_without_tensorflow_or_pyav(tmp_path):
  out = tmp_path / "inf.json"
  cmd = [sys.executable, "-c", CHILD, "--ch=4", "--size=32",
         "--ops=encode,decode,reconstruct,long",
         "--long_frames=17", "--repeats=1", f"--json={out}"]
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res = json.loads(out.read_text())
  for op in ("encode", "decode", "reconstruct"):
    assert res[op]["shape"] == [1, 17, 32, 32] and res[op]["clips_per_s"] > 0
  assert res["long"]["shape"] == [1, 17, 32, 32] and res["long"]["frames_per_s"] > 0
  assert res["device"].startswith("cpu")
