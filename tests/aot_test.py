"""Ahead-of-time plans (`vidtok_jax.planning.aot`, `python -m vidtok_jax.planning --topology`).

The reporting path runs on this host's CPU device (`--topology cpu`); the TPU compile itself
needs libtpu: this interpreter's, or the `.venv-tpu` beside the repository that `make install-tpu`
(part of `make test`) creates. Without either it is skipped, except under CI, where it must run.
"""

import ast
import collections
import json
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import hlo_forms
import jax
import pytest

from vidtok_jax.planning import __main__ as planner
from vidtok_jax.planning import aot, configs
from vidtok_jax.train import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
# libtpu takes a lock file in the temp folder: let a background --topology compile run beside the tests
TPU_ENV = dict(os.environ, PYTHONPATH=str(REPO), TPU_SKIP_MDS_QUERY="1",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")
TINY = ["--config=vidtok_kl_causal_488_4chn", "--ops=train_step", "--set=ch=4",
        "--set=num_res_blocks=1", "--set=ch_mult=[1,2,2]", "--no-lpips", "--dtype=bfloat16"]

HLO = """
  %all-gather.3 = f32[1,3,64,8]{3,1,0,2} all-gather(%x), channel_id=32, dimensions={2}
  %cp = bf16[2,1,32,4]{3,2,1,0} collective-permute(%y), source_target_pairs={{0,1}}
  %ars = (f32[16]{0}, f32[16]{0}) all-reduce-start(%a, %b), to_apply=%add
  %ar = (f32[8]{0}, f32[4,4]{1,0}) all-reduce(%c, %d), to_apply=%add
  %add = f32[16]{0} add(%a, %b)
"""


def test_collectives_are_counted_with_bytes():
  c = aot.collectives(HLO)
  assert c["all-gather"] == dict(count=1, bytes=1 * 3 * 64 * 8 * 4, largest=6144)
  assert c["collective-permute"] == dict(count=1, bytes=2 * 32 * 4 * 2, largest=512)
  # async start: its largest buffer; a tuple all-reduce: every result
  assert c["all-reduce"] == dict(count=2, bytes=64 + (8 + 16) * 4, largest=96)


def test_mesh_spec_and_chips():
  assert aot.parse_mesh("data=16,space=4", 64) == dict(data=16, fsdp=1, space=4)
  assert aot.parse_mesh("space=8", 64) == dict(data=8, fsdp=1, space=8)
  assert aot.parse_mesh(None, 4) == dict(data=4, fsdp=1, space=1)
  with pytest.raises(ValueError, match="data x fsdp x space = 32, but the slice has 64"):
    aot.parse_mesh("data=8,space=4", 64)
  with pytest.raises(ValueError, match="AXIS=N"):
    aot.parse_mesh("model=4", 4)
  assert aot.chip_of("v5p:4x4x4")["hbm_gib"] == 95.0 and aot.chip_of("v5e:2x2")["name"] == "v5e"
  assert aot.chip_of("v6e:2x2")["bf16_tflops"] == 918.0 and aot.chip_of("cpu") is None


def test_fit_extrapolates_and_confirms(monkeypatch):
  calls = []

  def fake_plan(cfg, devices, backend, chip, shape):
    per_chip = shape[0] // 4  # 4 batch devices (8 devices, space 2)
    calls.append(per_chip)
    return dict(hbm_needed_gib=3.0 + 2.5 * per_chip + (0.5 if per_chip > 2 else 0.0),
                compile_s=1.0)

  monkeypatch.setattr(aot, "plan_train_step", fake_plan)

  class Cfg:  # what fit_batch reads of the config
    class model:
      remat = "none"

  row = aot.fit_batch(lambda b: Cfg, list(range(8)), "tpu", aot.chip_of("v5e:2x2"), 17, 128,
                      space=2, log=lambda *_: None)
  # 3 + 2.5 b <= 16 predicts 5; compiled 5 needs 16.0 GiB: fits, confirmed by that compile.
  assert row["predicted_max"] == 5 and row["max_clips_per_chip"] == 5
  assert row["confirmed_by_compile"] and calls == [1, 2, 5]
  assert row["fixed_gib"] == pytest.approx(3.0) and row["per_clip_gib"] == pytest.approx(2.5)


def test_topology_report_on_this_host(tmp_path):
  out = tmp_path / "plan.json"
  planner.main(TINY + ["--topology=cpu", "--shape=1,9,32,32", f"--json={out}"])
  (rec,) = json.loads(out.read_text())
  assert rec["topology"] == "cpu" and rec["devices"] == 1 and rec["clips_per_chip"] == 1
  assert rec["dtype"] == "bfloat16" and rec["precision"] == "default" and not rec["lpips"]
  m = rec["memory_gib"]
  assert rec["hbm_needed_gib"] == pytest.approx(m["arguments"] + m["outputs"] +
                                                m["temporaries"] - m["aliased"])
  assert m["temporaries"] > 0 and rec["tflop"] > 0 and rec["compile_s"] > 0
  assert rec["collectives"] == {}  # one device: nothing to exchange
  assert rec["stage"] == 1  # --stage auto at 32^2: the official stage 1


def test_stage_follows_the_official_recipe():
  assert configs.resolve_stage("auto", 128) == 1 and configs.resolve_stage("auto", 256) == 2
  assert configs.resolve_stage("1", 256) == 1
  cfg = configs.train_config("vidtok_kl_causal_488_4chn", {}, "bfloat16", 8, 17, 256, stage=2)
  assert cfg.train.fix_encoder and cfg.stage == 2
  assert not configs.train_config("vidtok_kl_causal_488_4chn", {}, "bfloat16", 16, 17,
                                  128).train.fix_encoder


def test_inference_plans_on_this_host(tmp_path):
  out = tmp_path / "plan.json"
  planner.main(TINY + ["--ops=encode,decode", "--topology=cpu", "--shape=1,9,32,32",
                     f"--json={out}"])
  enc, dec = json.loads(out.read_text())
  assert (enc["op"], dec["op"]) == ("encode", "decode")
  for r in (enc, dec):
    assert r["dtype"] == "bfloat16" and r["precision"] == "default" and r["clips_per_chip"] == 1
    assert r["hbm_needed_gib"] > 0 and r["tflop"] > 0 and r["collectives"] == {}
  assert dec["tflop"] > enc["tflop"]  # VidTok's decoder is the heavier half
  with pytest.raises(SystemExit, match="not forward"):
    planner.main(TINY + ["--ops=forward", "--topology=cpu"])


def _tpu_python():
  try:
    import libtpu  # noqa: F401

    return sys.executable
  except ImportError:
    venv = REPO / ".venv-tpu" / "bin" / "python"
    return str(venv) if venv.exists() else None


needs_libtpu = pytest.mark.skipif(_tpu_python() is None and not os.environ.get("CI"),
                                  reason="no libtpu (make install-tpu, or pip install -e .[tpu])")


@needs_libtpu
def test_tpu_topology_compile_on_a_cpu_machine(tmp_path):
  out = tmp_path / "tpu.json"
  p = subprocess.run([_tpu_python(), "-m", "vidtok_jax.planning", *TINY, "--topology=v5e:2x2",
                      "--mesh=data=2,space=2", "--shape=2,9,32,32", f"--json={out}",
                      "--ops=encode,train_step"],
                     capture_output=True, text=True, timeout=1500, cwd=REPO, env=TPU_ENV)
  assert p.returncode == 0, p.stderr[-4000:]
  enc, rec = json.loads(out.read_text())
  # encode: the batch over data, the height over space (as the streamer shards it)
  assert enc["op"] == "encode" and enc["chip"] == "v5e" and enc["clips_per_chip"] == 1
  assert enc["mesh"] == {"data": 2, "space": 2}
  assert enc["roofline_clips_per_s_per_chip"] > 0 and enc["fits"]
  assert rec["device_kind"].startswith("TPU v5") and rec["devices"] == 4
  assert rec["platform"] == enc["platform"] == "tpu"
  assert rec["mesh"] == {"data": 2, "space": 2} and rec["clips_per_chip"] == 1
  assert rec["chip"] == "v5e" and rec["fits"] and 0 < rec["hbm_needed_gib"] < 16
  assert rec["tflop"] > 0 and rec["gb_accessed"] > 0 and rec["roofline_s"] > 0
  assert rec["collectives"]["collective-permute"]["count"] > 0  # conv halos over "space"
  assert "HBM needed" in p.stdout


@needs_libtpu
def test_tpu_programs_lowered_here_are_the_tpus(tmp_path):
  """The train step and encode / decode lowered on this CPU host for `v5e:2x2` (no compile:
  `tests/hlo_forms.py` under libtpu) hold one convolution per conv kernel of more than one tap,
  in the recorded dtype and precision, and none of the CPU-only forms; meshes are checked
  against the topology's hosts."""
  out = tmp_path / "forms.json"
  p = subprocess.run([_tpu_python(), str(REPO / "tests" / "hlo_forms.py"), str(out)],
                     capture_output=True, text=True, timeout=900, cwd=REPO, env=TPU_ENV)
  assert p.returncode == 0, p.stderr[-4000:]
  r = json.loads(out.read_text())
  kernels, training, inference = ({part: collections.Counter({tuple(k): n for k, n in rows})
                                   for part, rows in r[key].items()}
                                  for key in ("kernels", "kernels_training", "kernels_inference"))
  assert kernels["decoder"][(3, 3, 3, 96, 3)] == 1  # conv_out: conv_by_taps on CPU
  step = r["train_step"]
  # "auto" resolved for the TPU, in the record and in the program alike
  assert step["rec"]["platform"] == "tpu" and step["rec"]["mesh"] == {"data": 2, "space": 2}
  assert (step["rec"]["dtype"], step["rec"]["precision"]) == ("bfloat16", "default")
  assert step["config_unchanged"]
  assert step["cpu_only"] == {"conv_by_taps": 0, "tie_to": 0}
  bf16_convs = collections.Counter(tuple(c[0]) for c in step["convs"] if c[1] == "bf16")
  # each kernel: a conv (the per-pixel temporal ones as 5-D convs, the TPU form)
  assert not (training["encoder"] + training["decoder"]) - bf16_convs
  assert all(set(c[2]) == {"DEFAULT"} for c in step["convs"])
  assert step["dots"] and all(set(d[1]) == {"DEFAULT"} for d in step["dots"])
  for op, part in (("encode", "encoder"), ("decode", "decoder")):
    rec = r[op]["rec"]
    assert (rec["platform"], rec["dtype"], rec["precision"]) == ("tpu", "bfloat16", "default")
    assert r[op]["cpu_only"] == {"conv_by_taps": 0, "tie_to": 0}
    # per-pixel temporal convs: 5-D convs over the video as it is; the temporal upsamplers'
    # convs folded to 2-D convs over the source frames (TPU inference forms)
    assert collections.Counter(tuple(c[0]) for c in r[op]["convs"]) == inference[part]
    assert all(c[1] == "bf16" for c in r[op]["convs"])
  assert r["v5p_hosts"] == [4] * 16 and r["v5p_space4"] == "ok"
  assert "must divide the 4 devices of each host" in r["v5p_space8"]


def test_lowering_leaves_the_callers_config_as_it_was():
  """`lower_train_step` (and so `plan_train_step`) works on a copy: the caller's global batch
  stays; on this host's CPU "auto" is float32 with exact convs and the CPU forms."""
  cfg = hlo_forms.tiny_train_config("auto")
  before = cfg.to_dict()
  lowered, rec = aot.lower_train_step(cfg, jax.devices()[:1], shape=(1, 9, 32, 32, 3))
  assert cfg.to_dict() == before and cfg.data.global_batch_size == 2
  assert rec["shape"] == [1, 9, 32, 32, 3] and rec["platform"] == jax.default_backend()
  if jax.default_backend() == "cpu":
    assert (rec["dtype"], rec["precision"]) == ("float32", "highest")
    text = lowered.as_text(debug_info=True)
    assert hlo_forms.cpu_only_forms(text)["conv_by_taps"] > 0  # the CPU program's own forms
    assert all(c["rhs"][1] == "f32" for c in hlo_forms.ops(text, "convolution"))


def test_mesh_is_checked_against_the_target_devices():
  """A space group must stay inside one host of the target (a v5p:4x4x4 slice: 16 hosts of 4
  chips), whatever this host has; a device count means this run's own devices."""
  cfg = hlo_forms.tiny_train_config("bfloat16")
  cfg.data.size, cfg.data.global_batch_size = 128, 16
  v5p = [SimpleNamespace(id=i, process_index=i // 4, platform="tpu") for i in range(64)]
  cfg.train.mesh.space = 4
  mesh_lib.check_mesh_config(cfg, v5p)
  cfg.train.mesh.space = 8
  with pytest.raises(ValueError, match="must divide the 4 devices of each host"):
    mesh_lib.check_mesh_config(cfg, v5p)
  if jax.process_count() == 1:
    mesh_lib.check_mesh_config(cfg, 64)  # one process: no host to span
  assert mesh_lib.platform_of(v5p) == "tpu" and mesh_lib.host_device_counts(v5p)[15] == 4


def _run(*args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                        cwd=REPO)


def test_planner_command_and_its_old_path():
  """`python -m vidtok_jax.planning`; `python -m vidtok_jax.bench` runs it for one more release,
  with a DeprecationWarning, and points its device timing (no --topology / --fit) to the
  benchmark in one `error:` line."""
  p = _run("-m", "vidtok_jax.planning", "--help")
  assert p.returncode == 0 and "--topology" in p.stdout and "--hlo_dir" in p.stdout, p.stderr
  p = _run("-W", "always::DeprecationWarning", "-m", "vidtok_jax.bench", "--help")
  assert p.returncode == 0 and "python -m vidtok_jax.planning" in p.stdout, p.stderr
  assert "DeprecationWarning: vidtok_jax.bench moved to vidtok_jax.planning" in p.stderr
  p = _run("-m", "vidtok_jax.bench", "--ops=encode,forward", "--repeats=5", "--no-isolate")
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 1 and len(lines) == 1, p.stderr
  assert lines[0].startswith("error: the device timing") and "benchmarks/bench.py" in lines[0]


# What only the device benchmark (benchmarks/) holds; no package module may import it.
BENCHMARK_ONLY = ("vidtok_jax.bench", "vidtok_jax.staged_grad", "vidtok_jax.models.stages",
                  "bench", "bench_utils", "staged_grad", "stages", "benchmarks")


def test_the_planner_holds_no_benchmark_code_and_no_import_circle():
  """Every import in the package, function-level ones included (aot's config import was one),
  names no benchmark module; a fresh process imports the planner's modules, aot first, alone."""
  bad = []
  for path in (REPO / "vidtok_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
      bad += [f"{path.relative_to(REPO)}: {n}" for n in names
              if n in BENCHMARK_ONLY or n.startswith("benchmarks.")]
  assert not bad, bad
  code = ("import sys; import vidtok_jax.planning.aot, vidtok_jax.planning.configs, "
          "vidtok_jax.planning.__main__; "
          f"print(sorted(set(sys.modules) & set({BENCHMARK_ONLY!r})))")
  p = _run("-c", code)
  assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr[-2000:]
