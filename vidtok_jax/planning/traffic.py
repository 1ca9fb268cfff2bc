r"""Where a compiled program's memory traffic goes: its top ops by bytes accessed, grouped by the
model part they belong to.

XLA's `cost_analysis()` gives one total of bytes accessed; on accelerators this model is
memory-bound, so the question is which ops move those bytes. This reads the compiled HLO text
(the program the target runs, after fusion and layout assignment) and charges each executed
instruction its operands' and outputs' sizes, the way XLA's own cost model counts a fusion: what
it reads from and writes to memory, not what happens inside it. An instruction belongs to the
model part its `op_name` metadata names: Flax module paths (`encoder/down_1/block_0/...`) under
the jit and autodiff wrappers, with `bwd` for the transposed (backward) pass.

Two sizes per row. `bytes` is XLA's own measure (`cost_analysis()["bytes accessed"]`): logical
sizes in every memory space, so an operand that a TPU's memory-space assignment stages into its
on-chip VMEM (`copy-start` / `slice-start`, layouts marked `S(1)`) counts at the copy (HBM read,
VMEM write) and again at the op that reads it from VMEM. `padded` is what HBM moves: arrays in
VMEM count 0, and HBM arrays count with their tiles (e.g. `T(8,128)`: the two most minor
dimensions padded to multiples of 8 and 128, so an array whose minor dimension is 3 or 4 occupies
32-43x its logical size). The targets of the performance page are in XLA's measure; `padded` says
what an HBM-bound step pays.

Arguments of the step are named by their pytree path (`state.g_params['model']['encoder']...`):
their reads (weight staging, optimizer passes) are grouped as `weights <module path>`,
`optimizer state` and so on, so the weights of a model part are seen apart from its activations.

    python -m vidtok_jax.planning.traffic compare BEFORE.json AFTER.json
    python -m vidtok_jax.planning.traffic report PLAN.hlo.txt.gz

compares two plan records (`python -m vidtok_jax.planning --topology ... --json F`, which carry
a `traffic` entry) group by group; `report` reads a compiled program's text saved by
`python -m vidtok_jax.planning --topology ... --hlo_dir D` (gzip or plain) and prints its
table, without compiling again.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
from typing import Optional

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
               "u32": 4, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "f32": 4, "f64": 8, "c64": 8, "c128": 16}
# Instructions that move no data themselves (aliases, control flow whose bodies are counted,
# bookkeeping) or whose data movement is counted at their other half (async pairs).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
        "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
        "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done",
        "async-done", "async-update", "send-done", "recv-done", "domain", "get-dimension-size"}
# Wrappers JAX puts around names, e.g. `jit(train_step)/transpose(jvp(VidTok))/encoder/...`.
_WRAPPER = re.compile(r"^(jit|pjit|jvp|transpose|vmap|remat|checkpoint|custom_jvp_call|"
                      r"custom_vjp_call|closed_call|core_call|shard_map|xla_call|while|body|"
                      r"cond|branch_\d+|rematted_computation|checkpoint_name)\b")
_ROOT = re.compile(r"\(([A-Z]\w*)\)+$")
_METHOD = re.compile(r"^[A-Z]\w*\.\w+$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](?:\{([0-9,]*)(?::([^}]*))?\})?")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")


def _array_bytes(dtype: str, dims: str, layout: Optional[str], tiling: Optional[str]):
  """`(logical, padded)` bytes of one array shape. `logical` in any memory space (XLA's cost
  model counts them all); `padded` applies the layout's first tile and is 0 for arrays in
  another memory space than HBM (`S(1)`: a TPU's on-chip VMEM, where XLA's memory space
  assignment stages operands with `copy-start` / `slice-start`): reading them moves no HBM
  bytes."""
  shape = [int(d) for d in dims.split(",") if d]
  size = DTYPE_BYTES.get(dtype, 4)
  logical = size * math.prod(shape)
  if tiling and re.search(r"S\([1-9]\)", tiling):
    return logical, 0
  padded = logical
  if tiling and shape:
    tile = re.match(r"T\(([0-9,]+)\)", tiling)
    if tile:
      t = [int(v) for v in tile.group(1).split(",")]
      order = [int(v) for v in layout.split(",")] if layout else list(range(len(shape)))[::-1]
      dims_p = list(shape)
      # The tile covers the most minor dimensions: its last entry the most minor one.
      for k, tv in enumerate(reversed(t)):
        if k < len(order):
          d = order[k]
          dims_p[d] = -(-dims_p[d] // tv) * tv
      padded = size * math.prod(dims_p)
  return logical, padded


def shape_bytes(text: str):
  """`(logical, padded)` bytes of an HLO shape string (an array or a tuple of arrays)."""
  lo = pa = 0
  for m in _ARRAY.finditer(text):
    a, b = _array_bytes(*m.groups())
    lo, pa = lo + a, pa + b
  return lo, pa


def _split_shape(rest: str):
  """`(shape text, remainder)` of an instruction's right-hand side `SHAPE opcode(...)...`."""
  if rest.startswith("("):  # a tuple shape: up to its matching parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  i = rest.find(" ")
  return rest[:i], rest[i + 1:]


def _operands(rest: str):
  """Operand names of `opcode(%a, %b, ...)` and the attribute text after it."""
  i = rest.find("(")
  depth, j = 0, i
  for j in range(i, len(rest)):
    depth += rest[j] == "("
    depth -= rest[j] == ")"
    if depth == 0:
      break
  return rest[:i], re.findall(r"%([\w.\-]+)", rest[i:j + 1]), rest[j + 1:]


def parse(hlo: str) -> dict:
  """`{computation: [instruction dict]}` and the entry's name, of an HLO module's text."""
  comps, entry, cur = {}, None, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
      continue
    if cur is None or line.strip() == "}":
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    shape, rest = _split_shape(m.group(2))
    opcode, ops, attrs = _operands(rest)
    name = re.search(r'op_name="([^"]*)"', attrs)
    comps[cur].append(dict(name=m.group(1), shape=shape, opcode=opcode.strip(), operands=ops,
                           attrs=attrs, op_name=name.group(1) if name else ""))
  return dict(computations=comps, entry=entry)


_CALLED = re.compile(r"\b(?:body|condition|calls|branch_computations|true_computation|"
                     r"false_computation)=(\{[^}]*\}|%[\w.\-]+)")


def _executed(mod) -> list[str]:
  """The computations whose instructions run as such: the entry and, recursively, the bodies of
  its loops, branches and calls (not fusion bodies or reducers: charged at their caller)."""
  comps, seen, todo = mod["computations"], [], [mod["entry"]]
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.append(c)
    for ins in comps[c]:
      if ins["opcode"] != "fusion":
        for m in _CALLED.finditer(ins["attrs"]):
          todo += re.findall(r"%([\w.\-]+)", m.group(1))
  return seen


def model_part(op_name: str, depth: int = 2) -> str:
  """The model part of an `op_name`: the top Flax module (named in its autodiff wrapper, e.g.
  `jvp(VidTok)`), then its first `depth` module-path components, or the named scope
  (`optimizer`, ...) of ops outside modules; prefixed `bwd ` for the backward pass."""
  if not op_name:
    return "(unnamed)"
  arg = _ARG.match(op_name)
  if arg:  # a step argument, named by its pytree path
    return _arg_part(arg.group(1), re.findall(r"\['([^']*)'\]", op_name.replace("\\'", "'")),
                     depth)
  first = op_name.split(";")[0]
  parts = [p for p in first.split("/") if p]
  bwd = any(p.startswith("transpose(") for p in parts)
  mods = [p for p in parts if not _WRAPPER.match(p) and "(" not in p]
  mods = mods[:-1]  # the last component is the primitive
  # The top Flax module: named inside an autodiff wrapper (`jvp(VidTok)`), or as the method
  # called on it (`VidTok.encode`, outside autodiff).
  roots = [m.group(1) for p in parts for m in [_ROOT.search(p)] if m]
  roots += [p.split(".")[0] for p in mods if _METHOD.match(p)]
  mods = [p for p in mods if not _METHOD.match(p)]
  key = "/".join(roots[-1:] + mods[:depth]) or "(top level)"
  return ("bwd " if bwd else "") + key


# What a report's `bytes` / `padded` mean. Reports written before 2026-12-07 have no `measure`:
# their `bytes` left VMEM out, so they do not compare with these.
MEASURE = "xla-all-spaces/hbm-padded"

_ARG = re.compile(r"^(?:\w+\.)?(g_params|ema_params|d_params|lpips_params|g_opt_state|"
                  r"d_opt_state|d_batch_stats|params)\b")
_ARG_ROOT = {"g_params": "VidTok", "ema_params": "VidTok", "params": "VidTok",
             "d_params": "PatchDiscriminator", "d_batch_stats": "PatchDiscriminator",
             "lpips_params": "LPIPS"}


def _arg_part(field: str, keys: list, depth: int) -> str:
  """The group of a step argument's path: `weights VidTok/encoder/mid` for a model leaf,
  `optimizer state` for Adam moments, `EMA weights` for the EMA copy."""
  if field in ("g_opt_state", "d_opt_state"):
    return "optimizer state"
  keys = keys[1:] if keys[:1] == ["model"] else keys
  path = "/".join([_ARG_ROOT[field]] + keys[:depth])
  return ("EMA weights " if field == "ema_params" else "weights ") + path


def _output_bytes(ins):
  """What an instruction writes. An async `*-start` returns (its operand, the destination,
  sync flags): the first is an alias of the operand, not a write."""
  if ins["opcode"].endswith("-start") and ins["shape"].startswith("("):
    arrays = list(_ARRAY.finditer(ins["shape"]))[1:]
    lo = pa = 0
    for m in arrays:
      a, b = _array_bytes(*m.groups())
      lo, pa = lo + a, pa + b
    return lo, pa
  return shape_bytes(ins["shape"])


def _nearest_name(ins, by_name, step, depth: int = 4) -> str:
  """The op_name of the nearest instruction that has one, following `step` (producers or
  users) breadth first up to `depth` hops."""
  frontier = [ins]
  for _ in range(depth):
    frontier = [by_name[n] for i in frontier for n in step(i) if n in by_name]
    for i in frontier:
      if i["op_name"]:
        return i["op_name"]
  return ""


def report(hlo: str, top: int = 20, depth: int = 2) -> dict:
  """The traffic of a compiled program's HLO text: totals, the `top` ops and all groups by
  XLA's measure. Each row: bytes (XLA's measure: logical, every memory space), padded (HBM
  only, tile-padded), count / opcode, group."""
  mod = parse(hlo)
  comps = mod["computations"]
  ops, groups = [], collections.defaultdict(lambda: dict(bytes=0, padded=0, count=0))
  for c in _executed(mod):
    sizes = {ins["name"]: _output_bytes(ins) for ins in comps[c]}
    by_name = {ins["name"]: ins for ins in comps[c]}
    users = collections.defaultdict(list)
    for ins in comps[c]:
      for o in ins["operands"]:
        users[o].append(ins["name"])
    for ins in comps[c]:
      if ins["opcode"] in FREE:
        continue
      if not ins["op_name"]:
        # Copies, slices and layout changes XLA adds carry no source name: charge them to what
        # they move (the nearest named producer) or else to the nearest named user.
        ins["op_name"] = (_nearest_name(ins, by_name, lambda i: i["operands"]) or
                          _nearest_name(ins, by_name, lambda i: users[i["name"]]))
      lo, pa = sizes[ins["name"]]
      for o in ins["operands"]:
        a, b = sizes.get(o, (0, 0))
        lo, pa = lo + a, pa + b
      g = model_part(ins["op_name"], depth)
      ops.append(dict(name=ins["name"], opcode=ins["opcode"], group=g, bytes=lo, padded=pa,
                      shape=ins["shape"][:120], op_name=ins["op_name"][:200]))
      row = groups[g]
      row["bytes"] += lo
      row["padded"] += pa
      row["count"] += 1
  ops.sort(key=lambda r: -r["bytes"])
  group_rows = sorted(({"group": k, **v} for k, v in groups.items()), key=lambda r: -r["bytes"])
  by_opcode = collections.Counter()
  for r in ops:
    by_opcode[r["opcode"]] += r["bytes"]
  return dict(measure=MEASURE, bytes=sum(r["bytes"] for r in ops),
              padded=sum(r["padded"] for r in ops),
              ops=len(ops), top=ops[:top], groups=group_rows,
              opcodes=dict(by_opcode.most_common()))


def table(traffic: dict, rows: int = 15) -> str:
  """A text table of a `report`'s groups and top ops."""
  gb = lambda v: f"{v / 1e9:9.3f}"  # noqa: E731
  out = [f"traffic: {gb(traffic['bytes'])} GB accessed (XLA's measure), {gb(traffic['padded'])} "
         f"GB of HBM (tile-padded) in {traffic['ops']} ops",
         f"{'GB XLA':>9} {'GB HBM':>10} {'ops':>5}  group"]
  for g in traffic["groups"][:rows]:
    out.append(f"{gb(g['bytes'])} {gb(g['padded']):>10} {g['count']:5d}  {g['group']}")
  out.append(f"{'GB XLA':>9} {'opcode':<14} group / op")
  for r in traffic["top"][:rows]:
    out.append(f"{gb(r['bytes'])} {r['opcode']:<14} {r['group']}  {r['shape'][:60]}")
  return "\n".join(out)


def compare(before: dict, after: dict, rows: int = 30, measure: str = "bytes") -> str:
  """Group-by-group GB of two traffic reports (`before`, `after`, after - before), in XLA's
  measure (`measure="bytes"`) or HBM's (`"padded"`)."""
  if before.get("measure") != after.get("measure"):
    raise ValueError(f"the two reports were written by different meters ({before.get('measure')} "
                     f"vs {after.get('measure')}): re-read both programs with "
                     f"`python -m vidtok_jax.planning.traffic report` or plan them again")
  b = {g["group"]: g[measure] for g in before["groups"]}
  a = {g["group"]: g[measure] for g in after["groups"]}
  keys = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, 0), b.get(k, 0)))
  out = [f"{'before GB':>10} {'after GB':>10} {'change':>10}  group"]
  for k in keys[:rows]:
    x, y = b.get(k, 0) / 1e9, a.get(k, 0) / 1e9
    out.append(f"{x:10.3f} {y:10.3f} {y - x:+10.3f}  {k}")
  x, y = before[measure] / 1e9, after[measure] / 1e9
  out.append(f"{x:10.3f} {y:10.3f} {y - x:+10.3f}  total ({y / x if x else float('nan'):.2f}x)")
  return "\n".join(out)


def _traffic_of(path: str) -> dict:
  """The traffic report in a plan JSON (a record, or a list of records: the first with one)."""
  data = json.load(open(path))
  recs = data if isinstance(data, list) else [data]
  for r in recs:
    if "traffic" in r:
      return r["traffic"]
  raise SystemExit(f"error: {path}: no plan record with a 'traffic' entry (plan with "
                   f"`python -m vidtok_jax.planning --topology ... --json {path}`)")


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m vidtok_jax.planning.traffic",
                              description="Compare the memory traffic of two plan records.")
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("compare", help="group-by-group bytes of two plans")
  c.add_argument("before")
  c.add_argument("after")
  c.add_argument("--rows", type=int, default=30)
  c.add_argument("--hbm", action="store_true",
                 help="compare HBM bytes (tile-padded, VMEM excluded) instead of XLA's measure")
  r = sub.add_parser("report", help="the traffic table of a saved compiled program (HLO text)")
  r.add_argument("hlo", help="a file written by `python -m vidtok_jax.planning --topology ... "
                 "--hlo_dir D` (.gz or text)")
  r.add_argument("--rows", type=int, default=20)
  a = p.parse_args(argv)
  if a.cmd == "report":
    import gzip
    try:
      opener = gzip.open if a.hlo.endswith(".gz") else open
      with opener(a.hlo, "rt") as f:
        text = f.read()
    except OSError as e:
      raise SystemExit(f"error: {a.hlo}: cannot read the program text ({e})")
    print(table(report(text, top=max(a.rows, 1)), rows=a.rows))
    return 0
  try:
    print(compare(_traffic_of(a.before), _traffic_of(a.after), a.rows,
                  "padded" if a.hbm else "bytes"))
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  return 0


if __name__ == "__main__":
  sys.exit(main())
