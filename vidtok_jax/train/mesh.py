"""Device mesh and shardings for data-parallel (optionally FSDP) training. No pmap.

    mesh = make_mesh(config)                                   # ("data",) over all devices
    state_sh = state_shardings(mesh, abstract_train_state(config), fsdp=config.train.mesh.fsdp)
    init = lambda rng, lp: create_train_state(config, rng, lpips_params=lp)  # lp: an argument,
    state = jax.jit(init, out_shardings=state_sh)(rng, lpips_params)    # not a baked constant
    step = jax.jit(make_train_step(config), in_shardings=(state_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, None), donate_argnums=0)
    state, metrics = step(state, shard_batch(mesh, host_batch))  # host_batch: this process's rows

The batch axis is split over every mesh axis ("data" and, with FSDP, "fsdp" too), so each device
sees `global_batch / n_devices` clips. Params, optimizer moments and EMA are replicated, or with
FSDP their big kernels are split over "fsdp" (XLA inserts the all-gathers / reduce-scatters).
"""

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# Leaves smaller than this (elements) stay replicated under FSDP: biases, norms, scalars and
# small kernels cost more in collectives than they save in memory.
FSDP_MIN_SIZE = 2**16


def make_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """`("data",)` over `devices` (default: all), or `("data", "fsdp")` when
  `config.train.mesh.fsdp` (fsdp size `config.train.mesh.fsdp_size`, 0 = local device count)."""
  mc = config.train.mesh
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if not mc.fsdp:
    return Mesh(np.asarray(devices).reshape(n), (mc.data_axis,))
  f = mc.fsdp_size or min(jax.local_device_count(), n)
  if n % f:
    raise ValueError(f"config.train.mesh.fsdp_size={f} does not divide the {n} devices")
  # Consecutive devices (same host first) share an fsdp group: its collectives stay local.
  return Mesh(np.asarray(devices).reshape(n // f, f), (mc.data_axis, mc.fsdp_axis))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all mesh axes, the rest replicated."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape, fsdp_axis, size, min_size):
  if len(shape) < 2 or int(np.prod(shape)) < min_size:
    return P()
  # The largest axis divisible by the fsdp size (ties: the later one, usually out-channels).
  order = sorted(range(len(shape)), key=lambda a: (shape[a], a), reverse=True)
  for a in order:
    if shape[a] % size == 0:
      spec = [None] * len(shape)
      spec[a] = fsdp_axis
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_state, fsdp: bool = False, fsdp_axis: str = "fsdp",
                    min_size: int = FSDP_MIN_SIZE):
  """A `NamedSharding` per leaf of `abstract_state` (e.g. `abstract_train_state(config)`).

  Replicated by default. With `fsdp`, every leaf of rank >= 2 and >= `min_size` elements is
  split over `fsdp_axis` along its largest divisible axis. The rule depends on the shape only,
  so params, their Adam moments and their EMA shadow get the same sharding.
  """
  if fsdp and fsdp_axis not in mesh.axis_names:
    raise ValueError(f"fsdp=True needs a {fsdp_axis!r} mesh axis, mesh has {mesh.axis_names}")
  size = mesh.shape[fsdp_axis] if fsdp else 1

  def leaf(x):
    if not fsdp or size == 1:
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp_axis, size, min_size))

  return jax.tree.map(leaf, abstract_state)


def shard_batch(mesh: Mesh, local_batch):
  """This process's rows of the batch (numpy, `(B_local, ...)`) -> global `jax.Array`s of
  `(B_local * process_count, ...)` sharded by `batch_sharding(mesh)`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      local_batch)
