"""Compute dtype and conv/matmul precision by backend (`config.train.dtype`, `.precision`).

    dtype = resolve_dtype("auto")                      # "bfloat16" on GPU/TPU, "float32" on CPU
    precision = resolve_precision("auto", dtype)       # "default" with bf16, else "highest"

Training defaults to bf16 compute on accelerators (the official recipe trains bf16-mixed) with
float32 params, optimizer state, norm statistics, regularizer and loss reductions; float32 on
CPU, where bf16 is no faster. With bf16 compute the precision is the backend's default: a
"highest" bf16 conv would be emulated in several passes. Float32 keeps "highest" (exact, for
parity work) unless `precision` says otherwise; "tf32" is float32 storage with TF32 tensor-core
convs/matmuls on A100/H100 (what PyTorch's cuDNN does by default; 3-pass bf16 on a TPU), i.e.
JAX's "high".
"""

from typing import Optional

import jax

DTYPES = ("auto", "float32", "bfloat16")
PRECISIONS = ("auto", "highest", "high", "default", "tf32")
ACCELERATORS = ("gpu", "tpu", "cuda", "rocm")


def resolve_dtype(dtype: str, backend: Optional[str] = None) -> str:
  """`"auto"` -> `"bfloat16"` on a GPU/TPU `backend`, `"float32"` otherwise. `backend`: the
  platform the program is compiled for; the default, JAX's default backend, is right only for
  this host's own devices (`make_train_step` and `vidtok_jax.planning.aot` pass their target's)."""
  if dtype not in DTYPES:
    raise ValueError(f"config.train.dtype: one of {DTYPES}, got {dtype!r}")
  if dtype != "auto":
    return dtype
  return "bfloat16" if (backend or jax.default_backend()) in ACCELERATORS else "float32"


def resolve_precision(precision: str, dtype: str, model_precision: str = "highest") -> str:
  """The model's `precision` field for `config.train.precision` and a resolved compute dtype:
  "auto" is "default" with bf16 compute and the model config's own (`"highest"`) with float32;
  "tf32" is "high"."""
  if precision not in PRECISIONS:
    raise ValueError(f"config.train.precision: one of {PRECISIONS}, got {precision!r}")
  if precision == "auto":
    return "default" if dtype == "bfloat16" else model_precision
  return "high" if precision == "tf32" else precision
