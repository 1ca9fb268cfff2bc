"""A minimal writer of `torch.save`'s zip format, for tests that run without torch.

`save({"state_dict": {key: float32 array}, ...}, path)` writes what `torch.save` writes for a dict
of contiguous float32 tensors: `archive/data.pkl` (tensors as `torch._utils._rebuild_tensor_v2`
calls on `torch.FloatStorage` records) and one `archive/data/<n>` record per tensor.
torch_zip_test.py checks `torch.load` reads these files back.
"""

import collections
import pickle
import zipfile

import numpy as np


class _Global:
  """Pickles as the global `module.name` (never imported here)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle wants a callable as a reduce function
    raise TypeError("placeholder")

  def __reduce__(self):
    return self.name


class _Tensor:

  def __init__(self, array, key):
    self.array, self.key = np.array(array, np.float32, order="C"), key

  def __reduce__(self):
    shape = self.array.shape
    stride = tuple(int(s) // 4 for s in self.array.strides) if self.array.size else (1,) * len(shape)
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (_Storage(self), 0, shape, stride, False, collections.OrderedDict()))


class _Storage:

  def __init__(self, tensor):
    self.tensor = tensor


class _Pickler(pickle._Pickler):  # the Python pickler: its save_global can be overridden

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      t = obj.tensor
      return ("storage", _Global("torch", "FloatStorage"), t.key, "cpu", int(t.array.size))
    return None

  def save_global(self, obj, name=None):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      self.memoize(obj)
      return
    super().save_global(obj, name)


def _wrap(obj, tensors):
  if isinstance(obj, np.ndarray):
    t = _Tensor(obj, str(len(tensors)))
    tensors.append(t)
    return t
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _wrap(v, tensors)) for k, v in obj.items())
  return obj


def save(obj, path):
  tensors = []
  wrapped = _wrap(obj, tensors)
  with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(wrapped)
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/byteorder", "little")
    for t in tensors:
      z.writestr(f"archive/data/{t.key}", t.array.tobytes())
    z.writestr("archive/version", "3\n")
