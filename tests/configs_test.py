"""The ml_collections entry config `configs/vidtok.py`: variants, stages, tiny, errors."""

import importlib.util
import pathlib

import pytest

import vidtok_jax

_SPEC = importlib.util.spec_from_file_location(
    "vidtok_configs", pathlib.Path(__file__).resolve().parents[1] / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)


@pytest.mark.parametrize("name", sorted(vidtok_jax.VARIANTS))
@pytest.mark.parametrize("stage", [1, 2])
def test_every_variant_and_stage(name, stage):
  cfg = configs.get_config(f"{name[len('vidtok_'):]},stage={stage}")
  assert cfg.variant == name and cfg.stage == stage
  assert cfg.model.name == name
  causal, v11 = cfg.model.causal, cfg.model.version == "v1.1"
  assert cfg.data.num_frames == (33 if v11 else 17 if causal else 16)
  assert cfg.data.causal == causal
  assert (cfg.data.size, cfg.data.global_batch_size) == ((128, 16) if stage == 1 else (256, 8))


def test_tiny_and_prefix():
  cfg = configs.get_config("vidtok_fsq_causal_488_4096,tiny")
  assert cfg.model.ch == 8 and cfg.model.num_res_blocks == 1 and cfg.data.size == 32
  vidtok_jax.VidTok(cfg.model)  # valid model config


@pytest.mark.parametrize("arg,match", [("kl_causal_999", "unknown variant"),
                                       ("kl_causal_488_4chn,stage=3", "stage must be"),
                                       ("kl_causal_488_4chn,bogus=1", "unknown config option"),
                                       ("kl_causal_488_4chn,huge", "cannot parse")])
def test_bad_args(arg, match):
  with pytest.raises(ValueError, match=match):
    configs.get_config(arg)


@pytest.mark.parametrize("stage", [1, 2])
def test_train_section(stage):
  cfg = configs.get_config(f"kl_causal_488_4chn,stage={stage}")
  t = cfg.train
  assert (t.lr, t.disc_lr, t.adam_b1, t.adam_b2, t.adam_eps) == (1e-5, 1e-5, 0.9, 0.999, 1e-8)
  assert (t.grad_clip, t.disc_grad_clip) == (20.0, 20.0)
  assert cfg.total_steps == (50_000 if stage == 1 else 30_000)
  assert (cfg.checkpoint_every, cfg.keep_last, cfg.keep_best, cfg.eval_clips) == (1000, 3, 1, 32)
  assert t.fix_encoder == (stage == 2) and t.init_from == ""
  assert t.ema_decay is None and t.dtype == "auto" and t.max_consecutive_nonfinite == 10
  assert t.mesh.data_axis == "data" and t.mesh.fsdp is False


def test_loss_section_and_tiny():
  l = configs.get_config("fsq_causal_488_262144").loss
  assert (l.disc_start, l.disc_weight, l.perceptual_weight, l.kl_weight, l.aux_weight) == (
      20001, 0.2, 1.0, 1e-6, 1.0)
  assert (l.disc_type, l.disc_loss, l.gen_loss_cross_entropy, l.lpips_net) == (
      "2d", "hinge", True, "vgg")
  assert (l.lecam_weight, l.lecam_decay, l.disc_ndf, l.disc_layers) == (0.005, 0.999, 64, 3)
  tiny = configs.get_config("kl_causal_488_4chn,stage=2,tiny")
  # Tiny keeps every loss term (LPIPS included) with a narrow discriminator and 20 steps.
  assert tiny.loss.perceptual_weight == 1.0 and tiny.loss.disc_ndf == 8
  assert tiny.total_steps == 20 and tiny.train.fix_encoder
  tiny.train.ema_decay = 0.999  # the EMA placeholder accepts a float override
  assert tiny.train.ema_decay == 0.999


def test_checkout_configs_are_the_bundled_ones():
  """`configs/vidtok.py` re-exports the package's copy (what the console scripts use outside a
  checkout): one definition, the same configs."""
  from vidtok_jax.train import configs as train_configs

  assert configs.get_config is train_configs.get_config
  assert configs.get_config("kl_causal_488_4chn,tiny") == train_configs.get_config(
      "kl_causal_488_4chn,tiny")
