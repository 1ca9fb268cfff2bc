"""Reading and writing PyTorch state_dicts as {key: np.ndarray}, without PyTorch.

`.safetensors` is read with numpy alone; `.ckpt`/`.pt`/`.pth`/`.bin` files in `torch.save`'s zip
format (every PyTorch >= 1.6, so every official VidTok checkpoint) by `torch_zip` through the
package's one restricted unpickler (`unpickle.py`), which never runs code stored in the file.
Only the legacy pre-1.6 pickle format needs PyTorch (its weights-only unpickler, with
`unpickle.Inert` standing in for the non-tensor globals).
"""

import json
import os
from collections.abc import Mapping

import numpy as np

from vidtok_jax.weights import torch_zip
from vidtok_jax.weights.keys import _to_numpy
from vidtok_jax.weights.unpickle import Inert

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# safetensors dtype tag -> numpy dtype; BF16 is decoded by hand (numpy has no bfloat16).
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?", "BF16": "<u2"}


def load_state_dict(path):
  """Checkpoint file -> {torch key: np.ndarray}; bf16 becomes float32, other dtypes are kept.

  Lightning `.ckpt` files yield their `state_dict` entry (their other entries are skipped).
  Raises FileNotFoundError if `path` is absent, ValueError (naming the file) if it is corrupt or
  of an unknown kind, ImportError if a legacy (pre-zip) torch pickle is given and PyTorch is not
  installed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".safetensors":
    return _load_safetensors(path)
  if suffix in TORCH_SUFFIXES:
    return _load_torch(path)
  raise ValueError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors or one of "
                   f"{', '.join(TORCH_SUFFIXES)}")


def save_safetensors(state_dict, path, metadata=None):
  """Writes {key: array or torch tensor} to `path` (.safetensors), creating its folder."""
  from safetensors.numpy import save_file

  arrays = {str(k): np.ascontiguousarray(_to_numpy(v)) for k, v in state_dict.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(arrays, os.fspath(path), metadata=metadata)


def _load_safetensors(path):
  from safetensors.numpy import load_file

  try:
    state = load_file(path)
  except Exception as e:  # corrupt, or a safetensors too old to return bf16 to numpy
    try:
      state = _read_safetensors_raw(path)
    except Exception:
      raise ValueError(f"cannot read safetensors file {path}: {e}") from e
  return {k: _to_numpy(v) for k, v in state.items()}


def _read_safetensors_raw(path):
  """Minimal safetensors reader: u64 header size, JSON header, raw little-endian buffer."""
  with open(path, "rb") as f:
    blob = f.read()
  n = int.from_bytes(blob[:8], "little")
  if len(blob) < 8 or not 2 <= n <= len(blob) - 8:
    raise ValueError(f"{path}: bad safetensors header size {n}")
  header = json.loads(blob[8:8 + n])
  data = memoryview(blob)[8 + n:]
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    start, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    if not 0 <= start <= end <= len(data) or end - start != dtype.itemsize * int(np.prod(shape)):
      raise ValueError(f"{path}: bad data offsets for {key!r}")
    value = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
    if info["dtype"] == "BF16":  # bf16 is the top half of a float32: exact upcast
      value = (value.astype(np.uint32) << 16).view(np.float32)
    out[key] = value.copy()
  return out


# Inert stand-in for a pickled non-tensor object (hyper-parameters, callback state): the one
# restricted unpickler's, lent to torch's weights-only unpickler below.
_Opaque = Inert


def _torch_load(torch, path):
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    first = e
  # Lightning checkpoints may pickle objects the weights-only unpickler refuses (e.g. omegaconf
  # hyper-parameters). The weights never need them: let _Opaque stand in for exactly those globals.
  try:
    names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
  except Exception:
    names = []
  if names:
    try:
      with torch.serialization.safe_globals([(_Opaque, n) for n in names]):
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      first = e
  raise ValueError(f"cannot read PyTorch checkpoint {path}: {_cause(first)}") from first


def _cause(error):
  """The informative part of a torch.load error (drops the advice to disable weights_only)."""
  text = str(error)
  if "WeightsUnpickler error:" in text:
    text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = "refused by the weights-only unpickler: " + " ".join(text.split())
  return f"{type(error).__name__}: {text or 'empty or truncated file'}"


def _load_torch(path):
  if torch_zip.is_torch_zip(path):
    return torch_zip.read_state_dict(path)
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path} is not in torch.save's zip format (a legacy pickle, or not a "
                      "checkpoint); reading a legacy pickle needs PyTorch (`pip install "
                      "torch`); or convert it to .safetensors on a machine that has torch") from e
  obj = _torch_load(torch, path)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state_dict (mapping of tensors), "
                     f"got {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if not (hasattr(value, "detach") or isinstance(value, (np.ndarray, int, float))):
      raise ValueError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, "
                       "not a tensor")
    out[str(key)] = _to_numpy(value)
  return out
