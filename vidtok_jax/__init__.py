"""vidtok_jax: VidTok video tokenizers in JAX/Flax, at parity with the official PyTorch model.

Public API (channels-last videos `(B, T, H, W, 3)` in [-1, 1]):

  model, params = vidtok_jax.from_pretrained("fsq_causal_488_262144")  # official weights (hub)
  cfg    = vidtok_jax.load_config("vidtok_fsq_causal_488_262144")
  model  = vidtok_jax.VidTok(cfg)
  params = vidtok_jax.params_from_torch(state_dict, cfg)
  z, aux = model.apply({"params": params}, x, method=model.encode)
  y      = model.apply({"params": params}, z, method=model.decode)
  streamer = vidtok_jax.Streamer(model, params)  # videos of any length / size, tile by tile

The packages, one concern each: `models` (the network), `weights` (hub, converter, loading),
`data` (decode, sampling, the training pipeline), `train`, `inference` (streaming,
reconstruction), `evaluation` and `metrics`, `tokenize`, `planning` (TPU / GPU plans), `cli`
(the console commands). Modules moved by the re-layout keep their old import path for one
release (`_moved`, with a DeprecationWarning).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from vidtok_jax import weights
from vidtok_jax.config import VARIANTS, ModelSpec, default_config, load_config
from vidtok_jax.models.autoencoder import VidTok, abstract_params, init_params, output_frames
from vidtok_jax.weights.hub import from_pretrained


def params_from_torch(state_dict, cfg):
  """An official state_dict `{torch key: array or tensor}` -> Flax params of `VidTok(cfg)`.

  Keys outside `encoder.`/`decoder.`/`regularization.` that a training checkpoint holds
  (`loss.`, `model_ema.`) are ignored; a missing, unexpected or mis-shaped key is a ValueError.
  """
  return weights.params_from_state_dict(state_dict, abstract_params(cfg))


# Old import path -> new, for one release after the re-layout (2026-12); each use warns.
MOVED = {
    "vidtok_jax.aot": "vidtok_jax.planning.aot",
    "vidtok_jax.bench": "vidtok_jax.planning.__main__",  # the planner; device timing: benchmarks/
    "vidtok_jax.cli_flags": "vidtok_jax.cli.flags",
    "vidtok_jax.commands": "vidtok_jax.cli",
    "vidtok_jax.commands.eval": "vidtok_jax.cli.eval",
    "vidtok_jax.commands.reconstruct": "vidtok_jax.cli.reconstruct",
    "vidtok_jax.commands.train": "vidtok_jax.cli.train",
    "vidtok_jax.compile_cache": "vidtok_jax.train.compile_cache",
    "vidtok_jax.compile_options": "vidtok_jax.train.compile_options",
    "vidtok_jax.convert": "vidtok_jax.weights",
    "vidtok_jax.convert.__main__": "vidtok_jax.cli.convert",
    "vidtok_jax.convert.infer": "vidtok_jax.weights.infer",
    "vidtok_jax.convert.io": "vidtok_jax.weights.io",
    "vidtok_jax.convert.keys": "vidtok_jax.weights.keys",
    "vidtok_jax.convert.torch_zip": "vidtok_jax.weights.torch_zip",
    "vidtok_jax.demo": "vidtok_jax.cli.demo",
    "vidtok_jax.losses": "vidtok_jax.train.losses",
    "vidtok_jax.precision": "vidtok_jax.train.precision",
    "vidtok_jax.pretrained": "vidtok_jax.weights.hub",
    "vidtok_jax.reconstruct": "vidtok_jax.inference.reconstruct",
    "vidtok_jax.safe_write": "vidtok_jax.files",
    "vidtok_jax.streaming": "vidtok_jax.inference.streaming",
    "vidtok_jax.train_configs": "vidtok_jax.train.configs",
}


def _warn_moved(old: str, new: str, stacklevel: int):
  warnings.warn(f"{old} moved to {new}; the old path goes in the next release", DeprecationWarning,
                stacklevel=stacklevel)


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
  """Imports an old module path as the module now at its new path (the same module object, so
  patches and isinstance checks see one module), and runs it for `python -m OLD`."""

  def find_spec(self, name, path=None, target=None):
    new = MOVED.get(name)
    if new is None:
      return None
    spec = importlib.util.find_spec(new)
    return importlib.util.spec_from_loader(
        name, self, is_package=spec.submodule_search_locations is not None)

  def create_module(self, spec):
    _warn_moved(spec.name, MOVED[spec.name], stacklevel=3)
    return importlib.import_module(MOVED[spec.name])

  def exec_module(self, module):
    pass  # the new module ran when it was imported

  def get_code(self, fullname):  # `python -m OLD` runs the new module's code as __main__
    new = MOVED[fullname]
    _warn_moved(fullname, new, stacklevel=2)
    spec = importlib.util.find_spec(new)
    return spec.loader.get_code(new)

  def get_source(self, fullname):
    return None


if not any(isinstance(f, _Moved) for f in sys.meta_path):
  sys.meta_path.insert(0, _Moved())


def __getattr__(name):
  if name == "convert":  # `vidtok_jax.convert.params_from_state_dict`, the pre-2026-12 path
    _warn_moved("vidtok_jax.convert", "vidtok_jax.weights", stacklevel=3)
    return weights
  if name == "Streamer":
    from vidtok_jax.inference.streaming import Streamer
    return Streamer
  raise AttributeError(f"module 'vidtok_jax' has no attribute {name!r}")


__all__ = ["VARIANTS", "ModelSpec", "Streamer", "VidTok", "abstract_params", "default_config",
           "from_pretrained", "init_params", "load_config", "output_frames", "params_from_torch",
           "weights"]
