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
