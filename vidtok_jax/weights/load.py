"""`load_params(source, config)`: the one way every command loads VidTok weights, from any source.

    params = load_params("runs/stage1", config)                     # a vidtok-train workdir
    params = load_params("runs/stage1", config, use_ema=True)       # ... its EMA weights
    params = load_params("vidtok_kl_causal_488_4chn.ckpt", config)  # an official checkpoint
    params = load_params("params_flax/", config)                    # `vidtok-convert to-flax`
    params = load_params("hf:kl_causal_488_4chn", config)           # the released weights (hub)

eval, reconstruct, tokenize, the demo, `vidtok-convert to-torch` and training's `init_from`
(`vidtok_jax.train.checkpoint.load_init_params`) all call it. A train workdir is read here with
Orbax (`weights.steps.StepReader`, read-only), so loading weights never imports the training
package.
"""

import logging
import os
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vidtok_jax.weights.steps import (
    STATE,
    CheckpointError,
    CheckpointNotFoundError,
    StepReader,
    as_path,
    leaf_specs,
    mismatch,
)

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
HUB_PREFIX = "hf:"

_TEMPLATES = {}  # model config JSON -> abstract params: tracing the model's init costs seconds


def model_config(config):
  """The model config of `config`: `config.model` of a full (train / eval) config, or `config`
  itself when it is a model config already (`vidtok_jax.load_config(...)`)."""
  mc = config.model if "model" in config else config
  return mc.copy_and_resolve_references() if hasattr(mc, "copy_and_resolve_references") else mc


def _model_template(mc):
  from vidtok_jax.models.autoencoder import abstract_params

  key = mc.to_json_best_effort(sort_keys=True)
  if key not in _TEMPLATES:
    _TEMPLATES[key] = abstract_params(mc)
  return _TEMPLATES[key]


def _is_step_folder(path: epath.Path) -> bool:
  return (path / STATE).is_dir()


def _checkpoints_dir(path: epath.Path) -> Optional[epath.Path]:
  """The folder of step folders: `path` itself, or `path/checkpoints` (a train workdir)."""
  for d in (path / "checkpoints", path):
    if d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir()):
      return d
  return None


def _params_from_train_checkpoint(path: epath.Path, use_ema: bool, details: dict):
  """`g_params["model"]` (or the EMA shadow's) of the latest good step under `path` (a workdir,
  checkpoints dir or one step folder), restored alone as numpy (no optimizer templates)."""
  chosen = {}

  def select(stored):
    tree = dict(stored)
    source = "g_params"
    if use_ema:
      if isinstance(tree.get("ema_params"), dict) and "model" in tree["ema_params"]:
        source = "ema_params"
      else:
        log.warning("%s has no EMA params; using the trained params (g_params)", path)
    if not isinstance(tree.get(source), dict) or "model" not in tree[source]:
      raise CheckpointError(f"{path} is not a vidtok_jax train checkpoint (no {source}/model)")
    item = {source: {"model": tree[source]["model"]}}
    chosen["source"] = source
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item,
                                is_leaf=lambda x: hasattr(x, "shape"))
    return None, ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)

  if _is_step_folder(path):
    if not path.name.isdigit():
      raise CheckpointError(f"{path}: a step folder must be named by its step number")
    reader, step = StepReader.open_read_only(path.parent), int(path.name)
  else:
    directory = _checkpoints_dir(path)
    if directory is None:
      return None
    reader, step = StepReader.open_read_only(directory), None
  try:  # broken steps are skipped, never moved (read-only)
    found = reader.restore_item(None, None, step, "params", select=select)
  finally:
    reader.close()
  if found is None:
    raise CheckpointError(f"no checkpoint under {path} could be restored (all steps broken)")
  restored, step = found
  details.update(step=int(step), source=chosen["source"])
  log.info("loaded %s/model of step %d from %s", chosen["source"], step, reader.directory)
  return restored[chosen["source"]]["model"]


def read_params_tree(path):
  """A bare params tree saved with `ocp.StandardCheckpointer` (`convert to-flax`), as numpy;
  `CheckpointError` naming the folder when it cannot be read."""
  path = as_path(path)
  ckptr = ocp.PyTreeCheckpointer()
  try:
    stored = ckptr.metadata(path).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(stored),
                                is_leaf=lambda x: hasattr(x, "shape"))
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(dict(stored),
                                                           restore_args=restore_args))
  except Exception as e:
    raise CheckpointError(f"cannot read the orbax params folder {path}: {e}") from e
  finally:
    ckptr.close()


def _config_hints(stored, mc, template) -> list:
  """`weights.infer.config_hints` of a stored state dict / params tree vs the config's."""
  from vidtok_jax.config import ModelSpec
  from vidtok_jax.weights.infer import config_hints, torch_shapes

  try:
    have, want = torch_shapes(stored), torch_shapes(template)
    other = {k for k in set(have) ^ set(want) if not k.startswith(("loss.", "model_ema."))}
    if any(not k.startswith(("encoder.", "decoder.")) for k in other):
      return []  # another regularizer / variant, not a width or depth: the key list says more
    return config_hints(have, ModelSpec.from_config(mc), want)
  except Exception:  # noqa: BLE001 -- a hint is a nicety: never hide the real mismatch
    return []


def load_params(source, config, *, use_ema: bool = False, details: Optional[dict] = None):
  """The params of `VidTok(config.model)` from `source`, any of:
  - a train workdir or its checkpoints dir (latest good step; g_params["model"], or the EMA
    shadow's "model" when use_ema and present), or one step folder of it,
  - an orbax params folder written by `vidtok-convert to-flax` (a bare params tree saved with
    ocp.StandardCheckpointer; see vidtok_jax/cli/convert.py),
  - an official `.ckpt` / `.safetensors` state dict (via vidtok_jax.weights.io.load_state_dict
    + vidtok_jax.weights.keys.params_from_state_dict with the template
    `vidtok_jax.abstract_params(config.model)`),
  - `"hf:NAME"`: the official weights of variant NAME from the Hugging Face hub (downloaded and
    converted once, then cached; see vidtok_jax/weights/hub.py).
  `config`: a full config (its `model` is used) or a model config (`vidtok_jax.load_config`).
  Shapes are checked against the model config; a mismatch raises CheckpointError (a ValueError)
  naming the config field that differs when the shapes tell (e.g. "this checkpoint has ch=32
  ...; pass --config.model.ch=32"), else the keys.
  Nothing is written: broken steps of a train checkpoint are skipped, not moved.
  Returns a params tree (nested dicts) of float32 numpy arrays. `details`, when given, is
  filled with `step` (the train step restored; None for other files) and `source` (g_params,
  ema_params, state_dict (official files and `hf:` weights) or params).

  Raises `CheckpointNotFoundError` (a FileNotFoundError and ValueError) for a missing path, and
  `CheckpointError` (a ValueError) for a folder without checkpoints or a corrupt one.
  """
  from vidtok_jax.weights.io import load_state_dict
  from vidtok_jax.weights.keys import params_from_state_dict

  mc = model_config(config)
  details = {} if details is None else details
  details.update(step=None, source="params")
  if isinstance(source, str) and source.startswith(HUB_PREFIX):
    details["source"] = "state_dict"
    return _hub_params(source, mc, use_ema)
  template = _model_template(mc)
  p = as_path(source)
  if not p.exists():
    raise CheckpointNotFoundError(f"init checkpoint {p} does not exist")
  if p.is_file():
    if not p.name.lower().endswith(TORCH_SUFFIXES):
      raise CheckpointError(f"{p}: unknown checkpoint file type; expected one of "
                            f"{', '.join(TORCH_SUFFIXES)} or a folder")
    if use_ema:
      raise CheckpointError(f"{p}: use_ema is only supported for vidtok_jax train checkpoints "
                            "(an official state dict's EMA weights are not converted)")
    state_dict = load_state_dict(os.fspath(source))
    details["source"] = "state_dict"
    try:  # shape-checked against the template (missing / unexpected / mis-shaped keys)
      return params_from_state_dict(state_dict, template)
    except ValueError as e:
      hints = _config_hints(state_dict, mc, template)
      raise CheckpointError(f"{p} does not match config.model ({mc.get('name')}): "
                            + ("; ".join(hints) if hints else str(e))) from e
  if (p / "_METADATA").exists() and not (p / STATE).exists():
    if use_ema:
      raise CheckpointError(f"{p}: use_ema needs a train checkpoint; this is a bare params tree")
    params = read_params_tree(p)
  else:
    params = _params_from_train_checkpoint(p, use_ema, details)
    if params is None:
      raise CheckpointError(f"{p} holds no checkpoint: expected a train workdir (with "
                            "checkpoints/<step>/), a checkpoints folder, a step folder, a "
                            "`convert to-flax` params folder, or a .ckpt/.safetensors file")
  problem = mismatch(leaf_specs(params, dtypes=False), leaf_specs(template, dtypes=False),
                     f"params in {p} do not match config.model ({mc.get('name')})")
  if problem:
    hints = _config_hints(params, mc, template)
    if hints:  # the field to change, not hundreds of mis-shaped keys
      problem = (f"params in {p} do not match config.model ({mc.get('name')}): "
                 + "; ".join(hints))
    raise CheckpointError(problem)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _hub_params(spec, mc, use_ema):
  from vidtok_jax.config import VARIANTS
  from vidtok_jax.weights import hub

  if use_ema:
    raise CheckpointError(f"{spec}: use_ema is only supported for vidtok_jax train checkpoints "
                          "(an official state dict's EMA weights are not converted)")
  full = hub.variant_name(spec[len(HUB_PREFIX):])
  if mc.get("name") in VARIANTS and mc.name != full:
    raise CheckpointError(f"{spec} holds the weights of {full}, but config.model is {mc.name}")
  # Shapes are checked against config.model by the conversion (key and both shapes named).
  return hub.official_params(hub.download(full), mc)


__all__ = ["CheckpointError", "CheckpointNotFoundError", "TORCH_SUFFIXES", "load_params",
           "model_config", "read_params_tree"]
