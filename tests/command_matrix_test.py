"""Every console command as a user types it: the INSTALLED `vidtok-*` scripts, run as
subprocesses with JAX's default settings (not the suite's exact-numerics conftest), on tiny
models of the KL and FSQ families, causal v1.0, non-causal and v1.1.

One module fixture runs the whole matrix (tests/command_matrix.py schedules it, two commands at a
time). The main variants (KL and FSQ causal v1.0) get the full chain on the model they train:

    vidtok-train (2 steps) -> the same command again (resumes: nothing left to train)
      -> vidtok-eval --workdir
      -> vidtok-reconstruct --workdir --input --save_tokens
           -> vidtok-reconstruct --torch_checkpoint (the converted file) --tokens
      -> [params taken out of the workdir as a bare Flax tree, what `to-flax` writes]
           -> vidtok-convert to-torch -> .safetensors -> vidtok-convert to-flax -> folder
           -> vidtok-tokenize --checkpoint (that folder) -> vidtok-tokenize --decode

The non-causal and v1.1 variants (random weights in an official-layout .safetensors) get
`vidtok-eval` and `vidtok-reconstruct`; `vidtok-check-data` runs once. Each command also gets one
bad input, which must end in exactly one `error:` line on stderr. The converter is checked with
.safetensors only: it needs no PyTorch that way (the `.ckpt` reader is covered in convert_test).

Flags stay at their defaults except where a case needs one: `--size=32` (the defaults are
256x256), `--nofvd --lpips_net=none` for eval (FVD's I3D at 224x224 and LPIPS-VGG cost ~1 CPU
minute per run; eval_test runs them) and, for training, 2 steps without the LPIPS term and
validation (covered by train_loop_test / train_step_test; each adds a compile of ~30 s).
"""

import json
import pathlib
import re
import shutil

import av
import numpy as np
import pytest
from command_matrix import Case, Matrix, scripts_dir
from conftest import SHARED, random_params

CLIP = SHARED / "data" / "videos" / "train" / "imageio_realshort.mp4"  # 320x240, 36 frames, 30 fps
MAIN = {"kl": "kl_causal_488_4chn", "fsq": "fsq_causal_488_4096"}
VARIANTS = ("kl_noncausal_488_4chn", "fsq_noncausal_488_262144", "kl_causal_488_4chn_v1_1",
            "fsq_causal_488_32768_v1_1")
# Eval on these, reconstruct on the others: each family, causality and version crosses both.
EVAL_ONLY = ("kl_noncausal_488_4chn", "fsq_causal_488_32768_v1_1")
SIZE, STEPS = 32, 2
ERROR_LINE = re.compile(r"^(vidtok-[a-z-]+: )?error: ")


def tiny_config(variant):
  from vidtok_jax.train.configs import get_config

  return get_config(variant + ",tiny")


def config_flag(variant):
  return f"--config=configs/vidtok.py:{variant},tiny"  # outside a checkout: the bundled copy


def convert_flags(variant):
  """`vidtok-convert`'s `--config` + the tiny model's overrides, in the scripts' spelling."""
  m = tiny_config(variant).model
  return ["--config", f"vidtok_{variant}", f"--config.model.ch={m.ch}",
          f"--config.model.ch_mult={tuple(m.ch_mult)}",
          f"--config.model.num_res_blocks={m.num_res_blocks}"]


def latent_shape(variant, windows):
  """(windows, latent frames, H/8, W/8) of `windows` default windows (17 causal, 16 not)."""
  m = tiny_config(variant).model
  frames = 1 + 16 // m.time_downsample_factor if m.causal else 16 // m.time_downsample_factor
  return (windows, frames, SIZE // 8, SIZE // 8)


def write_safetensors(variant, path, seed):
  """Random tiny weights under the official key names (what a user downloads, shrunk)."""
  import vidtok_jax
  from vidtok_jax.weights import save_safetensors, state_dict_from_params

  params = random_params(vidtok_jax.abstract_params(tiny_config(variant).model), seed=seed)
  save_safetensors(state_dict_from_params(params), str(path))


def export_flax(workdir, variant, out):
  """The trained params as a bare Flax tree (the format `to-flax` writes, `to-torch` reads)."""
  import orbax.checkpoint as ocp

  from vidtok_jax.weights.load import load_params as load_init_params

  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out, load_init_params(str(workdir), tiny_config(variant)))
  ckptr.wait_until_finished()
  ckptr.close()


def read_video(path):
  with av.open(str(path)) as c:
    return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def train_cmd(t, fam):
  return ["vidtok-train", config_flag(MAIN[fam]), f"--workdir={t / ('w_' + fam)}",
          f"--config.data.dir={t / 'videos'}", f"--config.total_steps={STEPS}",
          "--config.loss.perceptual_weight=0", "--config.eval_every=0",
          "--config.sample_every=0"]


def matrix_cases(t):
  """Every case of the matrix: name -> Case (argv, dependencies, preparation)."""
  clips, clip = t / "clips", t / "clips" / CLIP.name
  cases = {}
  for fam, variant in MAIN.items():
    # exported: the bare tree taken out of the workdir; <st>_flax: what to-flax writes back
    w, flax, st = t / f"w_{fam}", t / f"{fam}_exported", t / f"{fam}.safetensors"
    model = [config_flag(variant), f"--workdir={w}"]
    # Each family's TFDS build in its own folder (two trains build at once); never in ~.
    env = {"VIDTOK_TFDS_DIR": str(t / f"tfds_{fam}")}
    cases[f"train_{fam}"] = Case(train_cmd(t, fam), env=env)
    cases[f"resume_{fam}"] = Case(train_cmd(t, fam), env=env, after=[f"train_{fam}"])
    cases[f"eval_{fam}"] = Case(["vidtok-eval", *model, f"--data_dir={clips}", f"--size={SIZE}",
                                 "--nofvd", "--lpips_net=none"], after=[f"train_{fam}"])
    cases[f"recon_{fam}"] = Case(["vidtok-reconstruct", *model, f"--input={clip}",
                                  f"--size={SIZE}", f"--output_dir={t / ('recon_' + fam)}",
                                  "--save_tokens"], after=[f"train_{fam}"])
    # to-torch reads any weights source: the KL case a train workdir as `vidtok-train` left it,
    # the FSQ case the bare tree that `to-flax` writes.
    source, prep = (w, None) if fam == "kl" else (
        flax, lambda w=w, v=variant, f=flax: export_flax(w, v, f))
    cases[f"to_torch_{fam}"] = Case(
        ["vidtok-convert", "to-torch", str(source), *convert_flags(variant), "--out", str(st)],
        after=[f"train_{fam}"], prepare=prep)
    cases[f"to_flax_{fam}"] = Case(["vidtok-convert", "to-flax", str(st), *convert_flags(variant)],
                                   after=[f"to_torch_{fam}"])  # default --out: <file>_flax
    cases[f"recon_tokens_{fam}"] = Case(
        ["vidtok-reconstruct", config_flag(variant), f"--torch_checkpoint={st}",
         f"--tokens={t / ('recon_' + fam) / (CLIP.stem + '_tokens.npz')}",
         f"--output_dir={t / ('recon_' + fam)}"], after=[f"recon_{fam}", f"to_torch_{fam}"])
    back = [config_flag(variant), f"--checkpoint={t / (fam + '_flax')}"]
    cases[f"tokenize_{fam}"] = Case(["vidtok-tokenize", *back, f"--data_dir={clips}",
                                     f"--size={SIZE}", f"--out={t / ('tok_' + fam)}"],
                                    after=[f"to_flax_{fam}"])
    cases[f"decode_{fam}"] = Case(["vidtok-tokenize", *back, f"--decode={t / ('tok_' + fam)}"],
                                  after=[f"tokenize_{fam}"])  # default --output: decoded.mp4
  for i, variant in enumerate(VARIANTS):
    st = t / f"{variant}.safetensors"
    model = [config_flag(variant), f"--torch_checkpoint={st}"]
    prep = lambda v=variant, p=st, s=i: write_safetensors(v, p, s)
    if variant in EVAL_ONLY:  # each variant crosses one inference command (CI time)
      cases[f"eval_{variant}"] = Case(["vidtok-eval", *model, f"--data_dir={clips}",
                                       f"--size={SIZE}", "--nofvd", "--lpips_net=none"],
                                      prepare=prep)
    else:
      cases[f"recon_{variant}"] = Case(
          ["vidtok-reconstruct", *model, f"--input={clip}", f"--size={SIZE}",
           f"--output_dir={t / ('recon_' + variant)}", "--save_tokens"], prepare=prep)
  cases["check_data"] = Case(["vidtok-check-data", "--dir", str(t / "videos")])
  # One bad input per command.
  cases["bad_train"] = Case(["vidtok-train", config_flag("kl_causal_488_4chm"),
                             f"--workdir={t / 'w_bad'}", f"--config.data.dir={t / 'videos'}"])
  cases["bad_eval"] = Case(["vidtok-eval", config_flag(MAIN["fsq"]), f"--workdir={t / 'w_kl'}",
                            f"--data_dir={clips}", f"--size={SIZE}"], after=["train_kl"])
  cases["bad_recon"] = Case(["vidtok-reconstruct", config_flag(MAIN["kl"]),
                             f"--workdir={t / 'w_kl'}", f"--input={clips / 'zz_broken.mp4'}",
                             f"--output_dir={t / 'recon_bad'}"], after=["train_kl"])
  cases["bad_tokenize"] = Case(["vidtok-tokenize", config_flag(MAIN["kl"]),
                                f"--workdir={t / 'w_kl'}", f"--decode={clips}"],
                               after=["train_kl"])
  cases["bad_convert"] = Case(["vidtok-convert", "to-torch", str(t / "w_kl"),
                               *convert_flags(MAIN["fsq"]), "--out", str(t / "bad.safetensors")],
                              after=["train_kl"])
  cases["bad_check_data"] = Case(["vidtok-check-data", "--dir", str(t / "nope")])
  return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  if not CLIP.exists():
    pytest.skip(f"shared clip {CLIP} not found (needs ../shared beside the repo)")
  if not (scripts_dir() / "vidtok-train").exists():
    pytest.skip(f"console scripts not installed next to the interpreter in {scripts_dir()} "
                "(`pip install -e .`)")
  t = tmp_path_factory.mktemp("matrix")
  for split in ("train", "val"):  # a train/ + val/ folder: the builder's split layout
    (t / "videos" / split).mkdir(parents=True)
    shutil.copy(CLIP, t / "videos" / split / CLIP.name)
  (t / "clips").mkdir()
  shutil.copy(CLIP, t / "clips" / CLIP.name)
  (t / "clips" / "zz_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
  matrix = Matrix(matrix_cases(t), t / "runs")
  matrix.run()
  return t, matrix


def assert_one_error(p, *needles, code=None):
  """Failed with exactly one `error:` line on stderr (naming `needles`) and no traceback."""
  assert p.returncode != 0 and (code is None or p.returncode == code), p.report()
  errors = [ln for ln in p.stderr.splitlines() if ERROR_LINE.match(ln)]
  assert len(errors) == 1, p.report()
  for n in needles:
    assert n in errors[0], (n, errors[0])
  assert "Traceback" not in p.stderr, p.report()


@pytest.mark.parametrize("fam", sorted(MAIN))
def test_train_then_the_same_command_resumes(runs, fam):
  t, m = runs
  p = m.ok(f"train_{fam}")
  assert f"step {STEPS}/{STEPS}" in p.stderr and "compiled the train step" in p.stderr
  assert sorted(d.name for d in (t / f"w_{fam}" / "checkpoints").iterdir()) == [str(STEPS)]
  assert list((t / f"w_{fam}").glob("events.out.tfevents.*"))
  assert list((t / f"tfds_{fam}").iterdir())  # built where VIDTOK_TFDS_DIR says
  r = m.ok(f"resume_{fam}")
  assert f"resumed from the checkpoint of step {STEPS}" in r.stderr
  assert "nothing to train" in r.stderr and "compiled the train step" not in r.stderr
  assert sorted(d.name for d in (t / f"w_{fam}" / "checkpoints").iterdir()) == [str(STEPS)]


def check_eval(t, m, name, variant, step):
  p = m.ok(name)
  res = json.loads((m.cwd(name) / "results.json").read_text())  # the default --output
  assert [pathlib.Path(v["path"]).name for v in res["videos"]] == [CLIP.name]
  assert [pathlib.Path(s["path"]).name for s in res["skipped"]] == ["zz_broken.mp4"]
  assert np.isfinite(res["psnr"]) and -1 <= res["ssim"] <= 1
  assert res["lpips"] is None and res["fvd"] is None
  proto = res["protocol"]
  causal = tiny_config(variant).model.causal
  assert proto["variant"] == f"vidtok_{variant}" and proto["resolution"] == [SIZE, SIZE]
  assert proto["num_frames"] == (17 if causal else 16) and proto["sample_fps"] == 30.0
  assert proto["num_videos"] == 1 and proto["num_skipped"] == 1
  assert proto["checkpoint_step"] == step
  v = res["videos"][0]
  assert v["frames"] == 36 and v["windows"] == 3  # 36 frames at 30 fps, the last window padded
  assert "ALL (frame-weighted)" in p.stdout and CLIP.name in p.stdout
  if variant.startswith("fsq"):  # the rate figures (default --rate), printed and written
    assert res["rate"]["codebook_size"] == int(np.prod(tiny_config(variant).model.levels))
    assert "rate: codebook" in p.stdout
  else:
    assert "rate" not in res


@pytest.mark.parametrize("fam", sorted(MAIN))
def test_eval_of_a_trained_workdir(runs, fam):
  t, m = runs
  check_eval(t, m, f"eval_{fam}", MAIN[fam], STEPS)
  res = json.loads((m.cwd(f"eval_{fam}") / "results.json").read_text())
  assert res["protocol"]["checkpoint_kind"] == "workdir"


def check_recon(t, m, name, variant, out):
  p = m.ok(name)
  psnr = json.loads((out / f"{CLIP.stem}_psnr.json").read_text())
  causal = tiny_config(variant).model.causal
  window = 17 if causal else 16
  assert psnr["num_windows"] == 2 and psnr["num_frames"] == window
  assert psnr["dropped_frames"] == 36 - 2 * window and len(psnr["psnr"]) == 2 * window
  assert np.isfinite(psnr["mean"]) and f"mean PSNR {psnr['mean']:.2f} dB" in p.stdout
  recon = read_video(out / f"{CLIP.stem}_recon.mp4")
  side = read_video(out / f"{CLIP.stem}_side_by_side.mp4")  # input | reconstruction
  assert recon.shape == (2 * window, SIZE, SIZE, 3)
  assert side.shape == (2 * window, SIZE, 2 * SIZE, 3)
  assert (out / f"{CLIP.stem}_psnr.png").stat().st_size > 0
  with np.load(out / f"{CLIP.stem}_tokens.npz") as z:
    if variant.startswith("fsq"):
      assert z["indices"].shape == latent_shape(variant, 2) and z["indices"].dtype == np.int32
    else:
      zc = tiny_config(variant).model.z_channels
      assert z["latents"].shape == (*latent_shape(variant, 2), zc)
    assert str(z["variant"]) == f"vidtok_{variant}"


@pytest.mark.parametrize("fam", sorted(MAIN))
def test_reconstruct_video_then_its_tokens(runs, fam):
  t, m = runs
  out = t / f"recon_{fam}"
  check_recon(t, m, f"recon_{fam}", MAIN[fam], out)
  p = m.ok(f"recon_tokens_{fam}")
  decoded = read_video(out / f"{CLIP.stem}_decoded.mp4")
  assert decoded.shape == (34, SIZE, SIZE, 3)  # 2 windows of 17
  assert "decoded 2 window(s) into 34 frames" in p.stdout
  # FSQ: the same indices give the same frames (up to the video codec); KL decodes posterior
  # means where the --input run decoded a sample, so only the shape is compared there.
  if fam == "fsq":
    recon = read_video(out / f"{CLIP.stem}_recon.mp4")
    assert np.mean(np.abs(recon.astype(float) - decoded)) < 2.0


@pytest.mark.parametrize("fam", sorted(MAIN))
def test_convert_to_torch_and_back_is_bitwise(runs, fam):
  from safetensors.numpy import load_file

  from vidtok_jax.weights.load import load_params as load_init_params

  t, m = runs
  p = m.ok(f"to_torch_{fam}")
  state = load_file(str(t / f"{fam}.safetensors"))
  assert f"wrote {len(state)} keys" in p.stdout
  assert all(k.startswith(("encoder.", "decoder.", "regularizer.")) for k in state), list(state)
  q = m.ok(f"to_flax_{fam}")
  assert f"converted {len(state)} keys" in q.stdout
  cfg = tiny_config(MAIN[fam])
  trained = load_init_params(str(t / f"w_{fam}"), cfg)
  back = load_init_params(str(t / f"{fam}_flax"), cfg)
  import jax

  leaves = jax.tree_util.tree_leaves_with_path
  assert [k for k, _ in leaves(trained)] == [k for k, _ in leaves(back)]
  for (k, a), (_, b) in zip(leaves(trained), leaves(back)):
    assert np.array_equal(a, b), jax.tree_util.keystr(k)


@pytest.mark.parametrize("fam", sorted(MAIN))
def test_tokenize_then_decode(runs, fam):
  from vidtok_jax.data.tokens import TokenDataset

  t, m = runs
  p = m.ok(f"tokenize_{fam}")
  out = t / f"tok_{fam}"
  assert f"1 records from 1 of 2 videos (1 skipped) in 1 shards -> {out / 'manifest.json'}" in (
      p.stdout)
  assert "skipped zz_broken.mp4: truncated" in p.stdout
  ds = TokenDataset(str(out))
  rec, manifest = ds[0], ds.manifest
  ds.close()
  # The tiny config's 8 fps: 36 frames at 30 fps -> 9 frames, one (padded) window of 17.
  assert manifest["protocol"]["size"] == [SIZE, SIZE] and manifest["protocol"]["num_frames"] == 17
  if fam == "fsq":
    assert rec["tokens"].shape == latent_shape(MAIN[fam], 1)[1:]
    assert "codebook" in p.stdout and manifest["rate"]["tokens"] == rec["tokens"].size
  else:
    assert rec["latent"].shape == (*latent_shape(MAIN[fam], 1)[1:], 4)
  q = m.ok(f"decode_{fam}")
  video = read_video(m.cwd(f"decode_{fam}") / "decoded.mp4")
  assert video.shape == (9, SIZE, SIZE, 3)  # the padding is not written back
  assert "record 0 (imageio_realshort.mp4, window 0): 9 frames" in q.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_commands_on_every_variant(runs, variant):
  t, m = runs
  if variant in EVAL_ONLY:
    check_eval(t, m, f"eval_{variant}", variant, None)
    res = json.loads((m.cwd(f"eval_{variant}") / "results.json").read_text())
    assert res["protocol"]["checkpoint_kind"] == "torch_checkpoint"
  else:
    check_recon(t, m, f"recon_{variant}", variant, t / f"recon_{variant}")


def test_check_data(runs):
  t, m = runs
  p = m.ok("check_data")
  summary = json.loads(p.stdout.strip().splitlines()[-1])
  assert summary["files"] == 2 and summary["usable"] == 2 and summary["skipped"] == []
  assert summary["train_videos"] == 1 and summary["validation_videos"] == 1
  assert summary["clips_per_s"] > 0 and summary["short_videos"] == [f"train/{CLIP.name}"]


BAD = {  # case -> (what the error line names, exit status)
    "bad_train": (("kl_causal_488_4chm",), None),  # a misspelt variant
    "bad_eval": (("w_kl", "do not match"), 1),  # a KL workdir for an FSQ config
    "bad_recon": (("zz_broken.mp4", "cannot be opened"), 1),
    "bad_tokenize": (("not a finished tokenization folder",), 1),
    "bad_convert": (("w_kl", "do not match"), 1),  # a KL workdir for an FSQ config
    "bad_check_data": (("nope", "is not a directory"), 1),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_error_line(runs, name):
  t, m = runs
  needles, code = BAD[name]
  assert_one_error(m.done(name), *needles, code=code)
  assert not (t / "w_bad").exists() and not (t / "recon_bad").exists()  # nothing left behind
  if name == "bad_check_data":  # its JSON summary line says so too
    assert json.loads(m.done(name).stdout.splitlines()[-1])["error"]
