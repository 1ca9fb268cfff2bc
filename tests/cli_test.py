"""What a user sees from the commands: one-line errors naming the problem (no usage dump, no
traceback), refusal to replace outputs, `--help` listing the main flags, the bundled configs.

Each case is one short subprocess of the real script that fails before any model work.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
TINY = "--config=configs/vidtok.py:kl_causal_488_4chn,tiny"


def assert_one_line_error(p, *needles, code=None):
  """The command failed with `prog: error: ...` containing `needles`: no flag list, no trace."""
  assert p.returncode != 0 and (code is None or p.returncode == code), (p.returncode, p.stderr)
  errors = [ln for ln in p.stderr.splitlines() if ": error: " in ln]
  assert len(errors) == 1, p.stderr[-3000:]
  for n in needles:
    assert n in errors[0], errors[0]
  assert "Traceback" not in p.stderr and "flags:" not in p.stderr, p.stderr[-3000:]


def write_clip(path):
  import av

  with av.open(str(path), "w") as c:
    s = c.add_stream("libx264", rate=10)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    for i in range(20):
      f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
      f.pts = i
      c.mux(s.encode(f))
    c.mux(s.encode())
  return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every case below, started at once (each is a few seconds of imports), then collected."""
  from vidtok_jax import reconstruct as rc

  t = tmp_path_factory.mktemp("cli")
  clip = write_clip((t / "videos").mkdir() or t / "videos" / "clip.mp4")
  (t / "empty").mkdir()
  (t / "results.json").write_text("{}")
  bad = t / "model.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # cut inside its header
  tokens = t / "fsq_tokens.npz"
  rc.save_tokens(tokens, np.zeros((1, 3, 4, 4), np.int32), variant="vidtok_fsq_causal_488_4096",
                 fps=10, size=(32, 32), num_frames=9, num_input_frames=9)
  (t / "out").mkdir()
  (t / "out" / "clip_psnr.json").write_text("mine")
  (t / "elsewhere").mkdir()
  ckpt, data, out = f"--checkpoint={t}", f"--data_dir={t / 'videos'}", f"--output={t / 'r.json'}"
  cases = {
      "help": ("eval.py", "--help"),
      "no_dir": ("eval.py", TINY, ckpt, f"--data_dir={t / 'nope'}", out),
      "empty_dir": ("eval.py", TINY, ckpt, f"--data_dir={t / 'empty'}", out),
      "eval_exists": ("eval.py", TINY, ckpt, data, f"--output={t / 'results.json'}"),
      "truncated": ("eval.py", TINY, f"--torch_checkpoint={bad}", data, out, "--nofvd"),
      "height63": ("reconstruct.py", TINY, ckpt, f"--input={clip}", f"--output_dir={t / 'o'}",
                   "--height=63"),
      "tokens": ("reconstruct.py", TINY, ckpt, f"--tokens={tokens}", f"--output_dir={t / 'o'}"),
      "recon_exists": ("reconstruct.py", TINY, ckpt, f"--input={clip}", f"--output_dir={t / 'out'}",
                       "--size=32", "--concat_input=false"),
      "train_truncated": ("train.py", TINY, f"--workdir={t / 'w1'}", f"--config.data.dir={t}",
                          f"--config.train.init_from={bad}", "--config.loss.perceptual_weight=0"),
      "train_empty": ("train.py", TINY, f"--workdir={t / 'w2'}",
                      f"--config.data.dir={t / 'empty'}", f"--config.data.tfds_data_dir={t}",
                      "--config.loss.perceptual_weight=0"),
      # Outside a checkout: the config comes from the package; the error is about the data.
      "elsewhere": ("eval.py", TINY, ckpt, f"--data_dir={t / 'nope'}", out),
  }
  procs = {name: subprocess.Popen([sys.executable, str(REPO / argv[0]), *map(str, argv[1:])],
                                  cwd=t / "elsewhere" if name == "elsewhere" else REPO, env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, argv in cases.items()}
  done = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  return t, done


def test_eval_help_lists_its_main_flags(runs):
  p = runs[1]["help"]  # (absl exits 1 after --help)
  for flag in ("--config", "--workdir", "--checkpoint", "--torch_checkpoint", "--data_dir",
               "--[no]fvd", "--force"):
    assert flag in p.stdout, flag
  assert "(default: '30.0')" in p.stdout.split("  --sample_fps:")[1][:300]  # official protocol


def test_non_positive_settings_are_usage_errors():
  from absl import app

  from vidtok_jax.commands import check_positive

  for name, value in (("size", 0), ("sample_fps", 0.0), ("batch_size", 0), ("num_frames", -1)):
    with pytest.raises(app.UsageError, match=f"--{name} must be > 0, got {value}"):
      check_positive(**{name: value})
  check_positive(size=1, num_frames=None)  # None: not given


def test_eval_data_dir_errors(runs):
  t, r = runs
  assert_one_line_error(r["no_dir"], f"--data_dir {t / 'nope'} does not exist", code=2)
  assert_one_line_error(r["empty_dir"], f"no videos found under {t / 'empty'}")


def test_outputs_are_never_replaced_without_force(runs):
  t, r = runs
  assert_one_line_error(r["eval_exists"], f"{t / 'results.json'} exists", "--force")
  assert (t / "results.json").read_text() == "{}"
  assert_one_line_error(r["recon_exists"], "clip_psnr.json exists", "--force")
  assert (t / "out" / "clip_psnr.json").read_text() == "mine"


def test_truncated_checkpoint_is_one_line(runs):
  t, r = runs
  assert_one_line_error(r["truncated"], str(t / "model.safetensors"))
  assert not (t / "r.json").exists()


def test_train_errors_are_one_line(runs):
  t, r = runs
  # A broken init_from: one line naming the file, and the new workdir is not left behind.
  assert_one_line_error(r["train_truncated"], str(t / "model.safetensors"))
  assert not (t / "w1").exists()
  # An empty video folder says so (not TFDS's --manual_dir assertion).
  assert_one_line_error(r["train_empty"], f"{t / 'empty'}: no video files found")


def test_reconstruct_errors_are_one_line(runs):
  r = runs[1]
  assert_one_line_error(r["height63"], "multiples of", "got 63x256")
  assert_one_line_error(r["tokens"], "holds tokens of vidtok_fsq_causal_488_4096")


def test_bundled_configs_outside_a_checkout(runs, tmp_path):
  """`--config=configs/vidtok.py:...` resolves to the packaged configs where that file is
  missing (an installed package run from another folder)."""
  from vidtok_jax.commands import bundled_config_path, resolve_config_arg

  assert_one_line_error(runs[1]["elsewhere"], "does not exist")
  argv = ["prog", "--config=configs/vidtok.py:kl_causal_488_4chn,tiny", "--x=1"]
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)
    out = resolve_config_arg(argv)
  finally:
    os.chdir(cwd)
  assert out == ["prog", f"--config={bundled_config_path()}:kl_causal_488_4chn,tiny", "--x=1"]
  os.chdir(REPO)
  try:
    assert resolve_config_arg(argv) == argv  # in a checkout: the file itself
  finally:
    os.chdir(cwd)


def test_lossy_crop_warning():
  from vidtok_jax.reconstruct import lossy_crop

  assert lossy_crop(720, 1280, (256, 256)) is None  # 16:9 to a square keeps 56%
  assert "keeps 14%" in lossy_crop(720, 1280, (256, 64))
  assert "zero padding" in lossy_crop(720, 1280, (64, 512))


def test_console_scripts_are_declared():
  import importlib.util
  import tomllib

  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert set(scripts) >= {"vidtok-train", "vidtok-eval", "vidtok-reconstruct", "vidtok-convert"}
  for target in scripts.values():  # (not imported: each command defines its own absl flags)
    module, func = target.split(":")
    source = pathlib.Path(importlib.util.find_spec(module).origin).read_text()
    assert f"def {func}(" in source, target


def test_one_override_spelling_for_the_argparse_commands():
  from vidtok_jax.bench import parse_args
  from vidtok_jax.commands import model_overrides_as_set

  assert model_overrides_as_set(["x", "--config.model.ch=32", "--set", "z_channels=8"]) == [
      "x", "--set", "ch=32", "--set", "z_channels=8"]
  with pytest.raises(SystemExit, match="only model fields"):
    model_overrides_as_set(["--config.data.size=8"])
  assert parse_args(["--config.model.ch=8", "--set", "num_res_blocks=1"]).overrides == {
      "ch": 8, "num_res_blocks": 1}
