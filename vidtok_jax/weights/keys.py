"""Official PyTorch state_dict keys <-> Flax params (pure numpy; no torch, no model import).

The Flax params tree mirrors the PyTorch module tree:
  * list items `down.<i>`, `up.<i>`, `down_temporal.<i>`, `up_temporal.<i>`, `block.<j>` are the
    Flax modules `down_<i>`, …, `block_<j>`; under `mid`, `block_1`/`block_2`/`attn_1` are plain
    attribute names (torch `mid.block_1`);
  * every other module name is the torch attribute name, wrappers included (`….conv_in.conv`,
    `….norm1.norm`);
  * leaves: `kernel`/`scale` <-> `weight`, `bias` <-> `bias`, `mix_factor` <-> `mix_factor`.

Layouts: Flax stores every conv as a 3-D kernel `(kt, kh, kw, I, O)`; torch has Conv3d
`(O, I, kt, kh, kw)`, per-frame Conv2d `(O, I, kh, kw)` (Flax `(1, kh, kw, I, O)`), temporal
Conv1d `(O, I, k)` (Flax `(k, 1, 1, I, O)`) and Linear `(O, I)` (Flax Dense `(I, O)`).
"""

import re
from collections.abc import Mapping

import numpy as np

_LIST_ITEM = re.compile(r"^(down|up|down_temporal|up_temporal|block)_(\d+)$")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mix_factor": "mix_factor"}

# Torch rank of a `kernel` leaf, decided by its Flax module path ('/'-joined, leaf excluded).
# First match wins. Order matters: `(down|up)_\d+` cannot match `down_temporal_0`.
_KERNEL_RANK_RULES = (
    (re.compile(r"(^|/)project_(in|out)$"), 2),  # FSQ nn.Linear
    (re.compile(r"^(encoder|decoder)/(down|up)_\d+/"), 4),  # per-frame Conv2d (blocks, resamplers)
    (re.compile(r"^(encoder|decoder)/(down|up)_temporal_\d+/block_\d+/"), 3),  # Conv1d
    (re.compile(r""), 5),  # Conv3d: conv_in/out, mid, attention, temporal resamplers
)


def _strip_collection(path):
  """Drops a leading 'params' collection name, so `{'params': tree}` works too."""
  path = tuple(str(p) for p in path)
  return path[1:] if path and path[0] == "params" else path


def torch_key(flax_path):
  """Official state_dict key of one Flax param leaf, e.g.
  ('encoder', 'down_0', 'block_1', 'conv1', 'kernel') -> 'encoder.down.0.block.1.conv1.weight'."""
  path = _strip_collection(flax_path)
  if not path or path[-1] not in _LEAF:
    raise ValueError(f"unknown Flax param leaf {'/'.join(path)!r}: expected one of {sorted(_LEAF)}")
  parts = []
  for i, name in enumerate(path[:-1]):
    m = _LIST_ITEM.match(name)
    if m and not (i > 0 and path[i - 1] == "mid"):  # mid.block_1 is an attribute, not a list
      parts += [m.group(1), m.group(2)]
    else:
      parts.append(name)
  return ".".join(parts + [_LEAF[path[-1]]])


def kernel_torch_rank(flax_path):
  """Torch rank behind a Flax `kernel` leaf: 2 Linear, 3 Conv1d, 4 Conv2d, 5 Conv3d."""
  module = "/".join(_strip_collection(flax_path)[:-1])
  return next(rank for pattern, rank in _KERNEL_RANK_RULES if pattern.search(module))


def torch_shape(flax_path, flax_shape):
  """Torch shape of a Flax leaf: kernels `(*k, I, O)` -> `(O, I, *k')`, where k' drops the unit axes
  the Flax layout adds (T for 2-D convs, H and W for 1-D convs); other leaves keep their shape."""
  flax_shape = tuple(int(d) for d in flax_shape)
  if _strip_collection(flax_path)[-1] != "kernel":
    return flax_shape
  rank = kernel_torch_rank(flax_path)
  *k, i, o = flax_shape
  if len(k) == 3 and rank == 4:
    k = k[1:] if k[0] == 1 else None  # (1, kh, kw) -> (kh, kw)
  elif len(k) == 3 and rank == 3:
    k = k[:1] if k[1:] == [1, 1] else None  # (k, 1, 1) -> (k,)
  if k is None or len(k) != rank - 2:
    raise ValueError(f"Flax kernel {'/'.join(map(str, flax_path))} of shape {flax_shape} cannot "
                     f"hold a rank-{rank} torch weight ({torch_key(flax_path)})")
  return (o, i, *k)


def _flatten(tree, prefix=()):
  """Nested mapping -> {path tuple: leaf}."""
  out = {}
  for name, value in tree.items():
    path = prefix + (str(name),)
    if isinstance(value, Mapping):
      out.update(_flatten(value, path))
    else:
      out[path] = value
  return out


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def _to_numpy(value):
  """numpy array, or a torch tensor (duck-typed: torch is never imported here); bf16 -> float32."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bf16; float32 holds bf16/fp16 exactly
    return value.numpy()
  value = np.asarray(value)
  if value.dtype.kind == "V":
    value = value.astype(np.float32)  # ml_dtypes bf16 (as safetensors.numpy returns it)
  return value


def _keyed_paths(template):
  flat = _flatten(template)
  keys = {}
  for path in flat:
    key = torch_key(path)
    if key in keys:
      raise ValueError(f"Flax paths {keys[key]} and {path} both map to torch key {key!r}")
    keys[key] = path
  return flat, keys


def params_from_state_dict(state_dict, template, *, ignore_prefixes=("loss.", "model_ema.")):
  """Official state_dict -> Flax params shaped like `template` (nested dict of leaves with `.shape`
  and optionally `.dtype`, e.g. jax.ShapeDtypeStruct). Returns a nested dict of np.ndarray cast to
  each template leaf's dtype. Raises one ValueError listing every missing, unexpected (not consumed
  and not under `ignore_prefixes`) and mis-shaped key."""
  flat, keys = _keyed_paths(template)
  missing = sorted(k for k in keys if k not in state_dict)
  unexpected = sorted(k for k in state_dict
                      if k not in keys and not str(k).startswith(tuple(ignore_prefixes)))
  misshaped, out = [], {}
  for key, path in keys.items():
    if key in missing:
      continue
    leaf = flat[path]
    value = _to_numpy(state_dict[key])
    try:
      want = torch_shape(path, leaf.shape)
    except ValueError as e:
      misshaped.append(f"  {key}: {e}")
      continue
    if tuple(value.shape) != want:
      misshaped.append(f"  {key}: torch shape {tuple(value.shape)}, expected {want} "
                       f"(Flax {'/'.join(path)} {tuple(leaf.shape)})")
      continue
    if path[-1] == "kernel":
      value = np.moveaxis(value, (0, 1), (-1, -2))  # (O, I, *k) -> (*k, I, O)
    # Only unit axes differ here (the torch shape was derived from the Flax shape).
    out[path] = np.asarray(value.reshape(leaf.shape), dtype=getattr(leaf, "dtype", np.float32))
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}):\n" + "\n".join(f"  {k}" for k in missing))
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}):\n"
                    + "\n".join(f"  {k}" for k in unexpected))
  if misshaped:
    problems.append(f"mis-shaped keys ({len(misshaped)}):\n" + "\n".join(misshaped))
  if problems:
    raise ValueError("state_dict does not match the Flax params template:\n" + "\n".join(problems))
  return _unflatten(out)


def state_dict_from_params(params):
  """Flax params (nested mapping of arrays) -> {torch key: float32 np.ndarray in torch layout}."""
  flat, keys = _keyed_paths(params)
  out = {}
  for key, path in keys.items():
    value = np.asarray(flat[path], dtype=np.float32)
    shape = torch_shape(path, value.shape)
    if path[-1] == "kernel":
      value = np.moveaxis(value, (-1, -2), (0, 1))  # (*k, I, O) -> (O, I, *k)
    out[key] = np.ascontiguousarray(value.reshape(shape))
  return out
