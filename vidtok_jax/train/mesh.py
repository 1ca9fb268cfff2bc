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

Spatial axis (`config.train.mesh.space = N > 1`): a last mesh axis "space" splits every
activation's height N ways, so the global batch only has to divide by `data x fsdp` (stage 1,
batch 16 at 17x128^2, runs on 64 chips as data=16, space=4). The video batch is placed with its
height split (`batch_sharding`), the train step pins its activations to that layout
(`constrain_height`) and XLA partitions the convs spatially: each exchanges one-row halos with
its neighbours (collective-permutes), norms all-reduce their statistics and the per-frame
attention at the latent level gathers its keys/values (small). The space axis is the fastest
varying one, so a space group is consecutive devices of one host. Streaming inference
(`Streamer(mesh=...)`) shards height with the same `height_sharding`.
"""

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vidtok_jax.sharding import height_sharding, height_spec  # noqa: F401  (re-exported)

# Leaves smaller than this (elements) stay replicated under FSDP: biases, norms, scalars and
# small kernels cost more in collectives than they save in memory.
FSDP_MIN_SIZE = 2**16
SPACE = "space"  # the mesh axis that splits activation heights


def make_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """`("data",)` over `devices` (default: all), plus `"fsdp"` when `config.train.mesh.fsdp`
  (size `fsdp_size`, 0 = the devices of one host) and a last `"space"` axis when
  `config.train.mesh.space > 1`. `data` takes the devices left over. `devices` may be another
  machine's (a TPU topology's): they are checked as they are, not against this host."""
  mc = config.train.mesh
  devices = host_major(jax.devices() if devices is None else devices)
  n = len(devices)
  space = check_space(config, devices)
  names, shape = [mc.data_axis], [n // space]
  if mc.fsdp:
    f = mc.fsdp_size or min(min(host_device_counts(devices).values()), n) // space
    if f < 1 or (n // space) % f:
      raise ValueError(f"config.train.mesh.fsdp_size={f} does not divide the {n // space} "
                       f"devices of the batch axes ({n} devices / space {space})")
    names, shape = [mc.data_axis, mc.fsdp_axis], [n // space // f, f]
  if space > 1:
    names.append(SPACE)
    shape.append(space)
  # Consecutive devices (same host first) share an fsdp group and a space group: their
  # collectives (halo exchanges every conv) stay local.
  return Mesh(np.asarray(devices).reshape(shape), tuple(names))


def host_device_counts(devices) -> dict:
  """`{process index: number of devices}` of `devices` (a list of devices, e.g. a TPU
  topology's), or of this runtime for an int (a device count: its processes are this run's)."""
  if isinstance(devices, (int, np.integer)):
    if jax.process_count() == 1:
      return {0: int(devices)}
    return {i: jax.local_device_count() for i in range(jax.process_count())}
  counts = {}
  for d in devices:
    counts[d.process_index] = counts.get(d.process_index, 0) + 1
  return counts


def platform_of(devices) -> str:
  """The platform ("cpu", "gpu", "tpu") of `devices` (a list or a `Mesh`); all must share it."""
  devices = list(devices.devices.flat) if isinstance(devices, Mesh) else list(devices)
  platforms = sorted({d.platform for d in devices})
  if len(platforms) != 1:
    raise ValueError(f"devices of one platform expected, got {platforms or 'none'}")
  return platforms[0]


def host_major(devices) -> list:
  """`devices` ordered by (process, id): consecutive devices, hence every fsdp and space group
  of `make_mesh` (space groups divide the per-host device count), lie on one host, whatever
  order the runtime lists them in."""
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def check_space(config, devices) -> int:
  """`config.train.mesh.space`, checked against `devices` (the devices the program is for, or
  their number for this run's own) and every level of the model: ValueError naming the level
  and its height when the split does not divide it."""
  n_devices = devices if isinstance(devices, (int, np.integer)) else len(devices)
  space = int(config.train.mesh.get("space", 1) or 1)
  if space < 1 or n_devices % space:
    raise ValueError(f"config.train.mesh.space={space} does not divide the {n_devices} devices")
  if space == 1:
    return 1
  per_host = host_device_counts(devices)
  if len(per_host) > 1 and any(c % space for c in per_host.values()):
    counts = sorted(set(per_host.values()))
    raise ValueError(f"config.train.mesh.space={space} must divide the "
                     f"{' / '.join(map(str, counts))} devices of each host (a space group stays "
                     "inside one host)")
  for what, h in level_heights(config):
    if h % space:
      raise ValueError(f"config.train.mesh.space={space} does not divide the height {h} of "
                       f"{what}; use a space size that divides every level's height")
  return space


def level_heights(config):
  """`[(level name, height)]` of the autoencoder's activations at the training size."""
  from vidtok_jax.config import ModelSpec

  spec = ModelSpec.from_config(config.model)
  size = config.data.size
  h = size[0] if isinstance(size, (tuple, list)) else int(size)
  out = []
  for i in range(len(spec.ch_mult)):
    out.append((f"encoder level {i} (down.{i})", h))
    if i in spec.spatial_ds:
      h //= 2
  return out  # the last level is the latent's (mid blocks, attention)


def check_mesh_config(config, devices) -> None:
  """ValueErrors for a mesh the config cannot use on `devices` (a list of the target's devices,
  or the number of this run's own): `space` (see `check_space`) and a global batch not
  divisible by the batch axes (`data x fsdp` = devices / space)."""
  n_devices = devices if isinstance(devices, (int, np.integer)) else len(devices)
  space = check_space(config, devices)
  b, n = config.data.global_batch_size, n_devices // space
  if b % n:
    raise ValueError(f"config.data.global_batch_size: {b} is not divisible by data x fsdp = {n} "
                     f"({n_devices} devices / config.train.mesh.space={space})")


def batch_axes(mesh: Mesh, space: str = "space") -> tuple:
  return tuple(a for a in mesh.axis_names if a != space)


def constrain_height(x, mesh: Optional[Mesh], height_dim: int = 2):
  """Pins `x` (batch first) to the batch x height layout of `mesh` inside a jitted function;
  unchanged without a mesh or a "space" axis."""
  if mesh is None or "space" not in mesh.axis_names:
    return x
  return jax.lax.with_sharding_constraint(
      x, height_sharding(mesh, x.shape, batch_axes(mesh), "space", height_dim))


def batch_sharding(mesh: Mesh, ndim: int = 5) -> NamedSharding:
  """Leading (batch) axis split over the batch axes (all but "space"); with a "space" axis the
  height (axis 2 of a `(B, T, H, W, C)` video) over it; the rest replicated."""
  if "space" not in mesh.axis_names or ndim < 3:
    return NamedSharding(mesh, P(batch_axes(mesh)))
  spec = [batch_axes(mesh)] + [None] * (ndim - 1)
  spec[2] = "space"
  return NamedSharding(mesh, P(*spec))


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
  """This process's rows of the batch (numpy, `(B_local, ...)`, whole frames) -> global
  `jax.Array`s of `(B_local * process_count, ...)` sharded by `batch_sharding(mesh)`. A space
  group lies inside one host, so each process reads only the rows of its own devices."""
  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, a.ndim), a)

  return jax.tree.map(put, local_batch)
