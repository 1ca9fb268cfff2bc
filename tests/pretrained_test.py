"""`vidtok_jax.from_pretrained`: hub resolution, offline hub cache, conversion cache, errors.

No network: each test builds a hub cache in huggingface_hub's own layout under a temporary
HF_HOME (`models--microsoft--VidTok/{blobs,refs,snapshots}`) and runs with HF_HUB_OFFLINE=1 or
`local_files_only=True`. The end-to-end test runs in a subprocess where `import torch` fails.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import ckpt_writer
import numpy as np
import pytest
from conftest import REPO

import vidtok_jax
from vidtok_jax.weights import hub as pretrained
from vidtok_jax.weights import state_dict_from_params
from random_weights import random_params
from vidtok_jax.models.autoencoder import abstract_params

NAME, OVERRIDES = "fsq_causal_488_262144", dict(ch=16)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def official_state_dict(name=NAME, **overrides):
  """A checkpoint's state_dict for variant `name` (random weights, official keys and layouts)."""
  cfg = vidtok_jax.load_config(f"vidtok_{name}", **overrides)
  state_dict = state_dict_from_params(random_params(abstract_params(cfg), seed=3))
  return cfg, {**state_dict, "loss.logvar": np.zeros((), np.float32)}


def write_hub_cache(hf_home, filename, payload: bytes):
  """Puts `payload` into the hub cache under HF_HOME as `microsoft/VidTok/<filename>` at main."""
  repo = hf_home / "hub" / "models--microsoft--VidTok"
  blob = hashlib.sha256(payload).hexdigest()
  (repo / "blobs").mkdir(parents=True, exist_ok=True)
  (repo / "blobs" / blob).write_bytes(payload)
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / "main").write_text(COMMIT)
  link = repo / "snapshots" / COMMIT / filename
  link.parent.mkdir(parents=True, exist_ok=True)
  link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
  return repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  """(HF_HOME, cfg, state_dict) with the official file of NAME in its hub cache."""
  cfg, state_dict = official_state_dict(**OVERRIDES)
  tmp = tmp_path_factory.mktemp("hub")
  ckpt = tmp / "written.ckpt"
  ckpt_writer.save({"state_dict": state_dict, "epoch": 7, "global_step": 1000}, ckpt)
  write_hub_cache(tmp / "hf", pretrained.hub_filename(NAME), ckpt.read_bytes())
  return tmp / "hf", cfg, state_dict


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def assert_params_equal(got, want):
  got, want = flat(got), flat(want)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("name, filename", [
    ("fsq_causal_488_262144", "checkpoints/vidtok_fsq_causal_488_262144.ckpt"),
    ("vidtok_kl_causal_488_4chn", "checkpoints/vidtok_kl_causal_488_4chn.ckpt"),
    ("kl_causal_488_16chn_v1_1", "checkpoints/vidtok_v1_1/vidtok_kl_causal_488_16chn_v1_1.ckpt"),
])
def test_hub_filename(name, filename):
  assert pretrained.hub_filename(name) == filename


def test_unknown_variant_lists_known_ones():
  with pytest.raises(ValueError, match="unknown VidTok variant 'kl_causal_999'.*fsq_causal_488_262144"):
    vidtok_jax.from_pretrained("kl_causal_999", local_files_only=True)


BLOCK_TORCH = """
import sys

class _NoTorch:  # `import torch` (and any torch.*) fails, as in a venv without PyTorch
  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch.") or name.startswith("lightning"):
      raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, _NoTorch())
"""


def test_offline_without_torch_and_cached_conversion(hub, tmp_path):
  hf_home, cfg, state_dict = hub
  script = BLOCK_TORCH + textwrap.dedent(f"""
      import json, numpy as np, vidtok_jax
      from vidtok_jax.weights import keys, torch_zip

      model, params = vidtok_jax.from_pretrained({NAME!r}, ch=16)
      np.savez({str(tmp_path / "first.npz")!r}, **{{"/".join(map(str, (p.key for p in path))): x
          for path, x in __import__("jax").tree_util.tree_leaves_with_path(params)}})
      def refuse(*a, **k):
        raise AssertionError("the second call converted again")
      keys.params_from_state_dict = torch_zip.load = refuse
      model2, params2 = vidtok_jax.from_pretrained("vidtok_" + {NAME!r}, ch=16)
      same = all(bool((np.asarray(a) == np.asarray(b)).all()) for a, b in zip(
          __import__("jax").tree.leaves(params), __import__("jax").tree.leaves(params2)))
      print(json.dumps(dict(torch="torch" in sys.modules, same=same, name=model.config.name,
                            ch=model2.config.ch)))
      """)
  env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  env.pop("HF_HUB_CACHE", None)
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report == dict(torch=False, same=True, name=f"vidtok_{NAME}", ch=16)
  # The first call said what it converted and where it cached it; nothing was downloaded.
  assert "converting" in proc.stderr and "cached the converted params" in proc.stderr
  assert "downloading" not in proc.stderr
  saved = np.load(tmp_path / "first.npz")
  want = flat(vidtok_jax.params_from_torch(state_dict, cfg))
  assert sorted(saved.files) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(saved[k], want[k], err_msg=k)
  cached = list((hf_home / "hub" / "models--microsoft--VidTok" / "vidtok_jax").iterdir())
  assert len(cached) == 1 and cached[0].suffix == ".safetensors"


def test_local_files_and_config_overrides(hub, tmp_path):
  hf_home, cfg, state_dict = hub
  cache_dir = hf_home / "hub"
  model, params = vidtok_jax.from_pretrained(NAME, cache_dir=cache_dir, local_files_only=True,
                                             ch=16)
  want = vidtok_jax.params_from_torch(state_dict, cfg)
  assert_params_equal(params, want)
  # A local file: the variant comes from the file name (or `variant=`).
  local = tmp_path / f"vidtok_{NAME}.ckpt"
  ckpt_writer.save({"state_dict": state_dict}, local)
  assert_params_equal(vidtok_jax.from_pretrained(local, ch=16)[1], want)
  other = tmp_path / "weights.ckpt"
  ckpt_writer.save(state_dict, other)
  with pytest.raises(ValueError, match="cannot tell the VidTok variant.*variant="):
    vidtok_jax.from_pretrained(other, ch=16)
  assert_params_equal(vidtok_jax.from_pretrained(other, variant=NAME, ch=16)[1], want)


def test_misfit_names_key_and_shapes(hub):
  hf_home, _, _ = hub
  with pytest.raises(ValueError) as e:
    vidtok_jax.from_pretrained(NAME, cache_dir=hf_home / "hub", local_files_only=True, ch=32)
  # e.g. "encoder.conv_in.conv.weight: torch shape (16, 3, 3, 3, 3), expected (32, 3, 3, 3, 3)"
  assert "encoder.conv_in" in str(e.value) and "(16," in str(e.value) and "(32," in str(e.value)


def test_offline_with_nothing_cached_says_how_to_fetch(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    vidtok_jax.from_pretrained("kl_causal_488_4chn", cache_dir=tmp_path, local_files_only=True)
  text = str(e.value)
  assert "not in the Hugging Face cache" in text and "local_files_only" in text
  assert "hf download microsoft/VidTok checkpoints/vidtok_kl_causal_488_4chn.ckpt" in text


def test_init_from_hf(hub, monkeypatch):
  from huggingface_hub import constants
  from ml_collections import ConfigDict

  from vidtok_jax.weights.load import load_params as load_init_params

  hf_home, cfg, state_dict = hub
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  config = ConfigDict({"model": cfg.to_dict(), "train": {"dtype": "float32"}})
  params = load_init_params(f"hf:{NAME}", config)
  assert_params_equal(params, vidtok_jax.params_from_torch(state_dict, cfg))
  with pytest.raises(ValueError, match="use_ema"):
    load_init_params(f"hf:{NAME}", config, use_ema=True)


@pytest.mark.parametrize("script", ["eval.py", "reconstruct.py"])
def test_clis_take_pretrained(script):
  proc = subprocess.run([sys.executable, script, "--helpfull"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert "--pretrained" in proc.stdout + proc.stderr


def test_weights_source():
  from vidtok_jax.cli import flags as cli_flags

  assert cli_flags.weights_source("pretrained", "kl_causal_488_4chn") == "hf:kl_causal_488_4chn"
  assert cli_flags.weights_source("torch_checkpoint", "x.ckpt") == "x.ckpt"


def test_hf_hub_offline_with_nothing_cached(tmp_path):
  script = ("import vidtok_jax\ntry:\n  vidtok_jax.from_pretrained('kl_causal_488_4chn')\n"
            "except FileNotFoundError as e:\n  print('ERROR', e)\n")
  env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  env.pop("HF_HUB_CACHE", None)
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert "ERROR" in proc.stdout, proc.stdout + proc.stderr
  assert "HF_HUB_OFFLINE=1" in proc.stdout and "hf download microsoft/VidTok" in proc.stdout
  assert not (tmp_path / "hf" / "hub" / "models--microsoft--VidTok" / "blobs").exists()
