"""The torch-free `.ckpt` reader (vidtok_jax/weights/torch_zip.py) against `torch.load`.

torch (and lightning) write the files here; the reader itself never imports torch (checked in
pretrained_test.py, where torch is made unimportable).
"""

import logging
import os
import pathlib
import shlex
import sys

import numpy as np
import pytest

from vidtok_jax.weights import load_state_dict, torch_zip

torch = pytest.importorskip("torch", reason="torch writes the test files")


def as_numpy(tensor):
  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  return tensor.numpy()


def assert_same(got, want_tensors):
  assert sorted(got) == sorted(want_tensors)
  for key, tensor in want_tensors.items():
    want = as_numpy(tensor)
    assert got[key].dtype == want.dtype, key
    assert got[key].shape == want.shape, key
    np.testing.assert_array_equal(got[key], want, err_msg=key)


def every_dtype():
  g = torch.Generator().manual_seed(0)
  base = torch.randn(3, 4, 5, generator=g)
  return {
      "f32": base, "f16": base.half(), "bf16": base.bfloat16(), "f64": base.double(),
      "i64": torch.randint(-2**40, 2**40, (6,), generator=g),
      "i32": torch.randint(-2**30, 2**30, (2, 3), generator=g, dtype=torch.int32),
      "i16": torch.arange(-5, 5, dtype=torch.int16), "i8": torch.arange(-5, 5, dtype=torch.int8),
      "u8": torch.arange(0, 250, 25, dtype=torch.uint8), "bool": base[0] > 0,
      "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
      "param": torch.nn.Parameter(base[1].clone()),
  }


def views_and_shared():
  """Strided views and tensors sharing one storage (each saved once by torch, at an offset)."""
  x = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
  h = torch.arange(24, dtype=torch.float32).half()
  return {"x": x, "transposed": x.transpose(0, 2), "stepped": x[:, ::2, 1::2],
          "offset": x[1:, 2], "flat_view": x.view(-1)[7:19], "expanded": x[0, 0].expand(3, 5),
          "h": h, "h_view": h[6:].view(3, 6)[:, ::3], "bf_view": x.bfloat16()[2].t()}


@pytest.mark.parametrize("make", [every_dtype, views_and_shared])
def test_equals_torch_load(tmp_path, make):
  tensors = make()
  path = tmp_path / "model.pt"
  torch.save(tensors, path)
  want = torch.load(path, weights_only=True)
  assert_same(torch_zip.read_state_dict(path), want)
  assert_same(load_state_dict(path), want)
  # A Lightning-style file: the state_dict entry is returned, the rest skipped.
  ckpt = tmp_path / "model.ckpt"
  torch.save({"state_dict": tensors, "epoch": 2, "optimizer_states": [{"step": torch.ones(1)}]},
             ckpt)
  assert_same(load_state_dict(ckpt), want)


def test_shared_storage_is_read_once(tmp_path, monkeypatch):
  path = tmp_path / "model.pt"
  torch.save(views_and_shared(), path)
  reads = []
  real_read = torch_zip.zipfile.ZipFile.read
  monkeypatch.setattr(torch_zip.zipfile.ZipFile, "read",
                      lambda self, name, *a: reads.append(name) or real_read(self, name, *a))
  torch_zip.read_state_dict(path)
  storages = [r for r in reads if "/data/" in r]
  assert len(storages) == len(set(storages)) == 3  # x, h and the bf16 copy


def test_lightning_checkpoint(tmp_path, caplog):
  pl = pytest.importorskip("lightning.pytorch", reason="lightning not installed")

  class Tiny(pl.LightningModule):

    def __init__(self, width=4, lr=0.1, data_root=pathlib.Path("clips")):
      super().__init__()
      # Hyper-parameters pickled as non-builtin objects (here a PosixPath), as in official ckpts.
      self.save_hyperparameters()
      self.net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.LayerNorm(width))
      self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def training_step(self, batch, _):
      return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
      opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
      return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

  data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)),
                                     batch_size=4)
  trainer = pl.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, accelerator="cpu",
                       enable_progress_bar=False, enable_model_summary=False,
                       callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "cb")])
  trainer.fit(Tiny(), data)
  path = tmp_path / "lightning.ckpt"
  trainer.save_checkpoint(path)
  full = torch.load(path, weights_only=False)
  assert {"optimizer_states", "lr_schedulers", "callbacks", "loops"} <= set(full)
  with caplog.at_level(logging.WARNING):
    got = load_state_dict(path)
  assert_same(got, full["state_dict"])
  warned = [r.getMessage() for r in caplog.records if "outside state_dict" in r.getMessage()]
  assert len(warned) == 1 and "pathlib" in warned[0], caplog.text


class Planted:
  """Pickles as a call of `os.system(command)` (what a malicious checkpoint holds)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_planted_code_never_runs(tmp_path, caplog):
  marker = tmp_path / "ran"
  touch = f"touch {shlex.quote(str(marker))}"
  weights = {"a.weight": torch.ones(2, 2)}
  inside, outside = tmp_path / "inside.ckpt", tmp_path / "outside.ckpt"
  torch.save({"state_dict": {**weights, "evil": Planted(touch)}}, inside)
  torch.save({"state_dict": weights, "callbacks": {"cb": Planted(touch)}}, outside)
  with pytest.raises(ValueError, match=r"'evil' is a (posix|os|nt)\.system"):
    load_state_dict(inside)
  with caplog.at_level(logging.WARNING):
    assert_same(load_state_dict(outside), weights)
  assert "system" in caplog.text
  assert not marker.exists()
  # The planted pickle is real: an unrestricted load runs it.
  torch.load(outside, weights_only=False)
  assert marker.exists()


def test_corrupt_archive_is_named(tmp_path):
  path = tmp_path / "model.pt"
  torch.save({"w": torch.ones(3)}, path)
  blob = path.read_bytes()
  broken = tmp_path / "broken.pt"
  # Drop the storage record: the zip stays valid, the tensor's data is missing.
  import zipfile
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
    for item in src.infolist():
      if "/data/" not in item.filename:
        dst.writestr(item, src.read(item.filename))
  assert blob
  with pytest.raises(ValueError, match="broken.pt.*data/0 is missing"):
    load_state_dict(broken)


def test_no_torch_import():
  assert "torch" not in torch_zip.__dict__
  src = open(torch_zip.__file__).read()
  assert "import torch" not in src and sys.modules.get("vidtok_jax.weights.torch_zip")
