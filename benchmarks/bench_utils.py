"""Helpers of the device benchmarks: process memory, device peaks, random weights.

A benchmark script imports this beside it (`sys.path` gets the `benchmarks/` folder, see
`bench.py`); the package itself holds nothing that only benchmarks use.
"""

import os
import sys

# Dense peak TFLOP/s (bfloat16, float32) by device kind, from vendor data sheets.
PEAKS = {
    "H100 80GB HBM3": (989.4, 66.9), "H100 PCIe": (756.0, 51.2), "H200": (989.4, 66.9),
    "A100": (312.0, 19.5), "TPU v4": (275.0, None), "TPU v5 lite": (197.0, None),
    "TPU v5p": (459.0, None), "TPU v6 lite": (918.0, None),
}


def device_peak_tflops(kind: str, dtype: str):
  """The dense peak TFLOP/s of device `kind` for compute `dtype`; None if unknown."""
  for name, (bf16, f32) in PEAKS.items():
    if name in kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


def rss_kib(field: str) -> int:
  """A `/proc/self/status` memory field (VmRSS, VmHWM) in KiB; 0 where there is none."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def reset_peak_rss():
  """Resets VmHWM to the current RSS (Linux), so the peak is measured from here."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def random_params(abstract, seed: int = 0):
  """numpy-random params of `abstract`'s shapes: the tests' helper (`tests/random_weights.py`),
  one implementation for both (timing does not depend on the values)."""
  tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
  if tests not in sys.path:
    sys.path.append(tests)
  from random_weights import random_params as draw

  return draw(abstract, seed)


def random_lpips_params(net: str):
  """LPIPS params of the right shapes with random values (timing does not depend on them)."""
  from vidtok_jax.planning.configs import lpips_abstract_params

  return random_params(lpips_abstract_params(net), seed=1)
