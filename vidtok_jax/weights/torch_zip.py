"""PyTorch checkpoint files (`torch.save`'s zip format) read with numpy alone: no torch import.

A `.ckpt` / `.pt` written by `torch.save` (PyTorch >= 1.6, Lightning included) is a zip holding
`<archive>/data.pkl` (a pickle of the saved object) and `<archive>/data/<key>` (the raw bytes of
each storage). The pickle is read by a restricted unpickler:

  * tensors (`torch._utils._rebuild_tensor_v2/_v3`, `_rebuild_parameter`) are rebuilt as numpy
    arrays from their storage, offset, size and stride: strided views and storages shared between
    tensors come out as torch has them; bfloat16 becomes float32 (exact); other dtypes are kept;
  * `collections.OrderedDict` and the storage / dtype markers are the only other globals it knows;
  * every other global (optimizer classes, Lightning callbacks, `os.system`, ...) becomes an
    inert `Placeholder`: it is never imported and never called, it keeps nothing it is given.
The unpickler is the package's one restricted unpickler (`weights/unpickle.py`) with this table.

`read_state_dict` returns only the `state_dict` (the saved object itself when that is a bare
state dict). A placeholder inside it is a ValueError naming the key; placeholders elsewhere
(Lightning's optimizer, callback and loop states) are skipped with one warning line.
"""

import collections
import functools
import logging
import pickle
import zipfile

import numpy as np

from vidtok_jax.weights.unpickle import Inert, RestrictedUnpickler, inert

log = logging.getLogger(__name__)

# Legacy typed-storage class name -> numpy dtype ("bf16": uint16 bits, widened to float32 below).
_STORAGES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "BFloat16Storage": "bf16", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
    "UntypedStorage": "u1",
}
# `torch.<dtype>` globals (the dtype argument of `_rebuild_tensor_v3`).
_DTYPES = {
    "float32": "<f4", "float": "<f4", "float64": "<f8", "double": "<f8", "float16": "<f2",
    "half": "<f2", "bfloat16": "bf16", "int64": "<i8", "long": "<i8", "int32": "<i4",
    "int": "<i4", "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
}


# Inert stand-in for a pickled global this reader does not know (the shared `unpickle.Inert`).
Placeholder = Inert


def _placeholder(module, name):
  return inert(module, name)


class _Dtype:
  """A `torch.<dtype>` global (kept by name; turned into a numpy dtype when a tensor is built)."""

  def __init__(self, name):
    self.name = name


class _StorageType:
  def __init__(self, name):
    self.name = name


class _Storage:
  """One storage record of the archive: flat bytes, read once and shared by every tensor on it."""

  def __init__(self, data: bytes, kind: str, numel: int, key: str):
    self.data, self.kind, self.numel, self.key = data, kind, numel, key


def _numpy_dtype(kind):
  return np.dtype("<u2" if kind == "bf16" else kind)


def _rebuild_tensor(storage, offset, size, stride, dtype_kind=None):
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"tensor rebuilt from {storage!r}, not from a storage record")
  kind = dtype_kind or storage.kind
  dtype = _numpy_dtype(kind)
  flat = np.frombuffer(storage.data, dtype=dtype, count=len(storage.data) // dtype.itemsize)
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise pickle.UnpicklingError(f"storage {storage.key}: bad tensor geometry (offset {offset}, "
                                 f"size {size}, stride {stride})")
  if 0 in size:
    array = np.zeros(size, dtype)
  else:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= flat.size:
      raise pickle.UnpicklingError(f"storage {storage.key} holds {flat.size} elements; a tensor of "
                                   f"size {size} stride {stride} at offset {offset} needs "
                                   f"{last + 1}")
    array = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                            strides=[s * dtype.itemsize for s in stride]).copy()
  if kind == "bf16":  # bf16 is the top half of a float32: exact upcast
    array = (array.astype(np.uint32) << 16).view(np.float32)
  return array


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
  return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
  if not isinstance(dtype, _Dtype) or dtype.name not in _DTYPES:
    raise pickle.UnpicklingError(f"unsupported tensor dtype {getattr(dtype, 'name', dtype)!r}")
  kind = _DTYPES[dtype.name]
  if storage.kind != "u1":  # a typed storage must already hold this dtype
    kind = storage.kind
  return _rebuild_tensor(storage, offset, size, stride, kind)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  # A Tensor with Python attributes (or a subclass): the data is still `func(*args)`.
  if func in _REBUILDERS.values():
    return func(*args)
  return _placeholder("torch._tensor", "_rebuild_from_type_v2")()


_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


@functools.cache
def _allowed() -> dict:
  """The globals this reader knows: tensor rebuilders, OrderedDict, storage and dtype markers."""
  table = dict(_REBUILDERS)
  table[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2
  table[("collections", "OrderedDict")] = collections.OrderedDict
  for module in ("torch", "torch.storage"):
    table.update({(module, name): _StorageType(name) for name in _STORAGES})
  table.update({("torch", name): _Dtype(name) for name in _DTYPES})
  return table


class _Unpickler(RestrictedUnpickler):
  """The shared restricted unpickler with torch's storage records; every unknown global becomes
  a `Placeholder` (recorded in `placeholders`), never imported."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
    super().__init__(file, _allowed(), unknown=self._stand_in)
    self._archive, self._prefix, self._big_endian = archive, prefix, big_endian
    self._storages = {}
    self.placeholders = []

  def _stand_in(self, module, name):
    cls = _placeholder(module, name)
    self.placeholders.append(cls.global_name)
    return cls

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.200}")
    _, storage_type, key, _location, numel = pid
    key = str(key)
    if key not in self._storages:
      kind = _STORAGES[storage_type.name]
      try:
        data = self._archive.read(f"{self._prefix}data/{key}")
      except KeyError:
        raise pickle.UnpicklingError(f"storage record data/{key} is missing") from None
      dtype = _numpy_dtype(kind)
      if len(data) < int(numel) * dtype.itemsize:
        raise pickle.UnpicklingError(f"storage record data/{key} holds {len(data)} bytes, "
                                     f"{numel} elements of {dtype} need more")
      if self._big_endian and dtype.itemsize > 1:
        data = np.frombuffer(data, dtype.newbyteorder(">")).astype(dtype).tobytes()
      self._storages[key] = _Storage(data, kind, int(numel), key)
    return self._storages[key]


def is_torch_zip(path) -> bool:
  return zipfile.is_zipfile(path)


def load(path):
  """The object `torch.save` wrote to `path`, tensors as numpy arrays and unknown globals as
  `Placeholder`s. Raises ValueError naming the file for anything unreadable."""
  try:
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
      if len(pickles) != 1:
        raise ValueError(f"expected one data.pkl record, found {len(pickles)}")
      prefix = pickles[0][: -len("data.pkl")]
      names = set(archive.namelist())
      big_endian = (f"{prefix}byteorder" in names
                    and archive.read(f"{prefix}byteorder").strip() == b"big")
      with archive.open(pickles[0]) as f:
        unpickler = _Unpickler(f, archive, prefix, big_endian)
        obj = unpickler.load()
  except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, EOFError, KeyError,
          TypeError, AttributeError, IndexError) as e:
    raise ValueError(f"cannot read PyTorch checkpoint {path}: {type(e).__name__}: {e}") from e
  return obj


def _placeholders_in(obj, path=""):
  """(path, global name) of every placeholder inside nested dicts / lists / tuples."""
  if isinstance(obj, Placeholder):
    yield path, obj.global_name
  elif isinstance(obj, dict):
    for k, v in obj.items():
      yield from _placeholders_in(v, f"{path}.{k}" if path else str(k))
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      yield from _placeholders_in(v, f"{path}[{i}]")


def read_state_dict(path):
  """`{key: np.ndarray}` of the checkpoint's `state_dict` (or of the file itself when it is a bare
  state dict). ValueError naming the file and key for anything in it that is not a tensor."""
  obj = load(path)
  state_dict = obj
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    state_dict = obj["state_dict"]
    skipped = sorted({name for _, name in _placeholders_in(
        {k: v for k, v in obj.items() if k != "state_dict"})})
    if skipped:
      log.warning("%s: skipped %d unreadable object type(s) outside state_dict (%s)", path,
                  len(skipped), ", ".join(skipped))
  elif isinstance(obj, Placeholder):
    raise ValueError(f"{path}: the saved object is a {obj.global_name}, not a state_dict")
  if not isinstance(state_dict, dict):
    raise ValueError(f"{path}: expected a state_dict (mapping of tensors), "
                     f"got {type(state_dict).__name__}")
  out = {}
  for key, value in state_dict.items():
    if isinstance(value, Placeholder):
      raise ValueError(f"{path}: state_dict entry {key!r} is a {value.global_name}, which this "
                       "reader does not load (only tensors are read)")
    if isinstance(value, (int, float, bool)):
      value = np.asarray(value)
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, "
                       "not a tensor")
    out[str(key)] = value
  return out
