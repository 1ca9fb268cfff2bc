"""The device timing benchmark (`python benchmarks/bench.py`): records, errors; the planner's
memory fit estimate (`python -m vidtok_jax.planning --fit`)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from vidtok_jax.planning import __main__ as planner

sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark scripts are no package
import bench  # noqa: E402
import bench_utils  # noqa: E402

TINY = ["--shape=1,5,16,16", "--set=ch=4", "--repeats=2", "--warmup=1"]


def test_records_time_flops_and_memory(tmp_path):
  out = tmp_path / "bench.json"
  bench.main(TINY + ["--ops=forward,fwd_bwd,decode", "--no-isolate", f"--json={out}"])
  recs = {r["op"]: r for r in json.loads(out.read_text())}
  assert set(recs) == {"forward", "fwd_bwd", "decode"}
  for r in recs.values():
    assert r["compile_s"] > 0 and r["median_s"] > 0 and len(r["times_s"]) == 2
    assert r["median_s"] == pytest.approx(sorted(r["times_s"])[0] / 2 + sorted(r["times_s"])[1] / 2)
    assert r["peak_gib"] > 0 and r["memory"].startswith("process peak RSS")
    assert r["gflop"] > 0 and r["achieved_tflops"] == pytest.approx(r["gflop"] / 1e3 / r["median_s"])
  # 5 frames of a v1.0 4x model: 2 latents, 5 frames back; one clip per call.
  assert recs["forward"]["frames_per_s"] == pytest.approx(5 / recs["forward"]["median_s"])
  assert recs["decode"]["frames_per_s"] == pytest.approx(5 / recs["decode"]["median_s"])
  # The backward costs about twice the forward: XLA's cost analysis sees every conv.
  assert 2.0 < recs["fwd_bwd"]["gflop"] / recs["forward"]["gflop"] < 4.0
  assert recs["fwd_bwd"]["grad"] == "staged"  # --grad auto on CPU
  assert "utilisation" not in recs["forward"]  # no known peak for a CPU


def test_isolated_op_runs_in_a_subprocess(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, "benchmarks/bench.py", *TINY, "--ops=encode",
                         "--peak_tflops=1.0", f"--json={out}"], cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (rec,) = json.loads(out.read_text())
  assert rec["op"] == "encode" and rec["peak_tflops"] == 1.0
  assert rec["utilisation"] == pytest.approx(rec["achieved_tflops"])
  assert "encode" in proc.stdout and "median s" in proc.stdout


@pytest.mark.parametrize("argv,match", [
    (["--shape=1,17,64"], "--shape must be four"),
    (["--ops=forward,backward"], "unknown op"),
])
def test_bad_arguments_are_refused(argv, match, capsys):
  with pytest.raises(SystemExit):
    bench.main(argv)
  assert match in capsys.readouterr().err


def test_plans_are_the_planners():
  with pytest.raises(SystemExit, match="^error: --fit plans without running: python -m "
                     "vidtok_jax.planning --fit=16,80"):
    bench.main(["--fit=16,80"])
  with pytest.raises(SystemExit, match="error: --topology plans"):
    bench.main(["--ops=train_step", "--topology", "cpu"])


def test_bad_config_override_is_refused():
  with pytest.raises(ValueError, match="unknown model config field 'chh'"):
    bench.main(TINY + ["--set=chh=4", "--no-isolate"])


def test_device_peaks():
  assert bench_utils.device_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
  assert bench_utils.device_peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 66.9
  assert bench_utils.device_peak_tflops("cpu", "float32") is None


def test_fit_estimates_train_step_memory(tmp_path):
  out = tmp_path / "fit.json"
  planner.main(["--set=ch=4", "--fit=0.001,1000", "--fit_clips=5x16", "--fit_dtypes=float32",
                "--fit_remats=blocks", f"--json={out}"])
  (row,) = json.loads(out.read_text())
  assert row["dtype"] == "float32" and row["remat"] == "blocks"
  assert 0 < row["needs_gib"]["5x16x16"] < 1000
  assert row["largest_in_0.001gib"] is None and row["largest_in_1000gib"] == "5x16x16"


def test_staged_fwd_bwd_record(tmp_path):
  out, prog = tmp_path / "bench.json", tmp_path / "program.json"
  bench.main(TINY + ["--ops=fwd_bwd", "--grad=program", "--no-isolate", f"--json={prog}"])
  assert json.loads(prog.read_text())[0]["grad"] == "program"
  bench.main(TINY + ["--ops=fwd_bwd", "--grad=staged", "--residual_budget_mib=0.01",
                     "--no-isolate", f"--json={out}"])
  (rec,) = json.loads(out.read_text())
  assert rec["grad"] == "staged" and rec["median_s"] > 0 and rec["peak_gib"] > 0
  assert rec["gflop"] > 0 and rec["compile_s"] >= 0 and len(rec["times_s"]) == 2
  assert isinstance(rec["saved_stages"], list) and rec["residual_budget_mib"] == 0.01


class _Stage:

  def __init__(self, cost):
    self.cost = cost

  def cost_analysis(self):
    if isinstance(self.cost, Exception):
      raise self.cost
    return self.cost


def test_count_flops_falls_back_to_the_compiled_program():
  import jax
  import jax.numpy as jnp

  # Whatever the lowered program reports (nothing, 0, an error), the compiled one's count is used.
  for lowered in (_Stage(None), _Stage({}), _Stage({"flops": 0.0}), _Stage(NotImplementedError()),
                  _Stage([])):
    assert bench.count_flops(lowered, lambda: _Stage({"flops": 7.0})) == 7.0
  assert bench.count_flops(_Stage([{"flops": 3.0}]), _Stage(None)) == 3.0  # older jax: a list
  assert bench.count_flops(_Stage(None), _Stage(RuntimeError())) == 0.0
  # The real thing on this backend and jax version: a 2*n^3 matmul.
  lowered = jax.jit(lambda a: a @ a).lower(jnp.ones((64, 64)))
  assert bench.count_flops(lowered, lowered.compile) >= 2 * 64**3 * 0.9
