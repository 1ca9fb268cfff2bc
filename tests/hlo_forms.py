"""What a lowered program holds (StableHLO text): its convolutions and dots with their operand
types and precisions, and whether it carries the CPU-only forms of `vidtok_jax.models.layers`.

Also a script, run by `aot_test.py` with the libtpu interpreter (`.venv-tpu/bin/python`):
`python tests/hlo_forms.py OUT.json` lowers the tiny train step and encode / decode for TPU
topologies (no compile) and writes what they hold.
"""

import collections
import json
import re
import sys

# Name scopes of the CPU-only forms (`conv_by_taps`, and `tie_to` of `early_weight_grad`); the
# debug locations of a lowered program carry them.
CPU_ONLY = ("conv_by_taps", "tie_to")

_TYPES = re.compile(r":\s*\(tensor<([0-9x]*)x?([a-z0-9]+)>,\s*tensor<([0-9x]*)x?([a-z0-9]+)>\)")


def _shape(dims: str) -> tuple:
  return tuple(int(d) for d in dims.split("x") if d)


def ops(text: str, name: str) -> list:
  """`[{"lhs": (shape, dtype), "rhs": (shape, dtype), "precision": [..]}]` of every
  `stablehlo.<name>` (convolution, dot_general) in `text`."""
  out = []
  for line in text.splitlines():
    if f"stablehlo.{name}" not in line:
      continue
    m = _TYPES.search(line)
    # convolution: `precision_config = [#stablehlo<precision X>, ...]`; dot_general:
    # `precision = [X, Y]` (JAX writes both, DEFAULT where none is asked for)
    out.append(dict(lhs=(_shape(m.group(1)), m.group(2)), rhs=(_shape(m.group(3)), m.group(4)),
                    precision=re.findall(r"\b(DEFAULT|HIGHEST|HIGH)\b", line)))
  return out


def cpu_only_forms(text: str) -> dict:
  """`{scope: occurrences}` of the CPU-only name scopes in `text` (lowered with debug info)."""
  return {s: text.count(s) for s in CPU_ONLY}


def conv_kernel_rhs(params, temporal_5d: bool = False,
                    folded_time_up: bool = False) -> collections.Counter:
  """The rhs shape `conv3d` gives each conv kernel of more than one tap in `params` (a 2-D conv
  for per-frame `(1, kh, kw)` kernels; per-pixel `(kt, 1, 1)` kernels a 2-D conv, or with
  `temporal_5d` (TPU) a 5-D one with kernel `(1, kt, 1)`, and on TPU `(kt, kh, kw)` kernels
  over at most 128 / kt channels one 2-D conv over stacked frames), counted. `folded_time_up` (TPU
  inference): the temporal upsamplers' `(3, kh, kw, C, O)` kernels folded to one 2-D conv over two
  stacked source frames with both output phases, `(kh, kw, 2C, 2O)` (`conv3d_time_repeated`)."""
  import jax

  out = collections.Counter()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    shape = tuple(leaf.shape)
    if getattr(path[-1], "key", None) != "kernel" or len(shape) != 5 or shape[0] * shape[1] * \
        shape[2] == 1:
      continue
    kt, kh, kw, c, o = shape
    keys = [str(getattr(k, "key", "")) for k in path]
    if (folded_time_up and kt == 3 and (kh, kw) != (1, 1) and "upsample" in keys
        and any(k.startswith("up_temporal") for k in keys)):
      out[(kh, kw, 2 * c, 2 * o)] += 1
      continue
    if temporal_5d and kt > 1 and (kh, kw) != (1, 1) and kt * c <= 128:  # `time_taps_conv`
      out[(kh, kw, kt * c, o)] += 1
      continue
    temporal = (1, kt, 1, c, o) if temporal_5d else (kt, 1, c, o)
    out[temporal if (kh, kw) == (1, 1) else (kh, kw, c, o) if kt == 1 else shape] += 1
  return out


def conv_rhs(text: str, dtype=None) -> collections.Counter:
  """The rhs shapes of the convolutions in `text` (of `dtype` only, if given), counted."""
  return collections.Counter(op["rhs"][0] for op in ops(text, "convolution")
                             if dtype is None or op["rhs"][1] == dtype)


# The tiny model whose decoder `conv_out` (3x3x3, 96 -> 3) takes `conv_by_taps` on CPU
# (taps x outputs = 81 <= 96 inputs).
TINY = dict(ch=96, ch_mult=(1, 1, 1), num_res_blocks=1)


def tiny_train_config(dtype="auto"):
  from vidtok_jax.planning.configs import train_config

  return train_config("vidtok_kl_causal_488_4chn", TINY, dtype, 2, 9, 32, lpips=False)


def _probe(out_path):
  """Lowers for TPU topologies and writes what the programs hold (run with libtpu)."""
  import jax

  import vidtok_jax
  from vidtok_jax.planning import aot
  from vidtok_jax.train import mesh as mesh_lib

  res = {}
  devices = aot.topology_devices("v5e:2x2")
  cfg = aot.apply_mesh(tiny_train_config("auto"), aot.parse_mesh("data=2,space=2", 4))
  before = cfg.to_json()
  lowered, rec = aot.lower_train_step(cfg, devices, shape=(2, 9, 32, 32, 3))
  text = lowered.as_text(debug_info=True)
  res["train_step"] = dict(
      rec=rec, config_unchanged=cfg.to_json() == before, cpu_only=cpu_only_forms(text),
      convs=[[list(o["rhs"][0]), o["rhs"][1], o["precision"]] for o in ops(text, "convolution")],
      dots=[[o["lhs"][1], o["precision"]] for o in ops(text, "dot_general")])
  model_cfg = vidtok_jax.load_config("vidtok_kl_causal_488_4chn", **TINY, dtype="bfloat16",
                                     precision="default")
  params = vidtok_jax.abstract_params(model_cfg)
  res["kernels"] = {part: [[list(k), n] for k, n in conv_kernel_rhs(params[part]).items()]
                    for part in ("encoder", "decoder")}
  res["kernels_training"] = {
      part: [[list(k), n] for k, n in conv_kernel_rhs(params[part], temporal_5d=True).items()]
      for part in ("encoder", "decoder")}
  res["kernels_inference"] = {
      part: [[list(k), n] for k, n in conv_kernel_rhs(params[part], temporal_5d=True,
                                                       folded_time_up=True).items()]
      for part in ("encoder", "decoder")}
  for op in ("encode", "decode"):
    lowered, rec = aot.lower_inference(model_cfg, op, devices, shape=(2, 9, 32, 32, 3),
                                       sizes=dict(data=2, fsdp=1, space=2))
    text = lowered.as_text(debug_info=True)
    res[op] = dict(rec=rec, cpu_only=cpu_only_forms(text),
                   convs=[[list(o["rhs"][0]), o["rhs"][1]] for o in ops(text, "convolution")])
  # A v5p:4x4x4 slice has 4 chips per host: a space group of 8 would span two hosts.
  v5p = aot.topology_devices("v5p:4x4x4")
  big = tiny_train_config("bfloat16")
  big.data.size = 128
  big.data.global_batch_size = 16
  res["v5p_hosts"] = sorted(mesh_lib.host_device_counts(v5p).values())
  for space in (4, 8):
    big.train.mesh.space = space
    try:
      mesh_lib.check_mesh_config(big, v5p)
      res[f"v5p_space{space}"] = "ok"
    except ValueError as e:
      res[f"v5p_space{space}"] = str(e)
  res["jax_platform"] = jax.default_backend()
  with open(out_path, "w") as f:
    json.dump(res, f)


if __name__ == "__main__":
  _probe(sys.argv[1])
