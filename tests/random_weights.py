"""`random_params`: numpy-random weights of any abstract params tree, for tests and benchmarks
(far cheaper than compiling a model's `init`). Importing it sets nothing else up, so subprocess
scripts and `benchmarks/` import it too (they put this folder on `sys.path`)."""

from typing import Any

import jax
import numpy as np


def random_params(abstract, seed: int = 0) -> Any:
  """numpy-random params of `abstract`'s shapes (e.g. `vidtok_jax.abstract_params(config)`),
  drawn like the reference fixtures' weights: kernels N(0, 1/fan_in), norm scales N(1, .1), mix
  factors N(0, 1), everything else N(0, .1)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    shape = leaf.shape
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    if name == "scale":
      return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name == "mix_factor":
      return rng.standard_normal(shape).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)
