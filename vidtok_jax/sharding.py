"""Height sharding shared by training (the "space" mesh axis) and streaming inference.

    sharding = height_sharding(mesh, x.shape, batch=("data",), space="space")
    x = jax.device_put(x, sharding)        # (B, T, H, W, C): rows over data, height over space

Inside a jitted function XLA then partitions each conv spatially (one-row halo exchanges with
the neighbouring devices) and reduces norm statistics across the split.
"""

from typing import Optional

from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def height_spec(mesh: Mesh, shape, batch=(), space: Optional[str] = None, height_dim: int = 2):
  """A PartitionSpec for `shape`: dim 0 over `batch` axes, `height_dim` over `space` (default:
  the mesh's "space" axis, or its only axis) when the split divides it, else replicated there."""
  if space is None:
    space = "space" if "space" in mesh.axis_names else (
        mesh.axis_names[0] if len(mesh.axis_names) == 1 and not batch else None)
  spec = [None] * len(shape)
  if batch:
    spec[0] = tuple(batch)
  if space is not None and shape[height_dim] % mesh.shape[space] == 0:
    spec[height_dim] = space
  return P(*spec)


def height_sharding(mesh: Mesh, shape, batch=(), space: Optional[str] = None,
                    height_dim: int = 2) -> NamedSharding:
  """`NamedSharding` of `height_spec`: training batches and streamed chunks alike."""
  return NamedSharding(mesh, height_spec(mesh, shape, batch, space, height_dim))
