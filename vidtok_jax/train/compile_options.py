"""XLA compiler options for the package's jitted programs (`jax.jit(..., compiler_options=...)`)."""

from typing import Optional

import jax

# XLA:CPU's default scheduler orders work for concurrency and so runs rematerialised forward
# recomputations early, which undoes `remat`, and keeps more alive at once: the released
# model's forward + backward at 17x64x64 needs 8.08 GiB of temporaries with it, 5.08 GiB with
# the memory-optimised scheduler (README "Performance").
CPU_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(backend: Optional[str] = None) -> Optional[dict]:
  """The options for `backend`, the platform the program is compiled for (default: JAX's default
  backend, i.e. this host's devices); None where none are needed."""
  return dict(CPU_OPTIONS) if (backend or jax.default_backend()) == "cpu" else None
