"""`reconstruct.py` / `vidtok_jax.inference.reconstruct` on tiny models with random weights.

Two CLI runs cover the command end to end (a `convert to-flax`-style orbax params folder via
`--checkpoint`): KL `--input` with `--save_tokens` on a real clip, and FSQ `--tokens` on a tokens
file written by the library. They run as subprocesses started by the module fixture, so their
start-up and compiles overlap with the in-process library computations they are checked
against. The mp4 files are lossy, so exact comparisons go through the PSNR JSON (computed from the
float reconstruction) and the tokens; the videos are checked for frame count, size, fps and
per-frame closeness (luma) to the library's uint8 frames.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SHARED, random_params

import vidtok_jax
from vidtok_jax.inference import reconstruct as rc
from vidtok_jax.data import VideoDecodeError, decode
from vidtok_jax.metrics.psnr import psnr

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent
_SPEC = importlib.util.spec_from_file_location("vidtok_configs", REPO / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)

KL, FSQ = "kl_causal_488_4chn,tiny", "fsq_causal_488_4096,tiny"
CLIP = SHARED / "data" / "videos" / "val" / "vidtok_example.mp4"  # 136 frames, 30 fps, 256^2
SIZE, SAMPLE_FPS, T = 32, 10.0, 17  # every 3rd frame -> 46 frames -> 2 windows, 12 dropped
N_IN, N_OUT = 46, 34
# The CLI processes get the suite's numerics (conftest) and, like the library calls here, batch
# 1 and the CPU, so their PSNRs and tokens match ours bit for bit (another batch size changes
# the convs' rounding by ~1e-6).
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
           JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=str(REPO))


class Setup:
  """A tiny config, model, random params and their orbax folder."""

  def __init__(self, arg, folder, seed):
    self.arg = arg
    self.config = configs.get_config(arg)
    self.variant = self.config.variant
    self.model = vidtok_jax.VidTok(self.config.model)
    self.params = random_params(vidtok_jax.abstract_params(self.config.model), seed)
    self.ckpt = folder / "params"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(self.ckpt, self.params)
    ckptr.wait_until_finished()
    ckptr.close()


def cli(setup, out_dir, *args):
  return subprocess.Popen(
      [sys.executable, str(REPO / "reconstruct.py"), f"--config=configs/vidtok.py:{setup.arg}",
       f"--checkpoint={setup.ckpt}", f"--output_dir={out_dir}", *args],
      cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=240):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  if not CLIP.exists():
    pytest.skip(f"test clip {CLIP} not found (needs ../shared/data/videos/val beside the repo)")
  tmp = tmp_path_factory.mktemp("reconstruct")
  kl, fsq = Setup(KL, tmp / "kl", 0), Setup(FSQ, tmp / "fsq", 1)
  kl_proc = cli(kl, tmp / "kl_out", f"--input={CLIP}", f"--height={SIZE}", f"--width={SIZE}",
                f"--sample_fps={SAMPLE_FPS}", "--save_tokens")
  frames01, info = rc.load_video(CLIP, (SIZE, SIZE), SAMPLE_FPS)
  # The FSQ tokens the second CLI run decodes, from the library.
  with on_cpu():
    fsq_recon, fsq_idx = rc.reconstruct_video(fsq.model, fsq.params, frames01, T)
  tokens_path = tmp / "clip_tokens.npz"
  rc.save_tokens(tokens_path, fsq_idx, variant=fsq.variant, fps=SAMPLE_FPS, size=(SIZE, SIZE),
                 num_frames=T, num_input_frames=len(frames01), source=str(CLIP))
  fsq_proc = cli(fsq, tmp / "fsq_out", f"--tokens={tokens_path}")
  long_proc = cli(fsq, tmp / "long_out", f"--input={CLIP}", f"--height={SIZE}",
                  f"--width={SIZE}", f"--sample_fps={SAMPLE_FPS}", "--long", "--chunk_size=8",
                  "--save_tokens", "--concat_input=false")
  with on_cpu():
    kl_recon, kl_tokens = rc.reconstruct_video(kl.model, kl.params, frames01, T, seed=42)
  return dict(tmp=tmp, kl=kl, fsq=fsq, frames01=frames01, info=info, fsq_recon=fsq_recon,
              fsq_idx=fsq_idx, tokens_path=tokens_path, kl_recon=kl_recon, kl_tokens=kl_tokens,
              kl_cli=finish(kl_proc), fsq_cli=finish(fsq_proc), long_cli=finish(long_proc))


def luma_psnr(a_u8, b_u8) -> np.ndarray:
  """Per-frame PSNR (dB) of the BT.601 luma of two uint8 videos.

  H.264 yuv420p halves the chroma resolution, which costs noise-like random-weight
  reconstructions ~15 dB of RGB PSNR; luma is kept at full resolution (crf 18: ~37 dB here).
  The encoded bytes cannot be compared either: PyAV 18 + libx264 output varies from run to run
  within a process that has decoded other videos (seen at 32x32).
  """
  y = lambda v: np.asarray(v, np.float64) @ np.array([0.299, 0.587, 0.114])
  mse = np.mean((y(a_u8) - y(b_u8)) ** 2, axis=(1, 2))
  return -10.0 * np.log10(mse / 255.0**2 + 1e-10)


def on_cpu():
  """The CLI runs on CPU: so do the library calls it is compared with bit for bit."""
  return jax.default_device(jax.devices("cpu")[0])


def test_cli_reconstructs_video(runs):
  rc_, out, err = runs["kl_cli"]
  assert rc_ == 0, err[-3000:]
  assert "2 window(s) x 17 frames" in out and "mean PSNR" in out, out
  d = runs["tmp"] / "kl_out"
  names = sorted(p.name for p in d.iterdir())
  assert names == ["vidtok_example_psnr.json", "vidtok_example_psnr.png",
                   "vidtok_example_recon.mp4", "vidtok_example_side_by_side.mp4",
                   "vidtok_example_tokens.npz"]
  assert (d / "vidtok_example_psnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  frames01, recon = runs["frames01"], runs["kl_recon"]
  assert frames01.shape == (N_IN, SIZE, SIZE, 3) and runs["info"]["frame_interval"] == 3
  assert recon.shape == (N_OUT, SIZE, SIZE, 3)
  video, info = decode(d / "vidtok_example_recon.mp4")
  assert video.shape == (N_OUT, SIZE, SIZE, 3) and info.fps == pytest.approx(SAMPLE_FPS)
  sbs, _ = decode(d / "vidtok_example_side_by_side.mp4")
  assert sbs.shape == (N_OUT, SIZE, 2 * SIZE, 3)
  # H.264 is lossy: every written frame is close to the library's uint8 frame at its position
  # (frames of noise-like reconstructions are ~12 dB apart, so order and content are checked).
  recon_u8, input_u8 = rc.to_uint8(recon), rc.to_uint8(frames01[:N_OUT])
  assert luma_psnr(video, recon_u8).min() > 30.0
  assert luma_psnr(video, input_u8).max() < 20.0
  assert luma_psnr(sbs[:, :, :SIZE], input_u8).min() > 30.0
  assert luma_psnr(sbs[:, :, SIZE:], recon_u8).min() > 30.0
  assert luma_psnr(video[1:], recon_u8[:-1]).max() < 25.0  # one frame off would show

  # PSNR JSON: computed from the CLI's float reconstruction = ours (sampled latent, seed 42).
  rep = json.loads((d / "vidtok_example_psnr.json").read_text())
  expected = np.asarray(psnr(frames01[:N_OUT], recon), np.float64)
  np.testing.assert_allclose(rep["psnr"], expected, rtol=1e-6)
  assert np.ptp(expected) > 0.1  # per-frame values, not one number repeated
  assert rep["mean"] == pytest.approx(float(np.mean(rep["psnr"])), abs=1e-9)
  assert (rep["num_windows"], rep["num_frames"], rep["num_input_frames"],
          rep["dropped_frames"]) == (2, T, N_IN, N_IN - N_OUT)
  assert rep["variant"] == "vidtok_kl_causal_488_4chn" and rep["seed"] == 42

  # KL tokens: the posterior means (not the samples), with the metadata.
  tok = rc.load_tokens(d / "vidtok_example_tokens.npz", variant=runs["kl"].variant,
                       model_config=runs["kl"].model.config)
  assert tok["latents"].dtype == np.float32 and tok["latents"].shape == (2, 5, 4, 4, 4)
  np.testing.assert_allclose(tok["latents"], runs["kl_tokens"], atol=1e-6)
  assert (tok["fps"], tok["size"], tok["num_frames"], tok["num_input_frames"]) == (
      SAMPLE_FPS, (SIZE, SIZE), T, N_IN)
  assert "indices" not in tok


def test_long_video_is_streamed_whole(runs):
  """`--long`: every sampled frame (46, not 2 x 17) through 8-frame chunks, and its tokens
  file decodes back to the same video, by the CLI and by the library."""
  rc_, out, err = runs["long_cli"]
  assert rc_ == 0, err[-3000:]
  assert f"{N_IN} frames streamed" in out and "(0 tail frame(s) dropped)" in out, out
  d = runs["tmp"] / "long_out"
  fsq, frames01 = runs["fsq"], runs["frames01"]
  with on_cpu():
    recon, idx = rc.reconstruct_long(fsq.model.config, fsq.params, frames01, t_chunk_enc=8)
  assert recon.shape == frames01.shape and idx.shape[0] == 1
  rep = json.loads((d / "vidtok_example_psnr.json").read_text())
  assert rep["num_output_frames"] == N_IN and rep["streaming"]["t_chunk_enc"] == 8
  np.testing.assert_allclose(rep["psnr"], np.asarray(psnr(frames01, recon), np.float64),
                             rtol=1e-5)
  video, _ = decode(d / "vidtok_example_recon.mp4")
  assert video.shape == frames01.shape
  assert luma_psnr(video, rc.to_uint8(recon)).min() > 30.0
  # This v1.0 model streams exactly: the first 1 + 4k frames equal one whole-clip forward.
  n = 1 + 4 * ((N_IN - 1) // 4)
  _, whole, _ = fsq.model.apply({"params": fsq.params}, jnp.asarray(frames01[None, :n]) * 2 - 1)
  np.testing.assert_allclose(recon[:n], (np.clip(whole[0], -1, 1) + 1) / 2, atol=1e-5)
  tok = rc.load_tokens(d / "vidtok_example_tokens.npz", variant=fsq.variant,
                       model_config=fsq.model.config)
  np.testing.assert_array_equal(tok["indices"], idx)
  assert tok["long_video"] == 1 and tok["num_input_frames"] == N_IN
  with on_cpu():
    decoded = rc.decode_long_tokens(fsq.model.config, fsq.params, tok)
  np.testing.assert_allclose(decoded, recon, atol=1e-5)


def test_kl_sampling_is_seeded_per_window(runs):
  kl, frames01 = runs["kl"], runs["frames01"]
  # Two windows per call, a third in a padded call: the same samples for the first two as one
  # window per call (keys are per window, not per call).
  frames3 = np.concatenate([frames01, frames01[:3 * T - N_IN]])
  same, tokens = rc.reconstruct_video(kl.model, kl.params, frames3, T, seed=42, batch_size=2)
  assert same.shape == (3 * T, SIZE, SIZE, 3) and tokens.shape == (3, 5, 4, 4, 4)
  np.testing.assert_allclose(same[:N_OUT], runs["kl_recon"], atol=1e-5)
  np.testing.assert_allclose(tokens[:2], runs["kl_tokens"], atol=1e-5)
  other, tokens = rc.reconstruct_video(kl.model, kl.params, frames01, T, seed=7, batch_size=2)
  assert np.abs(other - runs["kl_recon"]).max() > 1e-2  # another seed: another sample ...
  np.testing.assert_allclose(tokens, runs["kl_tokens"], atol=1e-5)  # ... of the same posterior


def test_fsq_tokens_round_trip(runs):
  fsq, recon, idx = runs["fsq"], runs["fsq_recon"], runs["fsq_idx"]
  assert idx.dtype == np.int32 and idx.shape == (2, 5, 4, 4)
  assert 0 <= idx.min() and idx.max() < 4096 and len(np.unique(idx)) > 1
  tok = rc.load_tokens(runs["tokens_path"], variant=fsq.variant, model_config=fsq.model.config)
  np.testing.assert_array_equal(tok["indices"], idx)
  with on_cpu():
    decoded = rc.decode_tokens(fsq.model, fsq.params, tok)
  assert decoded.shape == recon.shape == (N_OUT, SIZE, SIZE, 3)
  np.testing.assert_allclose(decoded, recon, atol=1e-5)
  assert np.abs(rc.to_uint8(decoded).astype(int) - rc.to_uint8(recon)).max() <= 1

  rc_, out, err = runs["fsq_cli"]
  assert rc_ == 0, err[-3000:]
  assert "decoded 2 window(s) into 34 frames" in out, out
  path = runs["tmp"] / "fsq_out" / "clip_decoded.mp4"
  video, info = decode(path)
  assert video.shape == (N_OUT, SIZE, SIZE, 3) and info.fps == pytest.approx(SAMPLE_FPS)
  assert luma_psnr(video, rc.to_uint8(decoded)).min() > 30.0
  assert luma_psnr(video, rc.to_uint8(runs["frames01"][:N_OUT])).max() < 20.0  # not the input


def test_to_uint8_truncates_like_the_official_cast():
  x = np.array([0.0, 0.5, 0.999, 1.0, 0.0039, 0.0040], np.float32)
  np.testing.assert_array_equal(rc.to_uint8(x), [0, 127, 254, 255, 0, 1])  # not rounded
  y = np.random.default_rng(0).uniform(-1.5, 1.5, 1000).astype(np.float32)  # model output
  official = ((np.clip(y, -1, 1) + 1) / 2 * 255).astype(np.uint8)
  np.testing.assert_array_equal(rc.to_uint8((np.clip(y, -1, 1) + 1) / 2), official)


def test_split_windows_drops_the_tail():
  frames = np.arange(40)[:, None]
  w = rc.split_windows(frames, 17)
  assert w.shape == (2, 17, 1)
  np.testing.assert_array_equal(w.reshape(-1), np.arange(34))
  with pytest.raises(ValueError, match=r"has 10 sampled frame\(s\); one window needs 17"):
    rc.split_windows(frames[:10], 17)


def test_write_video_round_trips_frame_count(tmp_path):
  frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
  frames[:] = frames[:1]  # a still: H.264 keeps it close
  rc.write_video(tmp_path / "v.mp4", frames, 12.5)
  got, info = decode(tmp_path / "v.mp4")
  assert got.shape == frames.shape and info.fps == pytest.approx(12.5)
  with pytest.raises(ValueError, match="even sizes"):
    rc.write_video(tmp_path / "odd.mp4", frames[:, :15], 10)


def test_video_writer_appends_batches_and_never_leaves_half_a_file(tmp_path):
  frames = np.full((7, 16, 24, 3), 90, np.uint8)
  with rc.VideoWriter(tmp_path / "v.mp4", 16, 24, 10) as w:
    w.write(frames[:3])
    assert not (tmp_path / "v.mp4").exists()  # only under its temporary name until closed
    w.write(frames[3:])
    with pytest.raises(ValueError, match=r"uint8 frames \(T, 16, 24, 3\)"):
      w.write(frames[:, :8])
  got, info = decode(tmp_path / "v.mp4")
  assert got.shape == frames.shape and info.fps == pytest.approx(10)
  with pytest.raises(KeyError):  # an error while writing: nothing under the final name
    with rc.VideoWriter(tmp_path / "w.mp4", 16, 24, 10) as w:
      w.write(frames)
      raise KeyError("interrupted")
  assert os.listdir(tmp_path) == ["v.mp4"]


def test_frames_are_written_while_the_device_reconstructs(tmp_path, kl_setup):
  """run_video's windows path: windows arrive as a stream, each batch is encoded on a writer
  thread as it comes back (batch k+1 already dispatched); tokens and per-frame PSNR equal those
  of `reconstruct_windows`, the files hold every frame, and they are the same video as one whole
  write."""
  windows = np.random.default_rng(3).uniform(0, 1, (3, 9, 16, 16, 3)).astype(np.float32)
  seen = []
  with on_cpu():
    ref, ref_tok = rc.reconstruct_windows(kl_setup.model, kl_setup.params, windows, batch_size=2,
                                          on_batch=lambda lo, hi, r: seen.append((lo, hi)))
    out = {k: str(tmp_path / "o" / k) for k in ("recon.mp4", "side_by_side.mp4")}
    psnrs, tok = rc._reconstruct_writing(kl_setup.model, kl_setup.params, iter(windows), rc.SEED,
                                         2, False, out, True, 10.0)
  assert seen == [(0, 2), (2, 3)]
  np.testing.assert_array_equal(tok, ref_tok)
  np.testing.assert_array_equal(psnrs, rc.psnr_per_frame(windows.reshape(-1, 16, 16, 3),
                                                         ref.reshape(-1, 16, 16, 3)))
  rc.write_video(tmp_path / "whole.mp4", rc.to_uint8(ref.reshape(-1, 16, 16, 3)), 10.0)
  whole, _ = decode(tmp_path / "whole.mp4")
  got, info = decode(out["recon.mp4"])
  side, _ = decode(out["side_by_side.mp4"])
  assert got.shape == whole.shape == (27, 16, 16, 3) and side.shape == (27, 16, 32, 3)
  assert luma_psnr(got, whole).min() > 40  # lossy codec: same frames, near-identical video
  assert luma_psnr(side[:, :, 16:], whole).min() > 30
  # No window: nothing written, not even the folder.
  none = {k: str(tmp_path / "none" / k) for k in out}
  psnrs, tok = rc._reconstruct_writing(kl_setup.model, kl_setup.params, iter(()), rc.SEED, 2,
                                       False, none, True, 10.0)
  assert len(psnrs) == len(tok) == 0 and not (tmp_path / "none").exists()


@pytest.fixture(scope="module")
def kl_setup(tmp_path_factory):
  return Setup(KL, tmp_path_factory.mktemp("kl_errors"), 0)


def test_errors(tmp_path, kl_setup):
  kl = kl_setup
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"this is not a video" * 10)
  with pytest.raises(VideoDecodeError, match="broken.mp4") as e:
    rc.load_video(bad, (SIZE, SIZE))
  assert isinstance(e.value, ValueError) and e.value.reason == "not_a_video"

  short = tmp_path / "short.mp4"
  rc.write_video(short, np.full((8, SIZE, SIZE, 3), 128, np.uint8), 30)
  with pytest.raises(ValueError, match=r"short.mp4 .*has 8 sampled frame\(s\); one window needs "
                     r"17"):
    rc.run_video(kl.model, kl.params, short, tmp_path / "out", variant=kl.variant,
                 size=(SIZE, SIZE))
  assert not (tmp_path / "out").exists()

  with pytest.raises(ValueError, match="spatial factor 8, got 36x32"):
    rc.check_window(kl.model.config, T, 36, 32)
  with pytest.raises(ValueError, match=r"use num_frames = 1 \+ 4k"):
    rc.check_window(kl.model.config, 16, SIZE, SIZE)

  fsq_tokens = tmp_path / "fsq_tokens.npz"
  rc.save_tokens(fsq_tokens, np.zeros((1, 5, 4, 4), np.int32), variant="vidtok_fsq_causal_488_4096",
                 fps=10, size=(SIZE, SIZE), num_frames=T, num_input_frames=T)
  with pytest.raises(ValueError, match="holds tokens of vidtok_fsq_causal_488_4096, not of "
                     "vidtok_kl_causal_488_4chn"):
    rc.load_tokens(fsq_tokens, variant=kl.variant)
  with pytest.raises(ValueError, match="holds indices, but .* decodes latents"):
    rc.load_tokens(fsq_tokens, model_config=kl.model.config)
  partial = tmp_path / "partial.npz"
  np.savez(partial, latents=np.zeros((1, 5, 4, 4, 4), np.float32), variant=kl.variant)
  with pytest.raises(ValueError, match="missing key.*format, fps, size, num_frames"):
    rc.load_tokens(partial)
  wrong_shape = tmp_path / "wrong_tokens.npz"
  rc.save_tokens(wrong_shape, np.zeros((1, 5, 4, 4, 8), np.float32), variant=kl.variant,
                 fps=10, size=(SIZE, SIZE), num_frames=T, num_input_frames=T)
  with pytest.raises(ValueError, match=r"latents \(K, t, h, w, 4\)"):
    rc.load_tokens(wrong_shape, variant=kl.variant, model_config=kl.model.config)


def test_cli_reports_an_unreadable_video(tmp_path, kl_setup):
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"this is not a video" * 10)
  code, _, err = finish(cli(kl_setup, tmp_path / "out", f"--input={bad}", "--height=32",
                            "--width=32"))
  assert code != 0
  assert f"{bad}: not_a_video" in err, err[-2000:]
