"""Which model config fields a checkpoint was made with, read from its tensor shapes.

A checkpoint of another width or depth than `--config` otherwise fails with hundreds of
mis-shaped keys; `config_hints` turns that into the field to change:

    config_hints(torch_shapes(state_dict), spec)
    # -> ["this checkpoint has ch=32 (the config has ch=8); pass --config.model.ch=32"]

Each field is read from a few tensors (e.g. `ch` = output channels of `encoder.conv_in`). A rule
is used only when it gives the config's own value on the config's own template, so a variant
whose layout breaks a rule yields no hint rather than a wrong one.
"""

import re

import numpy as np

from vidtok_jax.weights.keys import _flatten, torch_key, torch_shape


def torch_shapes(tree_or_state_dict) -> dict:
  """{official key: torch shape} of a state dict (flat, dotted keys) or a Flax params tree."""
  if all(isinstance(k, str) and "." in k for k in tree_or_state_dict) and not any(
      isinstance(v, dict) for v in tree_or_state_dict.values()):
    return {k: tuple(np.shape(v)) for k, v in tree_or_state_dict.items()}
  return {torch_key(p): torch_shape(p, np.shape(v)) for p, v in _flatten(tree_or_state_dict).items()}


def _rules(shapes: dict) -> dict:
  """Field -> value read from `shapes` (fields whose tensors are absent are left out)."""
  out = {}
  w = shapes.get("encoder.conv_in.conv.weight")
  if w is not None:
    out["ch"] = int(w[0])
  w = shapes.get("decoder.conv_in.conv.weight")
  if w is not None:
    out["z_channels"] = int(w[1])
  blocks = {m[1] for k in shapes for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m}
  if blocks:
    out["num_res_blocks"] = len(blocks)
  levels = {int(m[1]) for k in shapes for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m}
  if levels and "ch" in out:
    mult = []
    for i in range(max(levels) + 1):
      w = shapes.get(f"encoder.down.{i}.block.0.conv2.weight")
      if w is None or int(w[0]) % out["ch"]:
        mult = None
        break
      mult.append(int(w[0]) // out["ch"])
    if mult:
      out["ch_mult"] = tuple(mult)
  return out


def _value(spec, field):
  v = getattr(spec, field)
  return tuple(v) if isinstance(v, (list, tuple)) else v


def config_hints(shapes: dict, spec, template_shapes: dict) -> list:
  """Sentences naming each config field whose value in the checkpoint (`shapes`, torch layout)
  differs from `spec`'s, checked against `template_shapes` (the spec's own params)."""
  mine, theirs = _rules(template_shapes), _rules(shapes)
  hints = []
  for field, value in theirs.items():
    if field not in mine or mine[field] != _value(spec, field) or value == mine[field]:
      continue
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    flag_value = f"'({shown},)'" if isinstance(value, tuple) and len(value) == 1 else (
        f"'({shown})'" if isinstance(value, tuple) else shown)
    have = mine[field]
    have = ",".join(map(str, have)) if isinstance(have, tuple) else have
    hints.append(f"this checkpoint has {field}={shown} (the config has {field}={have}); "
                 f"pass --config.model.{field}={flag_value}")
  return hints


__all__ = ["config_hints", "torch_shapes"]
