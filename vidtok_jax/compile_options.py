"""XLA compiler options for the package's jitted programs (`jax.jit(..., compiler_options=...)`)."""

from typing import Optional

import jax

# XLA:CPU's default scheduler orders work for concurrency and so runs rematerialised forward
# recomputations early, which undoes `remat` (the released model's backward at 17x64x64 keeps
# 8.3 GB of temporaries with or without it). The memory-optimised scheduler honours remat
# (5.0 GB without it already, see README "Performance").
CPU_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(backend: Optional[str] = None) -> Optional[dict]:
  """The options for `backend` (default: JAX's default backend); None where none are needed."""
  return dict(CPU_OPTIONS) if (backend or jax.default_backend()) == "cpu" else None
