"""The official VidTok weights in one call: `from_pretrained(name) -> (VidTok, params)`.

    model, params = vidtok_jax.from_pretrained("fsq_causal_488_262144")
    z, aux = model.apply({"params": params}, x, method=model.encode)

A variant name (with or without the `vidtok_` prefix) is fetched from the Hugging Face hub repo
`microsoft/VidTok` with `huggingface_hub.hf_hub_download` (its cache, `HF_HOME` / `HF_HUB_CACHE`,
`HF_HUB_OFFLINE`, `revision`, its progress bar), read without PyTorch (weights/torch_zip.py) and
converted to Flax params. The converted params are cached beside the download
(`<hub cache>/models--microsoft--VidTok/vidtok_jax/<file hash>-<config hash>.safetensors`), so a
second call loads them without reading the `.ckpt` again. A local `.ckpt` / `.safetensors` file
or a `convert to-flax` folder works too (its variant taken from its name, or given as `variant=`).
"""

import hashlib
import json
import os
import sys

import numpy as np

from vidtok_jax.config import VARIANTS, load_config
from vidtok_jax.files import atomic_path

HUB_REPO = "microsoft/VidTok"
IGNORED_PREFIXES = ("loss.", "model_ema.")  # training-only keys of official checkpoints
_CACHE_FORMAT = "vidtok_jax.weights.hub/1"


def variant_name(name: str) -> str:
  """`"fsq_causal_488_262144"` or `"vidtok_fsq_causal_488_262144"` -> the latter; ValueError
  listing the known variants for anything else."""
  full = name if name.startswith("vidtok_") else f"vidtok_{name}"
  if full not in VARIANTS:
    known = ", ".join(v[len("vidtok_"):] for v in sorted(VARIANTS))
    raise ValueError(f"unknown VidTok variant {name!r}; known (the `vidtok_` prefix is "
                     f"optional): {known}")
  return full


def hub_filename(name: str) -> str:
  """The official file of a variant in the hub repo `microsoft/VidTok`."""
  full = variant_name(name)
  if full.endswith("_v1_1"):
    return f"checkpoints/vidtok_v1_1/{full}.ckpt"
  return f"checkpoints/{full}.ckpt"


def _say(message):
  print(message, file=sys.stderr, flush=True)


def download(name: str, *, revision=None, cache_dir=None, local_files_only=False) -> str:
  """Local path of the official checkpoint of variant `name`, fetched into the hub cache if it is
  not there. Offline (`HF_HUB_OFFLINE=1` or `local_files_only`) with nothing cached is a
  FileNotFoundError that says how to fetch it."""
  import huggingface_hub
  from huggingface_hub import constants
  from huggingface_hub.errors import LocalEntryNotFoundError

  filename = hub_filename(name)
  offline = local_files_only or constants.HF_HUB_OFFLINE
  cached = huggingface_hub.try_to_load_from_cache(HUB_REPO, filename, cache_dir=cache_dir,
                                                  revision=revision)
  if not isinstance(cached, str) and not offline:
    _say(f"downloading {HUB_REPO}/{filename}" + (f" (revision {revision})" if revision else "")
         + f" into {cache_dir or constants.HF_HUB_CACHE}")
  try:
    return huggingface_hub.hf_hub_download(HUB_REPO, filename, revision=revision,
                                           cache_dir=cache_dir, local_files_only=local_files_only)
  except LocalEntryNotFoundError as e:
    why = "local_files_only=True" if local_files_only else (
        "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "the hub could not be reached")
    raise FileNotFoundError(
        f"{variant_name(name)}: {HUB_REPO}/{filename} is not in the Hugging Face cache "
        f"({cache_dir or constants.HF_HUB_CACHE}) and cannot be downloaded ({why}). Fetch it once "
        f"on a machine with network access, with the same HF_HOME / HF_HUB_CACHE: "
        f"`hf download {HUB_REPO} {filename}`, or `from_pretrained({name!r})` "
        "there.") from e


def _file_key(path):
  """The content hash of a downloaded file: the hub cache names its blob by it (the LFS sha256);
  any other file is hashed here."""
  real = os.path.realpath(path)
  if os.path.basename(os.path.dirname(real)) == "blobs":
    return os.path.basename(real), os.path.join(os.path.dirname(os.path.dirname(real)),
                                                "vidtok_jax")
  digest = hashlib.sha256()
  with open(real, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest(), os.path.join(os.path.dirname(real), ".vidtok_jax")


# Compute-only options: they do not change the params, so they do not change the cache key.
_COMPUTE_FIELDS = ("dtype", "precision", "remat")


def _config_key(cfg):
  fields = {k: v for k, v in cfg.to_dict().items() if k not in _COMPUTE_FIELDS}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      # C order: safetensors writes the raw buffer (converted kernels are transposed views).
      out[f"{prefix}{k}"] = np.require(np.asarray(v, np.float32), requirements="C")
  return out


def _unflatten(flat):
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _check_shapes(params, template, source):
  """ValueError naming every key that is missing, unexpected or of another shape."""
  got = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
  want = {k: tuple(v.shape) for k, v in _flatten_abstract(template).items()}
  problems = [f"  {k}: missing (expected shape {want[k]})" for k in sorted(set(want) - set(got))]
  problems += [f"  {k}: unexpected (shape {got[k]})" for k in sorted(set(got) - set(want))]
  problems += [f"  {k}: shape {got[k]} in the file, {want[k]} for the config"
               for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  if problems:
    raise ValueError(f"params in {source} do not fit the config:\n" + "\n".join(problems))


def _flatten_abstract(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(_flatten_abstract(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _convert(path, cfg):
  from vidtok_jax.models.autoencoder import abstract_params
  from vidtok_jax.weights.io import load_state_dict
  from vidtok_jax.weights.keys import params_from_state_dict
  from vidtok_jax.weights.load import read_params_tree

  template = abstract_params(cfg)
  if os.path.isdir(path):
    params = read_params_tree(path)
    _check_shapes(params, template, path)
    return _unflatten(_flatten(params))
  # Checks every key and shape (the error names the key, the file's and the config's shape).
  return params_from_state_dict(load_state_dict(path), template, ignore_prefixes=IGNORED_PREFIXES)


def official_params(path, cfg, *, cache=True):
  """Flax params (numpy float32) of `VidTok(cfg)` from an official `.ckpt` / `.safetensors` file
  or a `convert to-flax` folder. With `cache`, a file's converted params are stored beside it
  (keyed by the file's hash and the config) and reused on the next call. Commands load weights
  with `vidtok_jax.weights.load.load_params` (which calls this for `hf:NAME`)."""
  if os.path.isdir(path) or not cache:
    return _convert(path, cfg)
  key, folder = _file_key(path)
  cached = os.path.join(folder, f"{key}-{_config_key(cfg)}.safetensors")
  if os.path.isfile(cached):
    from safetensors.numpy import load_file

    try:
      return _unflatten(load_file(cached))
    except Exception as e:  # a corrupt cache entry is rebuilt, never trusted
      _say(f"ignoring unreadable converted-params cache {cached} ({e}); converting again")
  _say(f"converting {path} to Flax params ({cfg.name})")
  params = _convert(path, cfg)
  try:
    from safetensors.numpy import save_file

    with atomic_path(cached) as tmp:  # a reader never sees half a file
      save_file(_flatten(params), tmp, metadata={"format": _CACHE_FORMAT, "source": key,
                                                 "variant": str(cfg.name)})
    _say(f"cached the converted params in {cached}")
  except OSError as e:  # read-only cache: still usable, just converts every time
    _say(f"could not cache the converted params in {folder} ({e})")
  return params


load_params = official_params  # its name before `weights.load.load_params` (one release)


def _local_variant(path, variant):
  if variant is not None:
    return variant_name(variant)
  stem = os.path.basename(os.path.normpath(path))
  stem = os.path.splitext(stem)[0] if os.path.isfile(path) else stem
  for candidate in (stem, stem.removesuffix("_flax")):
    full = candidate if candidate.startswith("vidtok_") else f"vidtok_{candidate}"
    if full in VARIANTS:
      return full
  raise ValueError(f"cannot tell the VidTok variant of {path} from its name; pass "
                   f"variant=... (one of {', '.join(sorted(VARIANTS))})")


def from_pretrained(name_or_path, *, revision=None, cache_dir=None, local_files_only=False,
                    variant=None, **config_overrides):
  """`(VidTok model, params)` of an official variant or a local checkpoint.

  `name_or_path`: a variant name (`"kl_causal_488_4chn"`, `"vidtok_fsq_causal_488_262144"`,
  also spelled `"hf:NAME"`), fetched from the hub repo `microsoft/VidTok` (`revision`,
  `cache_dir`, `local_files_only` go to `huggingface_hub.hf_hub_download`); or a local `.ckpt` /
  `.safetensors` file or `convert to-flax` folder, whose variant is read from its name unless
  `variant` is given. `config_overrides` go to `load_config` (e.g. `ch=16`). The params are jax
  arrays on the default device.
  """
  import jax

  from vidtok_jax.models.autoencoder import VidTok

  name = os.fspath(name_or_path)
  if name.startswith("hf:"):
    name = name[3:]
  local = os.path.exists(name)
  if local:  # converted on every call (nothing written beside the user's files)
    full = _local_variant(name, variant)
    path = name
  else:
    if os.sep in name or name.endswith((".ckpt", ".safetensors", ".pt", ".pth")):
      raise FileNotFoundError(f"checkpoint {name} does not exist")
    full = variant_name(name)
    if variant is not None and variant_name(variant) != full:
      raise ValueError(f"variant={variant!r} contradicts the requested {full}")
    path = download(full, revision=revision, cache_dir=cache_dir,
                    local_files_only=local_files_only)
  cfg = load_config(full, **config_overrides)
  params = official_params(path, cfg, cache=not local)
  return VidTok(cfg), jax.device_put(params)


__all__ = ["HUB_REPO", "download", "from_pretrained", "hub_filename", "official_params",
           "variant_name"]
