"""vidtok_jax: VidTok video tokenizers in JAX/Flax, at parity with the official PyTorch model.

Public API (channels-last videos `(B, T, H, W, 3)` in [-1, 1]):

  model, params = vidtok_jax.from_pretrained("fsq_causal_488_262144")  # official weights (hub)
  cfg    = vidtok_jax.load_config("vidtok_fsq_causal_488_262144")
  model  = vidtok_jax.VidTok(cfg)
  params = vidtok_jax.params_from_torch(state_dict, cfg)
  z, aux = model.apply({"params": params}, x, method=model.encode)
  y      = model.apply({"params": params}, z, method=model.decode)
"""

from vidtok_jax import convert
from vidtok_jax.config import VARIANTS, ModelSpec, default_config, load_config
from vidtok_jax.models.autoencoder import VidTok, abstract_params, init_params, output_frames
from vidtok_jax.pretrained import from_pretrained


def params_from_torch(state_dict, cfg):
  """An official state_dict `{torch key: array or tensor}` -> Flax params of `VidTok(cfg)`.

  Keys outside `encoder.`/`decoder.`/`regularization.` that a training checkpoint holds
  (`loss.`, `model_ema.`) are ignored; a missing, unexpected or mis-shaped key is a ValueError.
  """
  return convert.params_from_state_dict(state_dict, abstract_params(cfg))


__all__ = ["VARIANTS", "convert", "ModelSpec", "VidTok", "abstract_params", "default_config",
           "from_pretrained", "init_params", "load_config", "output_frames", "params_from_torch"]
