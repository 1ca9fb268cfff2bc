"""The VidTok encoder of a tokenize job on this process's devices: windows batched over all of
them, or one long clip streamed in chunks; results cast to the stored dtypes.

    enc = Encoder(model, params, store="mean", dtype="float32", batch_size=1, seed=42)
    arrays = enc.cast(enc.windows(clips01, video_index=3))   # {"latent": (K, t, h, w, C)}

Every sampled latent is seeded per (video index, window), never per batch.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vidtok_jax.data import sampling
from vidtok_jax.data import tokens as token_format
from vidtok_jax.tokenize.stats import token_dtype

_ENCODERS = {}  # (ModelSpec, store, devices) -> jitted window encoder; params are an argument


class Encoder:
  """`model` (a VidTok) with `params` replicated on the local devices (`mesh`, `n_dev`).

  store: KL models: "mean", "mean_logvar" (also logvar) or "sample"; dtype: the KL array dtype
  (FSQ ids use `token_dtype`); batch_size: windows per local device per call.
  """

  def __init__(self, model, params, *, store: str, dtype: str, batch_size: int, seed: int):
    self.model, self.spec, self.params = model, model.config, params
    self.fsq = self.spec.regularizer == "fsq"
    self.store, self.dtype, self.batch_size, self.seed = store, dtype, batch_size, seed
    devices = jax.local_devices()
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    self.n_dev = len(devices)
    self._params_dev = jax.device_put(params, jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec()))
    self._enc = self._make_encoder()
    self._streamer = None

  @property
  def codebook_size(self) -> int:
    return int(np.prod(self.spec.levels)) if self.fsq else 0

  def _make_encoder(self):
    cache_key = (self.spec, self.store, tuple(self.mesh.devices.flat))
    if cache_key in _ENCODERS:  # reruns in one process (tests, notebooks) compile once
      return _ENCODERS[cache_key]
    model, fsq, store = self.model, self.fsq, self.store

    def enc(params, x01, keys):
      z, aux = model.apply({"params": params}, x01 * 2.0 - 1.0, False, 0, False,
                           method=model.encode)
      if fsq:
        return {"tokens": aux["indices"]}
      mean, logvar = aux["mean"].astype(jnp.float32), aux["logvar"].astype(jnp.float32)
      if store == "sample":
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys)
        return {"latent": mean + jnp.exp(0.5 * logvar) * noise}
      out = {"latent": mean}
      if store == "mean_logvar":
        out["logvar"] = logvar
      return out

    batch = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    _ENCODERS[cache_key] = jax.jit(enc, in_shardings=(None, batch, batch), out_shardings=batch)
    return _ENCODERS[cache_key]

  def _window_keys(self, video_index: int, window_ids):
    base = jax.random.fold_in(jax.random.key(self.seed), video_index)
    return jax.vmap(lambda w: jax.random.fold_in(base, w))(jnp.asarray(window_ids, jnp.uint32))

  def windows(self, clips01, video_index: int = 0, first: int = 0) -> dict:
    """Arrays `{name: (K, ...)}` of windows (K, T, h, w, 3) in [0, 1], batched over devices;
    `first`: the video's window number of `clips01[0]` (KL samples are seeded by it)."""
    k, b = len(clips01), self.batch_size * self.n_dev
    parts = []
    for lo in range(0, k, b):
      chunk = clips01[lo:lo + b]
      ids = np.arange(first + lo, first + lo + b)
      pad = b - len(chunk)
      if pad:  # fixed batch shape: one compile
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      out = jax.device_get(self._enc(self._params_dev, jnp.asarray(chunk, jnp.float32),
                                     self._window_keys(video_index, ids)))
      parts.append({n: np.asarray(v)[:b - pad] for n, v in out.items()})
    return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

  def long(self, clip01, video_index: int = 0) -> dict:
    """Arrays `{name: (1, ...)}` of one long clip (1, T, h, w, 3) in [0, 1], streamed."""
    from vidtok_jax.inference.streaming import Streamer

    if self._streamer is None:
      self._streamer = Streamer(self.spec, self.params, t_chunk_enc=sampling.LONG_CHUNK,
                                window=sampling.LONG_CHUNK, sample=self.store == "sample",
                                seed=self.seed)
    self._streamer.seed = self.seed + video_index
    z, aux = self._streamer.encode(np.asarray(clip01, np.float32) * 2.0 - 1.0)
    return {"tokens": aux["indices"]} if self.fsq else {"latent": z}

  def cast(self, arrays: dict) -> dict:
    """Arrays in their stored dtypes."""
    if self.fsq:
      return {"tokens": arrays["tokens"].astype(token_dtype(self.codebook_size))}
    return {n: v.astype(token_format.array_dtype(self.dtype)) for n, v in arrays.items()}


__all__ = ["Encoder"]
