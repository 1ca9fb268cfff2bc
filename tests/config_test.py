"""Model configs: official names and fields, overrides, validation errors, resolved schedules."""

import ml_collections
import pytest

import vidtok_jax
from vidtok_jax.config import ModelSpec


def spec(name, **kw):
  return ModelSpec.from_config(vidtok_jax.load_config(name, **kw))


def test_official_fields_and_overrides():
  cfg = vidtok_jax.load_config("vidtok_fsq_causal_488_262144", ch=64, ch_mult=[1, 2, 2, 4])
  assert isinstance(cfg, ml_collections.ConfigDict)
  for field in ("ch", "ch_mult", "num_res_blocks", "z_channels", "double_z", "spatial_ds",
                "tempo_ds", "spatial_us", "tempo_us", "time_downsample_factor", "norm_type",
                "init_pad_mode", "levels", "entropy_loss_weight", "commitment_loss_weight"):
    assert field in cfg, field
  assert cfg.ch == 64 and tuple(cfg.ch_mult) == (1, 2, 2, 4) and tuple(cfg.levels) == (8,) * 6
  # A ConfigDict with the same content builds the same (hashable) spec.
  assert hash(ModelSpec.from_config(cfg)) == hash(ModelSpec.from_config(cfg.to_dict()))


@pytest.mark.parametrize("call,match", [
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_999"), "unknown VidTok variant"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", chh=3), "unknown model config field 'chh'"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", norm_type="batch"), "norm_type"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", time_downsample_factor=8),
     "time_downsample_factor"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", interpolation_mode="trilinear"),
     "interpolation_mode"),
    (lambda: vidtok_jax.load_config("vidtok_fsq_causal_488_4096", z_channels=5), "z_channels"),
    (lambda: vidtok_jax.load_config("vidtok_fsq_causal_488_4096", levels=[8, 1, 8, 8]), "levels"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", double_z=False), "double_z"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", ch=0), "ch"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", norm_type="groupnorm", ch=8),
     "divisible by 32"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", tempo_ds=[5]), "levels must be"),
    (lambda: vidtok_jax.load_config("vidtok_kl_causal_488_4chn", dropout=0.1), "dropout"),
    (lambda: vidtok_jax.VidTok({"ch": 8, "bogus": 1}).config, "unknown model config field"),
])
def test_bad_configs_name_the_problem(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_resolved_schedules():
  s = spec("vidtok_kl_causal_488_4chn")
  assert (s.spatial_ds, s.tempo_ds, s.spatial_us, s.tempo_us) == ((0, 1, 2), (2, 1), (1, 2, 3),
                                                                  (1, 2))
  s = spec("vidtok_kl_causal_41616_4chn")  # encoder [n-2, n-3] vs decoder [1, 2] (quirk 6)
  assert (s.spatial_ds, s.tempo_ds, s.tempo_us, s.spatial_factor) == ((0, 1, 2, 3), (3, 2),
                                                                      (1, 2), 16)
  s = spec("vidtok_kl_causal_444_4chn")
  assert s.spatial_factor == 4 and s.time_downsample_factor == 4
  # The non-causal model hard-codes its schedules and ignores overrides.
  s = spec("vidtok_kl_noncausal_488_4chn", tempo_us=[3])
  assert s.tempo_us == (1, 2) and s.time_downsample_factor == 4


@pytest.mark.parametrize("name,m", [
    ("vidtok_kl_causal_488_4chn_v1_1", {2: 1, 1: 2}), ("vidtok_kl_causal_288_8chn_v1_1", {2: 1}),
    ("vidtok_fsq_causal_888_32768_v1_1", {3: 1, 2: 2, 1: 4}),
    ("vidtok_fsq_causal_41616_262144_v1_1", {2: 1, 1: 2})])
def test_trilinear_split_sizes(name, m):
  s = spec(name)
  assert s.interpolation_mode == "trilinear" and s.version == "v1.1"
  assert {i: s.temp_upsample_m[i] for i in m} == m
