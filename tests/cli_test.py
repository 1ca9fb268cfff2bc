"""What a user sees from the commands: one-line errors naming the problem (no usage dump, no
traceback), refusal to replace outputs, `--help` listing the main flags, the bundled configs.

Each case is a real invocation of a command that fails before any model work; the cases of one
command share one process (tests/cli_runner.py), so a few jax imports cover them all.
"""

import json
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
  """Every case below: one process per command, all started at once, then collected."""
  from vidtok_jax.inference import reconstruct as rc

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
  here, elsewhere = str(REPO), str(t / "elsewhere")
  # One process per command (each start imports jax and TensorFlow), its cases run in turn.
  commands = {
      ("vidtok_jax.cli.eval", "eval.py"): {
          "help": ("--help",),
          "no_dir": (TINY, ckpt, f"--data_dir={t / 'nope'}", out),
          "empty_dir": (TINY, ckpt, f"--data_dir={t / 'empty'}", out),
          "eval_exists": (TINY, ckpt, data, f"--output={t / 'results.json'}"),
          "truncated": (TINY, f"--torch_checkpoint={bad}", data, out, "--nofvd"),
          "size0": (TINY, ckpt, data, out, "--size=0"),
          # Outside a checkout: the config comes from the package; the error is about the data.
          "elsewhere": (TINY, ckpt, f"--data_dir={t / 'nope'}", out),
      },
      ("vidtok_jax.cli.reconstruct", "reconstruct.py"): {
          "height63": (TINY, ckpt, f"--input={clip}", f"--output_dir={t / 'o'}", "--height=63"),
          "tokens": (TINY, ckpt, f"--tokens={tokens}", f"--output_dir={t / 'o'}"),
          "recon_exists": (TINY, ckpt, f"--input={clip}", f"--output_dir={t / 'out'}",
                           "--size=32", "--concat_input=false"),
      },
      ("vidtok_jax.cli.train", "train.py"): {
          "train_truncated": (TINY, f"--workdir={t / 'w1'}", f"--config.data.dir={t}",
                              f"--config.train.init_from={bad}",
                              "--config.loss.perceptual_weight=0"),
          "train_empty": (TINY, f"--workdir={t / 'w2'}", f"--config.data.dir={t / 'empty'}",
                          f"--config.data.tfds_data_dir={t}", "--config.loss.perceptual_weight=0"),
      },
      ("vidtok_jax.cli.tokenize", "vidtok_jax/cli/tokenize.py"): {
          "tok_no_dir": (TINY, ckpt, f"--data_dir={t / 'nope'}", f"--out={t / 'tok'}"),
          "tok_batch0": (TINY, ckpt, data, f"--out={t / 'tok'}", "--batch_size=0"),
          "tok_decode_exists": (TINY, ckpt, f"--decode={t / 'empty'}",
                                f"--output={t / 'results.json'}"),
      },
  }
  procs = []
  for (module, script), cases in commands.items():
    spec = {"module": module, "script": str(REPO / script),
            "cases": {name: {"argv": list(map(str, argv)),
                             "cwd": elsewhere if name == "elsewhere" else here}
                      for name, argv in cases.items()}}
    spec_path, result_path = t / f"{script.replace('/', '_')}.json", t / f"{module}.result.json"
    spec_path.write_text(json.dumps(spec))
    procs.append((result_path, subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "cli_runner.py"), str(spec_path), str(result_path)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
  done = {}
  for result_path, proc in procs:
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0 and result_path.exists(), stderr[-3000:]
    for name, r in json.loads(result_path.read_text()).items():
      done[name] = subprocess.CompletedProcess(name, r["returncode"], r["stdout"], r["stderr"])
  return t, done


def test_eval_help_lists_its_main_flags(runs):
  p = runs[1]["help"]  # (absl exits 1 after --help)
  for flag in ("--config", "--workdir", "--checkpoint", "--torch_checkpoint", "--data_dir",
               "--[no]fvd", "--force"):
    assert flag in p.stdout, flag
  assert "(default: '30.0')" in p.stdout.split("  --sample_fps:")[1][:300]  # official protocol


def test_non_positive_settings_are_usage_errors():
  from absl import app

  from vidtok_jax.cli import check_positive

  for name, value in (("size", 0), ("sample_fps", 0.0), ("batch_size", 0), ("num_frames", -1)):
    with pytest.raises(app.UsageError, match=f"--{name} must be > 0, got {value}"):
      check_positive(**{name: value})
  check_positive(size=1, num_frames=None)  # None: not given


def test_eval_data_dir_errors(runs):
  t, r = runs
  assert_one_line_error(r["no_dir"], f"--data_dir {t / 'nope'} does not exist", code=2)
  assert_one_line_error(r["empty_dir"], f"no videos found under {t / 'empty'}")
  assert_one_line_error(r["size0"], "--size must be > 0, got 0", code=2)


def test_tokenize_errors_are_one_line(runs):
  t, r = runs
  assert_one_line_error(r["tok_no_dir"], f"--data_dir {t / 'nope'} does not exist", code=2)
  assert_one_line_error(r["tok_batch0"], "--batch_size must be > 0, got 0", code=2)
  # --decode never replaces its --output without --force (checked before the weights load).
  assert_one_line_error(r["tok_decode_exists"], f"{t / 'results.json'} exists", "--force")
  assert (t / "results.json").read_text() == "{}"


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
  assert not (t / "w2").exists()  # nor by a run that found no videos


def test_reconstruct_errors_are_one_line(runs):
  r = runs[1]
  assert_one_line_error(r["height63"], "multiples of", "got 63x256")
  assert_one_line_error(r["tokens"], "holds tokens of vidtok_fsq_causal_488_4096")


def test_bundled_configs_outside_a_checkout(runs, tmp_path):
  """`--config=configs/vidtok.py:...` resolves to the packaged configs where that file is
  missing (an installed package run from another folder)."""
  from vidtok_jax.cli import bundled_config_path, resolve_config_arg

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
  from vidtok_jax.inference.reconstruct import lossy_crop

  assert lossy_crop(720, 1280, (256, 256)) is None  # 16:9 to a square keeps 56%
  assert "keeps 14%" in lossy_crop(720, 1280, (256, 64))
  assert "zero padding" in lossy_crop(720, 1280, (64, 512))


def test_console_scripts_are_declared():
  import importlib.util
  import tomllib

  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert set(scripts) >= {"vidtok-train", "vidtok-eval", "vidtok-reconstruct", "vidtok-convert",
                          "vidtok-tokenize"}
  for target in scripts.values():  # (not imported: each command defines its own absl flags)
    module, func = target.split(":")
    source = pathlib.Path(importlib.util.find_spec(module).origin).read_text()
    assert f"def {func}(" in source, target


def test_one_override_spelling_for_the_argparse_commands():
  from vidtok_jax.cli import model_overrides_as_set
  from vidtok_jax.planning.__main__ import parse_args

  assert model_overrides_as_set(["x", "--config.model.ch=32", "--set", "z_channels=8"]) == [
      "x", "--set", "ch=32", "--set", "z_channels=8"]
  with pytest.raises(SystemExit, match="only model fields"):
    model_overrides_as_set(["--config.data.size=8"])
  assert parse_args(["--config.model.ch=8", "--set", "num_res_blocks=1",
                     "--topology=cpu"]).overrides == {"ch": 8, "num_res_blocks": 1}
