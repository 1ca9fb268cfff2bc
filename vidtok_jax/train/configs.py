r"""VidTok configs: every released variant, both training stages, and a CPU-sized `tiny` variant.

The training configs `configs/vidtok.py` of a checkout re-exports (bundled in the package, so
the installed console scripts have them too).

  python train.py --config=configs/vidtok.py:kl_causal_488_4chn,stage=1 --workdir=runs/x \
      --config.data.dir=/path/to/videos

The argument after ':' is `VARIANT[,stage=1|2][,tiny]`; VARIANT is an official name with or
without the `vidtok_` prefix (e.g. `fsq_causal_488_262144`, `kl_causal_488_4chn_v1_1`).
Stage 1 trains the whole model at low resolution; stage 2 starts from a stage-1 checkpoint
(`init_from`), freezes the encoder and trains the decoder at high resolution.
"""

import ml_collections
from ml_collections import config_dict

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

  # The official recipe: 17-frame clips for causal models (33 for v1.1), 16 for non-causal; training
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
  config.train = train_config(opts["stage"], opts["tiny"])
  config.loss = loss_config(opts["tiny"])
  loop_config(config, opts["stage"], opts["tiny"])
  return config


def loop_config(config, stage: int, tiny: bool):
  """Top-level loop fields of `train.py` (`--config.total_steps=N`, `--config.checkpoint_every=N`).

  Steps count training ITERATIONS (one G update + one D update). The README's "50,000 / 30,000
  steps" are taken as iterations; Lightning's own counter advances twice per iteration.
  """
  config.seed = 0  # model init, discriminator init and the per-step rng stream
  config.total_steps = 20 if tiny else (50_000 if stage == 1 else 30_000)
  config.log_every = 5 if tiny else 50  # console + TensorBoard scalars (interval means)
  # PSNR on the first `eval_clips` validation windows; 0 turns validation off (and keep-best)
  config.eval_every = 10 if tiny else 1_000
  config.eval_clips = 4 if tiny else 32  # 0 disables evaluation (and keep-best)
  config.eval_use_ema = True  # evaluate the EMA weights when `train.ema_decay` is set
  config.sample_every = 10 if tiny else 1_000  # validation image grid to TensorBoard; 0 = none
  config.checkpoint_every = 10 if tiny else 1_000
  config.keep_last = 3  # newest checkpoints kept ...
  config.keep_best = 1  # ... plus the best by eval PSNR (needs eval at checkpoint steps)
  config.async_checkpointing = True
  # Persistent XLA compilation cache, so a restarted or preempted run does not compile again:
  # "auto" = WORKDIR/xla_cache, a path, or "" / "off" to turn it off.
  config.compilation_cache_dir = "auto"
  config.profile_steps = 0  # >0: a profiler trace of this many steps after the first log


def train_config(stage: int, tiny: bool) -> ml_collections.ConfigDict:
  """`config.train`: optimisation, precision, EMA, stage-2 freezing, mesh."""
  t = ml_collections.ConfigDict()
  # Official: Adam defaults, base_learning_rate 1e-5 for both optimizers, no scheduler, no
  # weight decay; `--scale_lr` is off by default, so the lr does not grow with the batch.
  t.lr = 1e-5
  t.disc_lr = 1e-5
  t.adam_b1 = 0.9
  t.adam_b2 = 0.999
  t.adam_eps = 1e-8
  t.grad_clip = 20.0  # global L2 norm of the autoencoder grads (incl. the NLL logvar)
  t.disc_grad_clip = 20.0  # ... and, separately, of the discriminator grads
  # None: no EMA (official configs comment `ema_decay: 0.999` out). A float enables LitEma:
  # decay_n = min(ema_decay, (1 + n) / (10 + n)) with n = number of EMA updates so far.
  t.ema_decay = config_dict.placeholder(float)
  # Compute dtype: "auto" (bf16 on GPU/TPU, float32 on CPU; resolved at start-up), "float32",
  # or "bfloat16": bf16 compute (model, LPIPS backbone, discriminator) with float32 params,
  # optimizer state, norm statistics, regularizer/FSQ and loss reductions (official: bf16-mixed).
  t.dtype = "auto"
  # Conv/matmul precision (vidtok_jax.train.precision): "auto" = the backend default with bf16, the
  # model's "highest" (exact) with float32; "tf32" = float32 with TF32 convs on A100/H100
  # (PyTorch's cuDNN default); or "default" / "high" / "highest".
  t.precision = "auto"
  t.fix_encoder = stage == 2  # stage 2: decoder-only fine-tuning on a frozen encoder
  # Params to start from: a stage-1 workdir / checkpoints dir, a `convert to-flax` folder or an
  # official .ckpt / .safetensors. Stage 2 requires it; ignored when the workdir has a checkpoint.
  t.init_from = ""
  t.init_from_ema = False  # take the EMA shadow of a train checkpoint (when it has one)
  t.max_consecutive_nonfinite = 10  # the loop aborts after this many skipped steps in a row
  t.mesh = ml_collections.ConfigDict()
  t.mesh.data_axis = "data"
  t.mesh.fsdp = False  # add an "fsdp" axis and shard the big kernels / Adam moments over it
  t.mesh.fsdp_axis = "fsdp"
  t.mesh.fsdp_size = 0  # devices on the fsdp axis; 0 = all devices of one process
  # Devices that split every activation's height (a last "space" mesh axis, inside one host);
  # the global batch must divide by the rest (data x fsdp). 1 = off. README "Scaling out".
  t.mesh.space = 1
  return t


def loss_config(tiny: bool) -> ml_collections.ConfigDict:
  """`config.loss`: `GeneralLPIPSWithDiscriminator` of the released configs."""
  l = ml_collections.ConfigDict()
  # In Lightning global_step units, which advance twice per iteration i (two optimizers): the G step
  # compares 2i >= disc_start and the D step 2i+1 >= disc_start. With 20001 the discriminator
  # trains from iteration 10,000 and the adversarial G term is on from iteration 10,001.
  l.disc_start = 20001
  l.disc_weight = 0.2  # times the adaptive weight ||grad nll|| / (||grad g|| + 1e-4)
  l.perceptual_weight = 1.0  # LPIPS; 0 skips it entirely (no LPIPS params needed)
  l.lpips_net = "vgg"
  l.kl_weight = 1e-6  # weight of reg_log["kl_loss"] (KL models)
  l.aux_weight = 1.0  # weight of reg_log["aux_loss"] (FSQ models)
  l.disc_type = "2d"  # "2d": PatchGAN on frames; "3d": 3-D PatchGAN on clips
  l.disc_loss = "hinge"  # or "vanilla"
  l.gen_loss_cross_entropy = True  # non-saturating G loss (softplus of patch-mean logits)
  l.lecam_weight = 0.005
  l.lecam_decay = 0.999
  l.disc_ndf = 8 if tiny else 64  # tiny: narrow but the same objective (all terms present)
  l.disc_layers = 3
  return l
