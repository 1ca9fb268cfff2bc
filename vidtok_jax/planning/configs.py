"""The configs a plan compiles: the repo's training config at a clip size, the model config of
encode / decode, the official recipe's stage, and abstract (shape-only) train-step inputs.

Shared by the planner (`python -m vidtok_jax.planning`), `vidtok_jax.planning.aot` and the device
benchmarks (`benchmarks/`), so a plan and a timed run build the same program.
"""

import argparse
import json


def train_config(variant: str, model_overrides: dict, dtype: str, batch: int, frames: int,
                 size: int, precision: str = "auto", lpips: bool = True, stage: int = 1):
  """The repo's training config (`configs/vidtok.py`) of `variant` and `stage` with the model
  overrides, compute `dtype`, `precision` and a `batch` of `frames x size^2` clips."""
  import vidtok_jax
  from vidtok_jax.train.configs import get_config  # what configs/vidtok.py re-exports

  cfg = get_config(f"{variant.removeprefix('vidtok_')},stage={stage}")
  cfg.model = vidtok_jax.load_config(variant, **model_overrides)
  cfg.train.dtype = dtype
  cfg.train.precision = precision
  if not lpips:
    cfg.loss.perceptual_weight = 0.0
  cfg.data.global_batch_size, cfg.data.num_frames, cfg.data.size = batch, frames, size
  return cfg


def model_config(a, dtype: str):
  """The model config of the model-only ops (encode / decode plans, timed ops) from parsed
  arguments `a` (`config`, `overrides`, `remat`, `precision`): compute `dtype` and the precision
  `a.precision` resolves to for it (auto: the backend default with bf16)."""
  import vidtok_jax
  from vidtok_jax.train.precision import resolve_precision

  precision = resolve_precision(a.precision, dtype, a.overrides.get("precision", "highest"))
  return vidtok_jax.load_config(a.config, **{**a.overrides, "remat": a.remat, "dtype": dtype,
                                             "precision": precision})


def resolve_stage(stage: str, size: int) -> int:
  """`--stage auto`: the official recipe's stage for that frame size (stage 2, the frozen encoder
  and decoder-only training, at 256^2 and above; stage 1 below)."""
  return (2 if size >= 256 else 1) if stage == "auto" else int(stage)


def lpips_abstract_params(net: str):
  """The shapes of the LPIPS params (no values)."""
  import jax
  import jax.numpy as jnp

  from vidtok_jax.metrics.lpips import LPIPS

  img = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda a, b: LPIPS(net=net).init(jax.random.key(0), a, b), img,
                        img)["params"]


def abstract_train_step(cfg):
  """`(step, (state, batch))`: `cfg`'s train step and shape-only inputs (one device, no mesh),
  for XLA's memory analysis without allocating anything."""
  import jax
  import jax.numpy as jnp

  import vidtok_jax
  from vidtok_jax import train

  d = cfg.data
  lp = lpips_abstract_params(cfg.loss.lpips_net) if cfg.loss.perceptual_weight > 0 else None
  state = jax.eval_shape(
      lambda p, lp: train.create_train_state(cfg, jax.random.key(0), p, lpips_params=lp),
      vidtok_jax.abstract_params(cfg.model), lp)
  batch = {"video": jax.ShapeDtypeStruct((d.global_batch_size, d.num_frames, d.size, d.size, 3),
                                         jnp.float32)}
  return train.make_train_step(cfg), (state, batch)


def parse_set(items) -> dict:
  """`--set FIELD=VALUE` items -> `{field: value}` (values JSON where they parse, else text)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set expects field=value, got {item!r}")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def add_model_flags(p, platform_note: str = ""):
  """The flags that pick the model and its numerics, shared by the planner and the device
  benchmark (`benchmarks/bench.py`), so both read a command line the same way."""
  p.add_argument("--config", default="vidtok_kl_causal_488_4chn", help="released variant name")
  p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype (params stay float32); auto: bf16 on GPU/TPU, float32 on "
                      "CPU (the training default)" + platform_note)
  p.add_argument("--precision", default="auto",
                 choices=("auto", "default", "high", "highest", "tf32"),
                 help="conv/matmul precision; auto: backend default with bf16, highest with "
                      "float32; tf32: float32 with TF32 tensor cores (A100/H100)")
  p.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True,
                 help="train_step: include the LPIPS term (random VGG weights of the right shapes)")
