"""The evaluation's device program: one jitted step reconstructs a batch of windows and scores
it (PSNR / SSIM / LPIPS per frame, I3D features of real and reconstructed windows), so only the
scores and the 400-d embeddings come back to the host.

    step, metrics = make_step(model, sample=True, seed=42, lpips_net="vgg", fvd_lib=fvd,
                              batch_sharding=sharding)
    out = step(params, lpips_params, i3d, x01, window_ids)   # {"psnr": (B, T), ...}
"""

import jax
import jax.numpy as jnp

from vidtok_jax.metrics.psnr import psnr
from vidtok_jax.metrics.ssim import ssim


def make_step(model, *, sample: bool, seed: int, lpips_net, fvd_lib, batch_sharding):
  """`(step, metrics)`, both jitted with the batch sharded by `batch_sharding`.

  `step(params, lpips_params, i3d, x01, window_ids)`: the windows reconstructed (KL: sampled
  with one key per window, `fold_in(PRNGKey(seed), window id)`, so the noise does not depend on
  the batch) and scored; `metrics(lpips_params, x01, r01)`: the per-frame scores alone.
  `lpips_net` None: no LPIPS; `fvd_lib` None: no I3D features."""
  lpips_model = None
  if lpips_net is not None:
    from vidtok_jax.metrics.lpips import LPIPS

    lpips_model = LPIPS(net=lpips_net)
  i3d_logits = fvd_lib._logits if fvd_lib is not None else None  # pylint: disable=protected-access

  def metrics(lp, x01, r01):
    out = {"psnr": psnr(x01, r01), "ssim": ssim(x01, r01)}
    if lp is not None:
      b, t = x01.shape[:2]
      flat = lambda v: v.reshape((b * t,) + v.shape[2:])
      out["lpips"] = lpips_model.apply({"params": lp}, flat(x01 * 2.0 - 1.0),
                                       flat(r01 * 2.0 - 1.0)).reshape(b, t)
    return out

  def to_u8(v):  # FVD's protocol starts from 8-bit video
    return jnp.round(jnp.clip(v, 0.0, 1.0) * 255.0).astype(jnp.uint8)

  def step(params, lp, i3d, x01, window_ids):
    x = x01 * 2.0 - 1.0
    if sample:  # one key per window: the same noise whatever the batch it lands in
      def one(xi, wid):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), wid)
        return model.apply({"params": params}, xi[None], True, 0, False,
                           rngs={"sample": key})[1][0]
      y = jax.vmap(one)(x, window_ids)
    else:
      _, y, _ = model.apply({"params": params}, x, False, 0, False)
    r01 = (jnp.clip(y.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
    out = metrics(lp, x01, r01)
    if i3d is not None:
      out["emb_real"] = i3d_logits(i3d, to_u8(x01))
      out["emb_fake"] = i3d_logits(i3d, to_u8(r01))
    return out

  batch = batch_sharding
  return (jax.jit(step, in_shardings=(None, None, None, batch, batch), out_shardings=batch),
          jax.jit(metrics, in_shardings=(None, batch, batch), out_shardings=batch))


__all__ = ["make_step"]
