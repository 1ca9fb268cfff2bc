"""Tokens files of `vidtok-reconstruct --save_tokens`: one video's windows as a `.npz`.

    save_tokens("clip_tokens.npz", tokens, variant=..., fps=30, size=(256, 256), num_frames=17,
                num_input_frames=len(frames01))
    tok = load_tokens("clip_tokens.npz", variant=..., model_config=model.config)

`indices` int32 `(K, t, h, w)` (FSQ) or `latents` float32 `(K, t, h, w, C)` (KL), K windows, plus
metadata (`format`, `variant`, `fps`, `size`, `num_frames`, `num_input_frames`, `source`, and
extras such as `long_video`), loadable without pickle. Written atomically (`vidtok_jax.files`).
"""

import os
from typing import Optional

import numpy as np

from vidtok_jax.files import atomic_path
from vidtok_jax.inference.forward import _check_tokens, _spec, check_window

FORMAT = "vidtok_jax.inference.reconstruct/1"
_META_KEYS = ("format", "variant", "fps", "size", "num_frames", "num_input_frames")


def save_tokens(path, tokens, *, variant: str, fps: float, size, num_frames: int,
                num_input_frames: int, source: str = "", **extra):
  """Writes a tokens `.npz`: FSQ indices (integer array) under `indices`, KL latents (float)
  under `latents`, and the metadata (plain numpy scalars/strings: no pickle on load)."""
  tokens = np.asarray(tokens)
  key = "indices" if np.issubdtype(tokens.dtype, np.integer) else "latents"
  arrays = {key: tokens.astype(np.int32 if key == "indices" else np.float32),
            "format": np.str_(FORMAT), "variant": np.str_(variant), "fps": np.float64(fps),
            "size": np.asarray(size, np.int32).reshape(2), "num_frames": np.int32(num_frames),
            "num_input_frames": np.int32(num_input_frames), "source": np.str_(source)}
  arrays.update({k: np.asarray(v) for k, v in extra.items()})
  path = os.fspath(path)
  if not path.endswith(".npz"):  # numpy would append it to the temporary name
    path += ".npz"
  with atomic_path(path) as tmp:  # never a half-written file under the final name
    np.savez_compressed(tmp, **arrays)


def load_tokens(path, *, variant: Optional[str] = None, model_config=None) -> dict:
  """A tokens `.npz` -> dict (`indices` or `latents`, and the metadata as Python values).

  With `variant` / `model_config`, checks that the file was made for that variant and that the
  tokens fit the model (kind, latent channels, frame and spatial sizes). ValueError names the
  problem (missing keys, another variant, ...); FileNotFoundError for a missing file.
  """
  out = _as_python(_read_npz(path))
  if variant is not None and out["variant"] != variant:
    raise ValueError(f"{path} holds tokens of {out['variant']}, not of {variant} (the --config "
                     "variant); decode it with the model that made it")
  if model_config is not None:
    _check_against_model(path, out, _spec(model_config))
  return out


def _read_npz(path) -> dict:
  """The arrays of a tokens file, its keys and format checked (ValueError)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokens file {path} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      d = {k: z[k] for k in z.files}
  except Exception as e:  # a truncated zip, another format, pickled objects ...
    raise ValueError(f"{path} is not a tokens .npz written by save_tokens: {e}") from e
  missing = [k for k in _META_KEYS if k not in d]
  if not ("indices" in d or "latents" in d):
    missing.insert(0, "indices or latents")
  if missing:
    raise ValueError(f"{path} is not a tokens file of vidtok_jax.inference.reconstruct: missing key(s) "
                     f"{', '.join(missing)}")
  if str(d["format"]) != FORMAT:
    raise ValueError(f"{path}: unknown tokens format {str(d['format'])!r} (expected {FORMAT!r})")
  return d


def _as_python(d: dict) -> dict:
  """The token array(s) as they are, the metadata as Python values."""
  out = {k: v for k, v in d.items() if k in ("indices", "latents")}
  out.update(format=str(d["format"]), variant=str(d["variant"]), fps=float(d["fps"]),
             size=tuple(int(v) for v in d["size"]), num_frames=int(d["num_frames"]),
             num_input_frames=int(d["num_input_frames"]),
             source=str(d["source"]) if "source" in d else "")
  for k, v in d.items():  # extra metadata, as Python values
    if k not in out:
      out[k] = v.item() if v.ndim == 0 else v
  return out


def _check_against_model(path, out: dict, s):
  """ValueError unless the tokens of `out` fit the model of spec `s` (kind, latent channels,
  frame and spatial sizes)."""
  kind = "indices" if s.regularizer == "fsq" else "latents"
  if kind not in out:
    raise ValueError(f"{path} holds {'latents' if kind == 'indices' else 'indices'}, but "
                     f"{s.name} decodes {kind}")
  h, w = out["size"]
  if out.get("long_video"):  # one streamed video: any latent length
    tokens = out[kind]
    if tokens.ndim != (4 if kind == "indices" else 5) or len(tokens) != 1:
      raise ValueError(f"{path}: long-video tokens must be one video, got shape {tokens.shape}")
  else:
    check_window(s, out["num_frames"], h, w)
    tokens = _check_tokens(s, out[kind], out["num_frames"])
  sf = s.spatial_factor
  if tokens.shape[2:4] != (h // sf, w // sf):
    raise ValueError(f"{path}: tokens of spatial size {tokens.shape[2:4]} do not match the "
                     f"stated frame size {h}x{w} (factor {sf})")


__all__ = ["FORMAT", "load_tokens", "save_tokens"]
