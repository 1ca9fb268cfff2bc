"""Weights: the official PyTorch VidTok checkpoints <-> Flax params (the only place that knows
torch keys), the torch-free checkpoint reader (one restricted unpickler, `unpickle`), the hub of
released models (`hub`) and `load.load_params`, the one way every command loads weights (a train
workdir's steps are read by `steps`, shared with the train checkpoints).

CLI: `vidtok-convert to-flax CKPT --config NAME` (`vidtok_jax.cli.convert`).
"""

from vidtok_jax.weights.io import load_state_dict, save_safetensors
from vidtok_jax.weights.keys import params_from_state_dict, state_dict_from_params, torch_key


def __getattr__(name):
  # `weights.load_params` without importing Orbax for every `import vidtok_jax`.
  if name == "load_params":
    from vidtok_jax.weights.load import load_params

    return load_params
  raise AttributeError(f"module 'vidtok_jax.weights' has no attribute {name!r}")


__all__ = [
    "load_state_dict",
    "params_from_state_dict",
    "save_safetensors",
    "state_dict_from_params",
    "torch_key",
]
