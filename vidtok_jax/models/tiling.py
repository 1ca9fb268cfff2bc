"""The v1.1 chunked ("tiled") inference schedule, as pure functions of a chunk step.

A chunk step is `step(x, state, key, kind) -> (seq, scalars, state)`, `kind` being "first",
"steady" or "last" (static): `seq` is a pytree of arrays with
time on axis 1 (latents, indices, decoded frames), `scalars` a pytree of per-chunk numbers
(losses), and `state` the pytree of per-module caches (None before the first chunk). The first
chunk runs on its own (it has no cache and a different shape); the equal-sized steady chunks run
under one `lax.scan`, so the program does not grow with the video's length; a shorter final
chunk runs once more. Outputs are concatenated along time and scalars averaged over chunks
(the official tiled losses are per-chunk means).
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp


def chunk_bounds(t: int, chunk: int) -> list[tuple[int, int]]:
  """The official `build_chunk_start_end`: `[(0, 1)]`, then `[s, min(t, s + chunk))` from s = 1."""
  bounds, s = [(0, 1)], 1
  while s < t:
    bounds.append((s, min(t, s + chunk)))
    s += chunk
  return bounds


def check_chunk(spec, chunk: int, name: str):
  """ValueError unless `chunk` is a positive multiple of the time factor of a causal model."""
  f = spec.time_downsample_factor
  if not spec.causal:
    raise ValueError(f"{name}: chunked (streaming) inference needs a causal model; {spec.name} "
                     f"is non-causal (process it in independent windows instead)")
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"{name} must be a positive int, got {chunk!r}")
  if name == "t_chunk_enc" and chunk % f:
    raise ValueError(f"t_chunk_enc must be a multiple of the time factor {f}, got {chunk}")


def _windows(x, starts, length: int):
  """`(n, B, length, ...)`: the windows `x[:, s:s+length]` for each static start s."""
  idx = jnp.asarray(starts)[:, None] + jnp.arange(length)[None]
  return jnp.moveaxis(x[:, idx], 1, 0)


def _unstack(seq):
  """`(n, B, t, ...) -> (B, n*t, ...)` for every leaf."""
  return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(a.shape[1], -1, *a.shape[3:]), seq)


def run_chunks(step: Callable, first, steady=None, last=None, keys=None):
  """Runs `first`, the stacked `steady` chunks `(n, B, t, ...)` under `lax.scan`, then `last`
  (each None when absent).

  `keys` (optional): one PRNG key per chunk, in order. Returns `(seq, mean scalars, state)`.
  """
  n = 0 if steady is None else steady.shape[0]
  total = 1 + n + (last is not None)
  keys = [None] * total if keys is None else keys
  seqs, scalars = [], []
  seq, sc, state = step(first, None, keys[0], "first")
  seqs.append(seq)
  scalars.append(sc)
  if n:
    def body(carry, inp):
      xc, key = inp
      seq_c, sc_c, carry = step(xc, carry, key, "steady")
      return carry, (seq_c, sc_c)

    steady_keys = None if keys[1] is None else jnp.stack(keys[1: 1 + n])
    state, (seq, sc) = jax.lax.scan(body, state, (steady, steady_keys))
    seqs.append(_unstack(seq))
    scalars.append(jax.tree.map(lambda a: jnp.sum(a, axis=0), sc))
  if last is not None:
    seq, sc, state = step(last, state, keys[-1], "last")
    seqs.append(seq)
    scalars.append(sc)
  seq = jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *seqs)
  mean = jax.tree.map(lambda *a: sum(a) / total, *scalars)
  return seq, mean, state


def tiled_encode(step: Callable, x, chunk: int, keys_fn: Optional[Callable] = None):
  """Official `tile_encode` over frames: `[0, 1)`, then chunks of `chunk` frames. A final chunk
  shorter than the time factor's multiple is front-padded by the step (its own first frame)."""
  t = x.shape[1]
  n = (t - 1) // chunk
  rest = t - 1 - n * chunk
  steady = _windows(x, [1 + k * chunk for k in range(n)], chunk) if n else None
  last = x[:, 1 + n * chunk:] if rest else None
  keys = None if keys_fn is None else keys_fn(1 + n + (rest > 0))
  return run_chunks(step, x[:, :1], steady, last, keys)


def tiled_decode(step: Callable, z, chunk: int, use_overlap: bool):
  """Official `tile_decode` over latents: `[0, 1)`, then chunks of `chunk` latents.

  `step(z, state, overlap)`: with `use_overlap` every chunk but the last is fed one extra
  (look-ahead) latent and `overlap=True`; the step drops the frames that latent produced.
  """
  t = z.shape[1]
  if use_overlap and t >= 2:
    first, first_overlap = z[:, :2], True
    n = (t - 2) // chunk  # chunks [s, s + chunk) with s + chunk + 1 <= t
    steady = _windows(z, [1 + k * chunk for k in range(n)], chunk + 1) if n else None
  else:
    first, first_overlap = z[:, :1], False
    n = (t - 1) // chunk
    steady = _windows(z, [1 + k * chunk for k in range(n)], chunk) if n else None
  rest = z[:, 1 + n * chunk:]
  last = rest if rest.shape[1] else None

  def chunk_step(zc, state, key, kind):
    del key
    overlap = first_overlap if kind == "first" else (use_overlap and kind == "steady")
    seq, state = step(zc, state, overlap)
    return seq, {}, state

  seq, _, _ = run_chunks(chunk_step, first, steady, last)
  return seq
