"""The one restricted unpickler: pickled files of weights are read without running stored code.

    RestrictedUnpickler(f, allowed=numpy_arrays_table(), what="LPIPS weight files may only "
                        "contain numpy arrays in dicts/lists/tuples").load()

A pickle names every class and function it needs as a global (`module.name`); a plain
`pickle.Unpickler` imports and calls them, so a weight file can run any code (`os.system`, ...).
`RestrictedUnpickler` never imports: a global resolves only through `allowed`, a table
`{(module, name): object}` the caller builds. Any other global is refused (`ValueError` naming
it), or, when the caller passes `unknown`, replaced by what `unknown(module, name)` returns
(`torch_zip` turns it into an inert `Inert` subclass, so a Lightning checkpoint's optimizer and
callback states can be skipped without being built).

Users: `weights/torch_zip.py` (torch.save's zip format), `metrics/lpips.py` (the LPIPS weight
pickles); `weights/io.py` lends `Inert` to torch's own weights-only unpickler.
"""

import builtins
import collections
import functools
import pickle
from typing import Callable, Optional

import numpy as np


class Inert:
  """Stand-in for a pickled global that is not read: calling it, building it or filling it does
  nothing, it keeps nothing it is given; the real object is never imported, its code never runs.
  `global_name` says which global it stands for."""

  global_name = "?"

  def __new__(cls, *args, **kwargs):
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    pass

  def __setitem__(self, key, value):
    pass

  def append(self, value):
    pass

  def extend(self, values):
    pass

  def __repr__(self):
    return f"<unreadable {self.global_name}>"


def inert(module: str, name: str, base=Inert) -> type:
  """A fresh `base` subclass standing in for the global `module.name`."""
  return type(base.__name__, (base,), {"global_name": f"{module}.{name}"})


@functools.cache
def numpy_arrays_table() -> dict:
  """`allowed` for pickles of numpy arrays and scalars in dicts / lists / tuples / OrderedDicts."""
  # numpy's reconstruction helpers, taken from numpy itself: their module moved from `numpy.core`
  # to `numpy._core` in numpy 2, and pickles name either.
  reconstruct = np.zeros(1).__reduce_ex__(2)[0]
  frombuffer = np.zeros(1).__reduce_ex__(5)[0]
  scalar = np.float32(0).__reduce__()[0]
  table = {
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("collections", "OrderedDict"): collections.OrderedDict,
  }
  for core in ("numpy.core", "numpy._core"):
    table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
    table[(f"{core}.multiarray", "scalar")] = scalar
    table[(f"{core}.numeric", "_frombuffer")] = frombuffer
  for name in ("dict", "list", "tuple"):
    table[("builtins", name)] = getattr(builtins, name)
  return table


class RestrictedUnpickler(pickle.Unpickler):
  """A `pickle.Unpickler` resolving globals from `allowed` only (see the module doc).

  Args:
    file: a binary file object holding the pickle.
    allowed: `{(module, name): object}`, the only globals returned as they are.
    unknown: `(module, name) -> object` for any other global; None: refuse it.
    what: the end of the refusal message (what the files may hold).
  """

  def __init__(self, file, allowed: dict, *,
               unknown: Optional[Callable[[str, str], object]] = None,
               what: str = "only listed globals are read"):
    super().__init__(file)
    self._allowed, self._unknown, self._what = allowed, unknown, what

  def find_class(self, module, name):
    # Never `super().find_class`: that imports `module`.
    obj = self._allowed.get((module, name))
    if obj is not None:
      return obj
    if self._unknown is not None:
      return self._unknown(module, name)
    raise ValueError(f"refusing to unpickle global {module}.{name}: {self._what}")


__all__ = ["Inert", "RestrictedUnpickler", "inert", "numpy_arrays_table"]
