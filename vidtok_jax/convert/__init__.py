"""Official PyTorch VidTok state_dicts <-> Flax params (the only place that knows torch keys).

CLI: `python -m vidtok_jax.convert to-flax CKPT --config NAME` (see `__main__.py`).
"""

from vidtok_jax.convert.io import load_state_dict, save_safetensors
from vidtok_jax.convert.keys import params_from_state_dict, state_dict_from_params, torch_key

__all__ = [
    "load_state_dict",
    "params_from_state_dict",
    "save_safetensors",
    "state_dict_from_params",
    "torch_key",
]
