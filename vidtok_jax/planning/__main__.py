r"""The planner: what a program needs on a device slice, compiled ahead of time, nothing run.

  python -m vidtok_jax.planning --topology v5p:4x4x4 --mesh data=16,space=4 --shape 64,17,256,256
  python -m vidtok_jax.planning --topology v5e:2x2 --ops encode,decode --shape 4,17,256,256
  python -m vidtok_jax.planning --topology v5e:2x2,v6e:2x2 --fit 17x128,17x256   # batch search
  python -m vidtok_jax.planning --fit 16,80 --shape 1,17,64,64     # largest clip per budget

`--topology v5p:4x4x4` (with `--ops train_step`, the default): compiles the train step ahead of
time for that TPU slice from this machine (needs libtpu: `pip install -e .[tpu]`), with the
project's mesh (`--mesh data=16,space=4`) and shardings, and reports per chip: HBM needed
(arguments, outputs, temporaries, aliasing) against the chip's HBM, XLA's TPU cost analysis, a
roofline step time and the compiled collectives (`vidtok_jax.planning.aot`). `--topology cpu`
does the same for this host's devices. With `--topology`, `--fit 17x128,17x256` finds for each
topology (comma list) x `--fit_remats` the largest per-chip batch of those clips that fits
(batches 1 and 2 compiled, the rest predicted linearly, the prediction confirmed by a compile).
The train step is the official recipe's stage for the clip size (`--stage auto`: stage 2, the
frozen encoder and decoder-only training, at 256^2 and above; stage 1 below). `--ops
encode,decode` with `--topology` plans inference the same way (batch over `data`, height over
`space`, as `Streamer(mesh=...)` shards it), with the roofline's clips/s per chip.
`--hlo_dir D` keeps each compiled program's text, for `python -m vidtok_jax.planning.traffic`.

`--fit 16,80` (no `--topology`): for each dtype x remat setting, the largest clip (from
`--fit_clips`) whose train step at batch 1 fits each memory budget, from XLA's memory analysis of
the step compiled for this backend (arguments + outputs + temporaries - aliased donations).

Timing on a device (time, peak memory, FLOP/s of encode / decode / forward / fwd_bwd /
train_step) is `python benchmarks/bench.py` in the repository.
"""

import argparse
import json
import pathlib
import sys

from vidtok_jax.planning import aot
from vidtok_jax.planning.configs import (
  abstract_train_step,
  add_model_flags,
  model_config,
  parse_set,
  resolve_stage,
  train_config,
)

GIB = 2**30
PLAN_OPS = ("train_step", "encode", "decode")
TIMED_OPS = ("forward", "fwd_bwd")  # device timing only (benchmarks/bench.py)
MOVED_TIMING = ("the device timing (time, memory, FLOP/s of each op) moved to "
                "`python benchmarks/bench.py` in the repository; this command plans without "
                "running: give --topology (e.g. cpu, v5p:4x4x4) or --fit")


def fit(a) -> list:
  """The largest clip of `--fit_clips` whose batch-1 train step fits each budget (estimate)."""
  import jax

  from vidtok_jax.train.compile_options import compiler_options

  budgets = [float(v) for v in a.fit.split(",")]
  clips = [tuple(int(v) for v in c.split("x")) for c in a.fit_clips.split(",")]
  out = []
  for dtype in a.fit_dtypes.split(","):
    for remat in a.fit_remats.split(","):
      row = dict(dtype=dtype, remat=remat, needs_gib={})
      for t, s in clips:
        cfg = train_config(a.config, {**a.overrides, "remat": remat}, dtype, 1, t, s,
                           a.precision, a.lpips, resolve_stage(a.stage, s))
        fn, args = abstract_train_step(cfg)
        compiled = jax.jit(fn, donate_argnums=(0,),
                           compiler_options=compiler_options()).lower(*args).compile()
        m = compiled.memory_analysis()
        need = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes) / GIB
        row["needs_gib"][f"{t}x{s}x{s}"] = round(need, 2)
        print(f"  {dtype:9s} remat={remat:6s} {t}x{s}x{s}: {need:7.2f} GiB", flush=True)
      for budget in budgets:
        fits = [c for c, g in row["needs_gib"].items() if g <= budget]
        row[f"largest_in_{budget:g}gib"] = fits[-1] if fits else None
      out.append(row)
  return out


def topology_main(a):
  """`--topology`: ahead-of-time train-step plans (or `--fit` searches) for a device slice."""
  import jax

  from vidtok_jax.train.precision import resolve_dtype

  bad = [op for op in a.op_list if op not in PLAN_OPS]
  if bad and not a.fit:
    raise SystemExit(f"--topology compiles train_step, encode and decode, not {', '.join(bad)}")
  records = []
  for topo in a.topology.split(","):
    if topo == "cpu":
      devices, backend, chip = jax.devices(), "cpu", None
    else:
      devices, backend, chip = aot.topology_devices(topo), "tpu", aot.chip_of(topo)
    dtype = resolve_dtype(a.dtype, backend)
    sizes = aot.parse_mesh(a.mesh, len(devices))

    def make_cfg(batch, t=a.shape[1], s=a.shape[2], remat=a.remat, dtype=dtype, sizes=sizes):
      cfg = train_config(a.config, {**a.overrides, "remat": remat}, dtype, batch, t, s,
                         a.precision, a.lpips, resolve_stage(a.stage, s))
      return aot.apply_mesh(cfg, sizes)

    if a.fit:
      for clip in a.fit.split(","):
        t, s = (int(v) for v in clip.split("x"))
        for remat in a.fit_remats.split(","):
          print(f"-- fit {topo} {clip} {dtype} remat={remat}", flush=True)
          row = aot.fit_batch(lambda b, t=t, s=s, remat=remat: make_cfg(b, t, s, remat),
                              devices, backend, chip, t, s, space=sizes["space"])
          row.update(topology=topo, dtype=dtype, remat=remat, mesh=sizes,
                     stage=resolve_stage(a.stage, s))
          print("   " + json.dumps(row), flush=True)
          records.append(row)
      continue
    for op in [o for o in a.op_list if o in ("encode", "decode")]:
      model_cfg = model_config(a, dtype)
      print(f"== {a.config} {op} {'x'.join(map(str, a.shape))} {dtype} for {topo} "
            f"({len(devices)} devices, mesh {sizes})", flush=True)
      rec = aot.plan_inference(model_cfg, op, devices, backend, chip, (*a.shape, 3), sizes,
                               hlo_path=_hlo_path(a, topo, op))
      rec.update(config=a.config, topology=topo, overrides=a.overrides)
      print(plan_table(rec), flush=True)
      records.append(rec)
    if "train_step" not in a.op_list:
      continue
    stage = resolve_stage(a.stage, a.shape[2])
    print(f"== {a.config} stage {stage} train_step {'x'.join(map(str, a.shape))} {dtype} "
          f"remat={a.remat} for {topo} ({len(devices)} devices, mesh {sizes})", flush=True)
    rec = aot.plan_train_step(make_cfg(a.shape[0]), devices, backend, chip,
                              (*a.shape, 3), hlo_path=_hlo_path(a, topo, "train_step"))
    rec.update(config=a.config, topology=topo, overrides=a.overrides)
    print(plan_table(rec), flush=True)
    records.append(rec)
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(records, indent=1))
  return records


def _hlo_path(a, topo: str, op: str):
  """Where `--hlo_dir` keeps one plan's compiled program text (None: not kept)."""
  if not a.hlo_dir:
    return None
  d = pathlib.Path(a.hlo_dir)
  d.mkdir(parents=True, exist_ok=True)
  mesh = (a.mesh or "auto").replace("=", "").replace(",", "-")
  shape = "x".join(map(str, a.shape))
  return d / f"{topo.replace(':', '-')}_{op}_{shape}_{mesh}_{a.dtype}.hlo.txt.gz"


def plan_table(r) -> str:
  m = r.get("memory_gib", {})
  lines = [f"per chip ({r['device_kind']}, {r['clips_per_chip']:g} clip(s)/chip, "
           f"mesh {r['mesh']}, {r['dtype']}, precision {r['precision']}):",
           f"  HBM needed {r.get('hbm_needed_gib', float('nan')):.2f} GiB"
           + (f" of {r['hbm_gib']:g} GiB ({'fits' if r['fits'] else 'DOES NOT FIT'})"
              if "hbm_gib" in r else "")
           + f" = arguments {m.get('arguments', 0):.2f} + outputs {m.get('outputs', 0):.2f} + "
             f"temporaries {m.get('temporaries', 0):.2f} - aliased {m.get('aliased', 0):.2f}",
           f"  cost: {r['tflop']:.2f} TFLOP, {r['gb_accessed']:.1f} GB accessed"
           + (f"; roofline {1e3 * r['roofline_s']:.0f} ms ({r['roofline_bound']}-bound)"
              if "roofline_s" in r else ""),
           f"  lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s"]
  if "roofline_clips_per_s_per_chip" in r:
    lines.insert(-1, f"  roofline {r['roofline_clips_per_s_per_chip']:.1f} clips/s per chip")
  for op, c in sorted(r["collectives"].items()):
    lines.append(f"  {op:18s} x{c['count']:<4d} {c['bytes'] / 2**20:10.2f} MiB "
                 f"(largest {c['largest'] / 2**20:.2f} MiB)")
  if "traffic" in r:
    from vidtok_jax.planning import traffic

    lines.append(traffic.table(r["traffic"], rows=12))
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m vidtok_jax.planning", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p, ", for the planned devices' platform")
  p.add_argument("--shape", default="1,17,64,64",
                 help="B,T,H,W of the input video (B: the global batch over the slice)")
  p.add_argument("--ops", default="train_step", help=f"with --topology, from {', '.join(PLAN_OPS)}")
  p.add_argument("--topology", default=None,
                 help="compile for a TPU slice, e.g. v5p:4x4x4 (needs libtpu; a comma list "
                      "with --fit), or 'cpu' (this host's devices): per-chip memory, cost, "
                      "collectives")
  p.add_argument("--mesh", default=None,
                 help="--topology: mesh axes, e.g. data=16,space=4 or data=4,fsdp=2,space=2 "
                      "(default: data over every device)")
  p.add_argument("--remat", default="none", choices=("none", "convs", "blocks"))
  p.add_argument("--stage", default="auto", choices=("auto", "1", "2"),
                 help="train_step: the training stage (2: frozen encoder, decoder-only); auto: "
                      "the official recipe's, stage 2 at 256^2 and above, stage 1 below")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="model config override, e.g. ch=64 (repeatable; or --config.model.ch=64)")
  p.add_argument("--json", default=None, help="write the records here")
  p.add_argument("--hlo_dir", default=None,
                 help="--topology: also write each compiled program's text here (gzip), to "
                      "re-read its traffic with `python -m vidtok_jax.planning.traffic report`")
  p.add_argument("--fit", default=None,
                 help="memory budgets in GiB, e.g. 16,80; with --topology: clips, e.g. "
                      "17x128,17x256 (per-chip batch search)")
  p.add_argument("--fit_clips", default="17x64,17x128,17x256,33x256,17x512,33x512,65x512")
  p.add_argument("--fit_dtypes", default="float32,bfloat16")
  p.add_argument("--fit_remats", default="none,convs,blocks")
  from vidtok_jax.cli import model_overrides_as_set

  # The timing flags of the old `python -m vidtok_jax.bench` (--repeats, --grad, ...) are left
  # for the check below, so such a command gets the one line that says where timing went.
  a, unknown = p.parse_known_args(model_overrides_as_set(sys.argv[1:] if argv is None else argv))
  ops = [o for o in a.ops.split(",") if o]
  bad = [o for o in ops if o not in PLAN_OPS + TIMED_OPS]
  if bad:
    p.error(f"unknown op(s) {bad}; ops: {', '.join(PLAN_OPS)}")
  if not a.topology and not a.fit:
    raise SystemExit(f"error: {MOVED_TIMING}")
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)} (device timing flags belong to "
            "`python benchmarks/bench.py`)")
  try:
    a.shape = tuple(int(v) for v in a.shape.split(","))
    assert len(a.shape) == 4 and min(a.shape) > 0
  except (ValueError, AssertionError):
    p.error(f"--shape must be four positive integers B,T,H,W, got {a.shape!r}")
  a.overrides = parse_set(a.set)
  a.op_list = ops
  return a


def main(argv=None):
  a = parse_args(argv)
  import vidtok_jax  # config errors surface before any compile

  vidtok_jax.load_config(a.config, **a.overrides)
  if a.topology:
    return topology_main(a)
  from vidtok_jax.train.precision import resolve_dtype

  a.dtype = resolve_dtype(a.dtype)
  rows = fit(a)
  print(json.dumps(rows, indent=1))
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(rows, indent=1))
  return rows


if __name__ == "__main__":
  main()
