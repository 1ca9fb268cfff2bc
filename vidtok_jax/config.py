"""Model configs of every released VidTok variant, by official name.

A model config is a flat `ml_collections.ConfigDict` whose fields carry the official YAML names
(`encoder_config.params` / `decoder_config.params` / `regularizer_config.params` merged), so a
YAML can be ported by hand. `load_config(name, **overrides)` returns one; `ModelSpec.from_config`
validates it and resolves the resampling schedules into the frozen form the modules take.
"""

import dataclasses
from typing import Optional, Tuple

import ml_collections

# Fields shared by every release; `None` schedules mean "the official default".
BASE = dict(
    version="v1.0",  # engine: "v1.0" (autoencoder) or "v1.1" (autoencoder_v1_1)
    causal=True,  # model_3dcausal* vs model_3dnoncausal
    ch=128,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    in_channels=3,
    out_ch=3,
    z_channels=4,
    double_z=True,
    dropout=0.0,
    time_downsample_factor=4,
    norm_type="layernorm",
    init_pad_mode="replicate",
    resamp_with_conv=True,
    spatial_ds=None,
    tempo_ds=None,
    spatial_us=None,
    tempo_us=None,
    interpolation_mode="nearest",  # v1.1 releases: "trilinear"
    regularizer="kl",  # "kl" (DiagonalGaussianRegularizer) or "fsq" (FSQRegularizer)
    levels=None,
    dim=None,  # FSQ input dim; None = len(levels) (no projections)
    entropy_loss_weight=0.1,
    entropy_loss_annealing_steps=2000,
    entropy_loss_annealing_factor=3.0,
    commitment_loss_weight=0.25,
    diversity_gamma=1.0,
    # Port options (not in the official YAML).
    dtype="float32",  # compute dtype ("float64" needs jax_enable_x64; for verification)
    param_dtype="float32",
    # Matmul/conv precision for float32 compute: "highest" is exact float32 (parity with the
    # official model on GPUs/TPUs too); "default" lets XLA use TF32 / bf16 passes (faster).
    precision="highest",
    # Rematerialisation of each res / temporal / mid block in the backward pass (REMAT_POLICIES):
    # "none", "convs" (keep conv outputs, recompute norms and activations), "blocks" (keep only
    # block inputs). True / False mean "blocks" / "none".
    remat="none",
)

REMAT_POLICIES = ("none", "convs", "blocks")

_FSQ = dict(regularizer="fsq", double_z=False)
_41616 = dict(ch_mult=(1, 2, 4, 4, 4))
_V11 = dict(version="v1.1", interpolation_mode="trilinear")
_NC = dict(causal=False)

VARIANTS = {
    "vidtok_kl_causal_488_4chn": dict(z_channels=4),
    "vidtok_kl_causal_488_8chn": dict(z_channels=8),
    "vidtok_kl_causal_488_16chn": dict(z_channels=16),
    "vidtok_kl_causal_288_8chn": dict(z_channels=8, time_downsample_factor=2, tempo_ds=(1,),
                                      tempo_us=(2,)),
    "vidtok_kl_causal_444_4chn": dict(z_channels=4, spatial_ds=(1, 2), spatial_us=(1, 2)),
    "vidtok_kl_causal_41616_4chn": dict(z_channels=4, **_41616),
    "vidtok_kl_noncausal_488_4chn": dict(z_channels=4, **_NC),
    "vidtok_kl_noncausal_488_16chn": dict(z_channels=16, **_NC),
    "vidtok_kl_noncausal_41616_4chn": dict(z_channels=4, **_NC, **_41616),
    "vidtok_kl_noncausal_41616_16chn": dict(z_channels=16, **_NC, **_41616),
    "vidtok_fsq_causal_488_262144": dict(z_channels=6, levels=(8,) * 6, **_FSQ),
    "vidtok_fsq_causal_488_32768": dict(z_channels=5, levels=(8,) * 5, **_FSQ),
    "vidtok_fsq_causal_488_4096": dict(z_channels=4, levels=(8,) * 4, **_FSQ),
    "vidtok_fsq_causal_41616_262144": dict(z_channels=6, levels=(8,) * 6, **_FSQ, **_41616),
    "vidtok_fsq_noncausal_488_262144": dict(z_channels=6, levels=(8,) * 6, **_FSQ, **_NC),
    "vidtok_fsq_noncausal_41616_262144": dict(z_channels=6, levels=(8,) * 6, **_FSQ, **_NC,
                                              **_41616),
    "vidtok_kl_causal_488_4chn_v1_1": dict(z_channels=4, **_V11),
    "vidtok_kl_causal_488_16chn_v1_1": dict(z_channels=16, **_V11),
    "vidtok_kl_causal_41616_16chn_v1_1": dict(z_channels=16, **_V11, **_41616),
    "vidtok_kl_causal_288_8chn_v1_1": dict(z_channels=8, time_downsample_factor=2, tempo_ds=(1,),
                                           tempo_us=(2,), **_V11),
    "vidtok_fsq_causal_488_32768_v1_1": dict(z_channels=5, levels=(8,) * 5, **_FSQ, **_V11),
    "vidtok_fsq_causal_41616_262144_v1_1": dict(z_channels=6, levels=(8,) * 6, **_FSQ, **_V11,
                                                **_41616),
    "vidtok_fsq_causal_888_32768_v1_1": dict(z_channels=5, levels=(8,) * 5,
                                             time_downsample_factor=8, tempo_ds=(0, 1, 2),
                                             tempo_us=(1, 2, 3), **_FSQ, **_V11),
}

_TUPLE_FIELDS = ("ch_mult", "spatial_ds", "tempo_ds", "spatial_us", "tempo_us", "levels")


def _as_tuple(v):
  return tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else v


def default_config() -> ml_collections.ConfigDict:
  """The field set with release defaults (a causal v1.0 KL 4x8x8 model)."""
  return ml_collections.ConfigDict(dict(BASE, name="custom"))


def load_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """The model config of a released variant, e.g. `load_config("vidtok_kl_causal_488_4chn")`.

  `overrides` replace fields (e.g. `ch=64`); an unknown name or field raises `ValueError`, and
  the result is validated (`ModelSpec.from_config`).
  """
  if name not in VARIANTS:
    raise ValueError(f"unknown VidTok variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
  fields = dict(BASE, name=name, **VARIANTS[name])
  for key, value in overrides.items():
    if key not in fields:
      raise ValueError(f"unknown model config field {key!r}; fields: {', '.join(sorted(fields))}")
    fields[key] = _as_tuple(value) if key in _TUPLE_FIELDS else value
  cfg = ml_collections.ConfigDict(fields)
  ModelSpec.from_config(cfg)
  return cfg


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A validated, hashable model config with resolved schedules (what the modules consume)."""

  name: str
  version: str
  causal: bool
  ch: int
  ch_mult: Tuple[int, ...]
  num_res_blocks: int
  in_channels: int
  out_ch: int
  z_channels: int
  double_z: bool
  time_downsample_factor: int
  norm_type: str
  init_pad_mode: str
  resamp_with_conv: bool
  spatial_ds: Tuple[int, ...]
  tempo_ds: Tuple[int, ...]
  spatial_us: Tuple[int, ...]
  tempo_us: Tuple[int, ...]
  interpolation_mode: str
  temp_upsample_m: Tuple[int, ...]
  regularizer: str
  levels: Optional[Tuple[int, ...]]
  dim: Optional[int]
  entropy_loss_weight: float
  entropy_loss_annealing_steps: int
  entropy_loss_annealing_factor: float
  commitment_loss_weight: float
  diversity_gamma: float
  dtype: str
  param_dtype: str
  precision: str
  remat: str

  @property
  def spatial_factor(self) -> int:
    return 2 ** len(self.spatial_ds)

  @property
  def is_causal(self) -> bool:
    return self.causal

  @staticmethod
  def from_config(cfg) -> "ModelSpec":
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    unknown = set(d) - set(BASE) - {"name"}
    if unknown:
      raise ValueError(f"unknown model config field(s): {', '.join(sorted(unknown))}")
    d = {**BASE, "name": "custom", **d}
    d = {k: (_as_tuple(v) if k in _TUPLE_FIELDS else v) for k, v in d.items()}

    def bad(field, rule):
      raise ValueError(f"bad model config field {field}={d[field]!r}: {rule}")

    for field, allowed in (("version", ("v1.0", "v1.1")), ("norm_type", ("layernorm", "groupnorm")),
                           ("regularizer", ("kl", "fsq")),
                           ("interpolation_mode", ("nearest", "trilinear")),
                           ("init_pad_mode", ("replicate", "constant")),
                           ("dtype", ("float32", "bfloat16", "float16", "float64")),
                           ("param_dtype", ("float32", "bfloat16", "float64")),
                           ("precision", ("default", "high", "highest"))):
      if d[field] not in allowed:
        bad(field, f"must be one of {allowed}")
    if isinstance(d["remat"], bool):
      d["remat"] = "blocks" if d["remat"] else "none"
    if d["remat"] not in REMAT_POLICIES:
      bad("remat", f"must be one of {REMAT_POLICIES} (or a bool)")
    for field in ("ch", "num_res_blocks", "z_channels", "in_channels", "out_ch"):
      if not isinstance(d[field], int) or d[field] < 1:
        bad(field, "must be a positive integer")
    if not d["ch_mult"] or any(m < 1 for m in d["ch_mult"]):
      bad("ch_mult", "must be a non-empty list of positive integers")
    if d["dropout"] != 0.0:
      bad("dropout", "only 0.0 is supported (every release uses 0)")
    if not d["resamp_with_conv"]:
      bad("resamp_with_conv", "only True is supported (every release uses True)")
    n = len(d["ch_mult"])
    if d["causal"]:
      sds = d["spatial_ds"] if d["spatial_ds"] is not None else tuple(range(n - 1))
      tds = d["tempo_ds"] if d["tempo_ds"] is not None else (n - 2, n - 3)
      sus = d["spatial_us"] if d["spatial_us"] is not None else tuple(range(1, n))
      tus = d["tempo_us"] if d["tempo_us"] is not None else (1, 2)
    else:  # the non-causal model hard-codes its schedules and ignores overrides
      sds, tds, sus, tus = tuple(range(n - 1)), (n - 2, n - 3), tuple(range(1, n)), (1, 2)
    for field, levels in (("spatial_ds", sds), ("tempo_ds", tds), ("spatial_us", sus),
                          ("tempo_us", tus)):
      if any(not 0 <= i < n for i in levels):
        raise ValueError(f"bad model config field {field}={levels}: levels must be in "
                         f"0..{n - 1} (len(ch_mult) = {n})")
    n_tds = len([i for i in set(tds) if i in sds])
    n_tus = len([i for i in set(tus) if i in sus])
    if len(set(sds)) != len(set(sus)):
      raise ValueError(f"spatial_ds {sds} and spatial_us {sus} give different spatial factors")
    if n_tds != n_tus:
      raise ValueError(f"tempo_ds {tds} and tempo_us {tus} (within spatial_ds/us) give different "
                       "temporal factors")
    f = 2 ** n_tds
    if d["causal"] and d["time_downsample_factor"] != f:
      bad("time_downsample_factor", f"the schedules downsample time by {f}")
    if not d["causal"]:
      d["time_downsample_factor"] = f
    if d["interpolation_mode"] == "trilinear" and (d["version"] != "v1.1" or not d["causal"]):
      bad("interpolation_mode", "trilinear temporal upsampling exists only in causal v1.1 models")
    if d["norm_type"] == "groupnorm":
      widths = {d["ch"] * m for m in d["ch_mult"]}
      if any(w % 32 for w in widths):
        bad("norm_type", f"groupnorm needs every width divisible by 32, widths {sorted(widths)}")
    if d["regularizer"] == "fsq":
      if not d["levels"] or any(l < 2 for l in d["levels"]):
        bad("levels", "FSQ needs a non-empty list of levels >= 2")
      dim = d["dim"] if d["dim"] is not None else len(d["levels"])
      if d["z_channels"] != dim:
        bad("z_channels", f"must equal the FSQ dim ({dim})")
      if d["double_z"]:
        bad("double_z", "must be False for FSQ")
    elif not d["double_z"]:
      bad("double_z", "must be True for the KL regularizer (mean and logvar)")
    # Trilinear split sizes: the deepest temporal upsampler gets m=1, then 2, 4, ...
    m = [1] * n
    k = 0
    for i in reversed(range(n)):
      if i in sus and i in tus:
        m[i] = 2 ** k
        k += 1
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    d.update(spatial_ds=tuple(sorted(set(sds))), tempo_ds=tuple(tds), spatial_us=tuple(sus),
             tempo_us=tuple(tus), temp_upsample_m=tuple(m))
    return ModelSpec(**{k: v for k, v in d.items() if k in fields})
