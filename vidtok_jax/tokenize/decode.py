"""Decode one tokenized record back to video with the model that wrote it (a spot check)."""

import jax
import jax.numpy as jnp
import numpy as np

import vidtok_jax
from vidtok_jax.evaluation.evaluator import params_sha256


def decode_record(config, params, record: dict, manifest: dict) -> np.ndarray:
  """Frames float32 `(T, H, W, 3)` in [0, 1] of one record (`TokenDataset` item): its valid
  frames (the padding of a last window dropped). ValueError when `params` are not the weights
  named in `manifest`."""
  want = manifest["model"]["params_sha256"]
  have = params_sha256(params)
  if have != want:
    raise ValueError(f"these weights (params sha256 {have[:12]}...) are not the ones that wrote "
                     f"the tokens ({manifest['model']['variant']}, {want[:12]}...)")
  model = vidtok_jax.VidTok(config.model)
  spec = model.config
  fsq = "tokens" in record
  z = np.asarray(record["tokens"] if fsq else record["latent"])[None]
  z = z.astype(np.int32) if fsq else z.astype(np.float32)
  t = int(record["input_frames"])
  if manifest["protocol"]["mode"] == "long":
    from vidtok_jax.inference.streaming import Streamer

    y = Streamer(spec, params, t_chunk_enc=16, window=16).decode(z, t, indices=fsq)
  else:
    fn = model.decode_indices if fsq else model.decode
    y = jax.jit(lambda p, z: jnp.clip(model.apply({"params": p}, z, method=fn), -1.0, 1.0))(
        params, jnp.asarray(z))
    y = np.asarray(y)
    if y.shape[1] > t:  # v1.1 causal: the forward keeps the last t frames
      y = y[:, y.shape[1] - t:] if spec.version == "v1.1" else y[:, :t]
  return ((np.asarray(y[0], np.float32) + 1.0) / 2.0)[:int(record["frames"])]
