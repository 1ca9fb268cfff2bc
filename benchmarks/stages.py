"""The VidTok forward pass cut into stages: one res / temporal block, resampler or end piece each.

`plan(spec)` lists the stages of the whole-clip forward (`VidTok.__call__` without tiling) in
call order. A stage is a function of the bound `VidTok` and its input, and names the parameter
subtrees it reads, so it can run (and be differentiated) as its own program with only those
parameters: what `benchmarks/staged_grad.py` does to bound the backward pass's memory. The plan
mirrors `Encoder.__call__` / `Decoder.__call__`; `tests/staged_grad_test.py` pins the two
together (same output, every parameter used by exactly one stage).
"""

from typing import Callable, NamedTuple

import jax.numpy as jnp


class Stage(NamedTuple):
  name: str
  params: tuple  # paths (tuples of keys) of the parameter subtrees the stage reads
  fn: Callable  # fn(vidtok_module, h) -> h; the regularizer stage returns (z, aux)


REGULARIZER = "regularization"


def _level_stages(part: str, spatial: str, temporal: str, i: int, blocks: int, resample: bool,
                  time_resample: bool) -> list:
  """One level: (2-D block, temporal block) pairs, then the spatial and time resamplers."""
  out = []
  for j in range(blocks):
    out.append(Stage(f"{part}.{spatial}.{i}.block.{j}", ((part, f"{spatial}_{i}", f"block_{j}"),),
                     lambda m, h, j=j: getattr(getattr(m, part), spatial)[i].block[j](h)))
    out.append(Stage(f"{part}.{temporal}.{i}.block.{j}",
                     ((part, f"{temporal}_{i}", f"block_{j}"),),
                     lambda m, h, j=j: getattr(getattr(m, part), temporal)[i].block[j](h)))
  if resample:
    name = "downsample" if part == "encoder" else "upsample"
    paths = [(part, f"{spatial}_{i}", name)]
    if time_resample:
      paths.append((part, f"{temporal}_{i}", name))

    def resampler(m, h):
      mod = getattr(m, part)
      h = getattr(getattr(mod, spatial)[i], name)(h)
      if time_resample:
        h = getattr(getattr(mod, temporal)[i], name)(h)
      return h

    out.append(Stage(f"{part}.{spatial}.{i}.{name}", tuple(paths), resampler))
  return out


def plan(spec, sample: bool = False, compute_aux: bool = True) -> list:
  """The stages of `VidTok(spec)`'s whole-clip forward, input video -> reconstruction (before
  the v1.1 trim to the input's length, see `trim`). The regularizer stage is `fn(m, h, step)`
  and returns `(z, aux)`; `sample` draws the KL sample from the "sample" rng."""
  n = len(spec.ch_mult)

  def first(m, x):
    x = m._check_video(x, warn=False).astype(jnp.dtype(spec.dtype))
    return m.encoder.conv_in(m.encoder.pad_frames(x))

  stages = [Stage("encoder.conv_in", (("encoder", "conv_in"),), first)]
  for i in range(n):
    stages += _level_stages("encoder", "down", "down_temporal", i, spec.num_res_blocks,
                            i in spec.spatial_ds, i in spec.spatial_ds and i in spec.tempo_ds)
  stages.append(Stage("encoder.mid", (("encoder", "mid"),), lambda m, h: m.encoder.mid(h)))
  stages.append(Stage("encoder.conv_out", (("encoder", "norm_out"), ("encoder", "conv_out")),
                      lambda m, h: m.encoder.conv_out(m.encoder.norm_out(h))))  # SiLU inside
  stages.append(Stage(REGULARIZER, ((REGULARIZER,),),
                      lambda m, h, step: m._regularize(h, sample, step, compute_aux)))

  def dec_in(m, z):
    return m.decoder.mid(m.decoder.conv_in(z.astype(jnp.dtype(spec.dtype))))

  stages.append(Stage("decoder.conv_in+mid", (("decoder", "conv_in"), ("decoder", "mid")), dec_in))
  for i in reversed(range(n)):
    stages += _level_stages("decoder", "up", "up_temporal", i, spec.num_res_blocks + 1,
                            i in spec.spatial_us, i in spec.spatial_us and i in spec.tempo_us)

  def last(m, h):
    h = m.decoder.conv_out(m.decoder.norm_out(h))  # norm_out includes the SiLU
    if spec.causal and spec.version == "v1.0":
      h = h[:, spec.time_downsample_factor - 1:]
    return h

  stages.append(Stage("decoder.conv_out", (("decoder", "norm_out"), ("decoder", "conv_out")), last))
  return stages


def trim(spec, y, frames: int):
  """The forward's last step: causal v1.1 keeps the last `frames` frames."""
  if spec.causal and spec.version == "v1.1":
    return y[:, y.shape[1] - frames:]
  return y
