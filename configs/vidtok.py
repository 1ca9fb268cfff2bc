r"""VidTok configs: every released variant, both training stages, and a CPU-sized `tiny` variant.

  python train.py --config=configs/vidtok.py:kl_causal_488_4chn,stage=1 --workdir=runs/x \
      --config.data.dir=/path/to/videos

The argument after ':' is `VARIANT[,stage=1|2][,tiny]`; VARIANT is an official name with or
without the `vidtok_` prefix (e.g. `fsq_causal_488_262144`, `kl_causal_488_4chn_v1_1`).
Stage 1 trains the whole model at low resolution; stage 2 starts from a stage-1 checkpoint
(`init_from`), freezes the encoder and trains the decoder at high resolution (SPEC 7.7).
"""

import ml_collections

from vidtok_jax.config import VARIANTS, load_config
from vidtok_jax.data.config import data_config


def parse_arg(arg):
  """`"kl_causal_488_4chn,stage=2,tiny"` -> dict(variant=..., stage=2, tiny=True)."""
  opts = dict(variant="kl_causal_488_4chn", stage=1, tiny=False)
  for i, part in enumerate(p.strip() for p in (arg or "").split(",") if p.strip()):
    if "=" in part:
      key, value = part.split("=", 1)
      if key not in opts:
        raise ValueError(f"unknown config option {key!r} in {arg!r}; options: variant, stage, tiny")
      opts[key] = type(opts[key])(int(value) if key == "stage" else value)
    elif part == "tiny":
      opts["tiny"] = True
    elif i == 0:
      opts["variant"] = part
    else:
      raise ValueError(f"cannot parse config option {part!r} in {arg!r}")
  name = opts["variant"] if opts["variant"].startswith("vidtok_") else "vidtok_" + opts["variant"]
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {opts['variant']!r}; known: "
                     f"{', '.join(sorted(n[len('vidtok_'):] for n in VARIANTS))}")
  if opts["stage"] not in (1, 2):
    raise ValueError(f"stage must be 1 or 2, got {opts['stage']}")
  opts["variant"] = name
  return opts


def get_config(arg=None) -> ml_collections.ConfigDict:
  opts = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.variant = opts["variant"]
  config.stage = opts["stage"]
  model = load_config(opts["variant"])
  causal, v11 = model.causal, model.version == "v1.1"
  if opts["tiny"]:  # CPU-sized: same topology, narrow and shallow
    model = load_config(opts["variant"], ch=8, ch_mult=tuple(min(m, 2) for m in model.ch_mult),
                        num_res_blocks=1)
  config.model = model

  # SPEC 7.7 / 8: 17-frame clips for causal models (33 for v1.1), 16 for non-causal; training
  # at sample_fps 3, validation at 8 from frame 0; stage 1 at 128^2 (batch 16), stage 2 at 256^2
  # (batch 8).
  num_frames = 33 if v11 else (17 if causal else 16)
  size, batch = (128, 16) if opts["stage"] == 1 else (256, 8)
  if opts["tiny"]:
    num_frames, size, batch = (9 if causal else 8), 32, 2
  config.data = data_config(num_frames=num_frames, causal=causal, size=size,
                            global_batch_size=batch,
                            sample_fps=3.0, eval_sample_fps=8.0,
                            store_short_side=max(size, 64) if opts["tiny"] else 256)
  return config
