"""Weights: the official PyTorch VidTok checkpoints <-> Flax params (the only place that knows
torch keys), the torch-free checkpoint reader, the hub of released models (`hub`) and
`load_params`, the one way every command loads weights.

CLI: `vidtok-convert to-flax CKPT --config NAME` (`vidtok_jax.cli.convert`).
"""

from vidtok_jax.weights.io import load_state_dict, save_safetensors
from vidtok_jax.weights.keys import params_from_state_dict, state_dict_from_params, torch_key

__all__ = [
    "load_state_dict",
    "params_from_state_dict",
    "save_safetensors",
    "state_dict_from_params",
    "torch_key",
]
