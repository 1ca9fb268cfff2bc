"""`train_and_evaluate` before its first step: validation switched off by `eval_every=0`, and a
run refused at restore leaves the workdir as it found it (no events file, no new folders)."""

import copy
import importlib.util
import os
import pathlib

import numpy as np
import pytest
from conftest import random_params

import vidtok_jax
from vidtok_jax.weights.io import save_safetensors
from vidtok_jax.weights.keys import state_dict_from_params
from vidtok_jax.train import checkpoint as ckpt_lib
from vidtok_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location("vidtok_configs", REPO / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)


def tiny(tmp_path):
  cfg = configs.get_config("kl_causal_488_4chn,tiny")
  cfg.loss.perceptual_weight = 0.0
  cfg.data.dir = str(tmp_path)
  return cfg


def test_eval_every_zero_turns_validation_off(tmp_path):
  cfg = tiny(tmp_path)
  assert loop._validation_on(cfg)
  cfg.eval_every = 0
  loop.validate_config(cfg)  # 0 is allowed (was: "must be a positive int")
  assert not loop._validation_on(cfg)
  assert not loop._due(10, 0, 20) and loop._due(20, 10, 20)
  cfg.eval_every = -1
  with pytest.raises(ValueError, match="config.eval_every"):
    loop.validate_config(cfg)


def test_refused_init_from_leaves_no_workdir(tmp_path):
  cfg = tiny(tmp_path)
  wide = copy.deepcopy(cfg)
  wide.model.ch = 2 * cfg.model.ch
  params = random_params(vidtok_jax.abstract_params(wide.model), seed=0)
  save_safetensors(state_dict_from_params(params), tmp_path / "wide.safetensors")
  cfg.train.init_from = str(tmp_path / "wide.safetensors")
  workdir = tmp_path / "run"
  with pytest.raises(ckpt_lib.CheckpointError, match=f"pass --config.model.ch={wide.model.ch}"):
    loop.train_and_evaluate(cfg, str(workdir))
  assert not workdir.exists()


def test_refused_restore_leaves_an_existing_workdir_unchanged(tmp_path):
  cfg = tiny(tmp_path)
  workdir = tmp_path / "run"
  with ckpt_lib.Checkpoints(workdir / "checkpoints", async_save=False) as c:
    c.save(1, {"not_a_train_state": np.zeros(3, np.float32)})  # another run's checkpoint
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  with pytest.raises(ckpt_lib.CheckpointError, match="does not match the train state"):
    loop.train_and_evaluate(cfg, str(workdir))
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
  assert not any(n.startswith("events.out") for n in os.listdir(workdir))
