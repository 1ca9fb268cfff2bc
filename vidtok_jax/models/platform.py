"""The platform a model is traced for: forms that differ by backend are chosen by it.

`target_platform()` is the innermost `lowering_platform(name)` block (whoever builds a program for
other devices sets it: the train step from its mesh, the ahead-of-time planner from the TPU
topology) and otherwise JAX's default backend. Never `jax.default_backend()` directly: a program
lowered on a CPU host for a TPU topology must be the TPU's program.
"""

import contextlib
import contextvars
from typing import Optional

import jax

_PLATFORM = contextvars.ContextVar("vidtok_jax_lowering_platform", default=None)
_TRAINING = contextvars.ContextVar("vidtok_jax_training_forms", default=False)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
  token = var.set(value)
  try:
    yield
  finally:
    var.reset(token)


def lowering_platform(platform: Optional[str]):
  """Within the block the model is traced for `platform` ("cpu", "gpu", "tpu"; None: JAX's
  default backend). Enter it inside the traced function, so every trace of that function
  sees it (jit caches a function's trace, not this setting)."""
  return _setting(_PLATFORM, platform)


def target_platform() -> str:
  """The platform the model is being traced for (see `lowering_platform`)."""
  return _PLATFORM.get() or jax.default_backend()


def training_forms():
  """Within the block the model is traced for a training step (forward and backward) rather than
  for inference: forms whose cost differs between the two (see `norms.NormCore`) follow it.
  `make_train_step` enters it inside the traced step."""
  return _setting(_TRAINING, True)


def tracing_for_training() -> bool:
  """Whether the model is being traced inside `training_forms()`."""
  return _TRAINING.get()
