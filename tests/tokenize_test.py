"""Dataset tokenization (`vidtok_jax.tokenize`, `vidtok_jax.data.tokens`) on real clips with tiny
random models: records equal the public `encode`, statistics and rate figures equal direct
computations, resume after SIGKILL / SIGTERM and a 2-process split give byte-identical files."""

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARED, random_params

import vidtok_jax
from vidtok_jax.evaluation import evaluator as evaluation
from vidtok_jax.data import read_video_list, sampling
from vidtok_jax.data import tokens as token_data
from vidtok_jax.metrics import rate
from vidtok_jax.tokenize import JobMismatchError, TokenizeJob, folder_items, fsq_codes, token_dtype
from vidtok_jax.tokenize.decode import decode_record

REPO = pathlib.Path(__file__).resolve().parent.parent
VIDEOS = SHARED / "data" / "videos"
_SPEC = importlib.util.spec_from_file_location("vidtok_configs", REPO / "configs" / "vidtok.py")
configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(configs)
# Small real clips (decoding at full size dominates the run time); the broken file must be skipped.
CLIPS = {"a.mp4": "val/vidtok_example.mp4", "b.mp4": "train/imageio_realshort.mp4",
         "c.mp4": "train/trackanything_test-sample2.mp4"}
FPS, SIZE, FRAMES = 4.0, 32, 9
FSQ, KL = "fsq_causal_488_4096", "kl_causal_488_4chn"


def tiny(variant):
  cfg = configs.get_config(variant + ",tiny")
  cfg.data.size, cfg.data.num_frames, cfg.data.eval_sample_fps = SIZE, FRAMES, FPS
  return cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  if not VIDEOS.is_dir():
    pytest.skip(f"shared clips {VIDEOS} not found (needs ../shared beside the repo)")
  root = tmp_path_factory.mktemp("tok_videos")
  for name, src in CLIPS.items():
    shutil.copy(VIDEOS / src, root / name)
  (root / "zz_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200)
  return root


def items(folder):
  paths, _ = read_video_list(folder)
  return folder_items(paths, folder, FPS)


@pytest.fixture(scope="module")
def fsq_params():
  return random_params(vidtok_jax.abstract_params(tiny(FSQ).model), seed=3)


def fsq_job(folder, params, out, **kw):
  return TokenizeJob(tiny(FSQ), params, out, videos_per_shard=1,
                     source={"data_dir": str(folder), "csv": None}, **kw)


@pytest.fixture(scope="module")
def fsq_out(folder, fsq_params, tmp_path_factory):
  out = tmp_path_factory.mktemp("tok_fsq") / "out"
  res = fsq_job(folder, fsq_params, out).run(items(folder), progress=False)
  assert res["status"] == "done"
  return out


@pytest.fixture(scope="module")
def kl_out(folder, tmp_path_factory):
  cfg = tiny(KL)
  params = random_params(vidtok_jax.abstract_params(cfg.model), seed=5)
  out = tmp_path_factory.mktemp("tok_kl") / "out"
  res = TokenizeJob(cfg, params, out, store="mean_logvar", videos_per_shard=2,
                    batch_size=2).run(items(folder), progress=False)
  assert res["status"] == "done"
  return cfg, params, out


def windows_of(folder, name):
  raw, _ = next(evaluation.folder_videos([str(folder / name)], FPS)).load()
  x01 = sampling.resize_short_side_and_center_crop(raw, SIZE)
  return evaluation.windows(x01, FRAMES, "clips", True)[0]


def files(out):
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).iterdir())
          if not p.name.startswith(".")}


def test_fsq_records_equal_public_encode_and_ids_round_trip_to_codes(folder, fsq_out, fsq_params):
  ds = token_data.TokenDataset(fsq_out)
  cfg = tiny(FSQ)
  model = vidtok_jax.VidTok(cfg.model)
  recs = [ds[i] for i in range(len(ds))]
  assert {r["path"] for r in recs} == set(CLIPS)  # nothing from the broken file
  for name in CLIPS:
    mine = sorted((r for r in recs if r["path"] == name), key=lambda r: r["window"])
    clips = windows_of(folder, name)
    z, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
        fsq_params, jnp.asarray(clips) * 2 - 1)
    assert len(mine) == len(clips)
    ids = np.stack([r["tokens"] for r in mine])
    assert ids.dtype == np.uint16  # 4096 codes
    np.testing.assert_array_equal(ids, np.asarray(aux["indices"]))
    np.testing.assert_array_equal(fsq_codes(ids, cfg.model.levels), np.asarray(z))
    assert mine[0]["first_frame"] == 0 and mine[-1]["input_frames"] == FRAMES
    interval = mine[0]["frame_interval"]
    assert [r["first_frame"] for r in mine] == [k * FRAMES * interval for k in range(len(mine))]
  # The FSQ statistics are those of the codes, equal to a direct float64 computation.
  codes = np.concatenate([fsq_codes(r["tokens"], cfg.model.levels).reshape(-1, 4) for r in recs])
  stats = json.loads((fsq_out / "stats.json").read_text())
  np.testing.assert_allclose(stats["mean"], codes.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats["std"], codes.astype(np.float64).std(0), rtol=1e-12)
  assert stats["num_values"] == codes.size


def test_decode_back_equals_decode_indices(fsq_out, fsq_params):
  ds = token_data.TokenDataset(fsq_out)
  rec = ds[0]
  video = decode_record(tiny(FSQ), fsq_params, rec, ds.manifest)
  model = vidtok_jax.VidTok(tiny(FSQ).model)
  y = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.decode_indices))(
      fsq_params, jnp.asarray(rec["tokens"][None].astype(np.int32)))
  np.testing.assert_allclose(video, (np.clip(np.asarray(y[0]), -1, 1) + 1) / 2, atol=2e-5)
  other = random_params(vidtok_jax.abstract_params(tiny(FSQ).model), seed=9)
  with pytest.raises(ValueError, match="not the ones that wrote"):
    decode_record(tiny(FSQ), other, rec, ds.manifest)


def test_bad_videos_skipped_with_reason_and_counted(fsq_out):
  m = json.loads((fsq_out / "manifest.json").read_text())
  assert [(s["path"], s["reason"]) for s in m["skipped"]] == [("zz_broken.mp4", "truncated")]
  assert m["counts"]["videos"] == 4 and m["counts"]["videos_encoded"] == 3
  assert m["counts"]["records"] == sum(s["records"] for s in m["shards"]) > 0
  assert m["shards"][-1]["records"] == 0  # the broken video's shard exists, empty
  for s in m["shards"]:
    assert s["sha256"] == hashlib.sha256((fsq_out / s["name"]).read_bytes()).hexdigest()


def test_rate_figures_and_lossless_entropy_coding(fsq_out):
  m = json.loads((fsq_out / "manifest.json").read_text())
  ds = token_data.TokenDataset(fsq_out)
  ids = np.concatenate([ds[i]["tokens"].reshape(-1) for i in range(len(ds))]).astype(np.int64)
  fig = m["rate"]
  counts = np.bincount(ids, minlength=4096)
  p = counts[counts > 0] / len(ids)
  assert fig["tokens"] == len(ids) and fig["codes_used"] == len(p)
  np.testing.assert_allclose(fig["entropy_bits_per_token"], -(p * np.log2(p)).sum(), rtol=1e-12)
  pixels = m["counts"]["records"] * FRAMES * SIZE**2
  assert fig["raw_bpp"] == pytest.approx(len(ids) * 12 / pixels)
  assert 0 < fig["coded_bpp"] <= fig["raw_bpp"]
  words = rate.entropy_code(ids, counts)
  np.testing.assert_array_equal(rate.entropy_decode(words, counts, len(ids)), ids)
  assert 32 * len(words) <= len(ids) * 12


def test_eval_rate_figures_match_the_tokenized_dataset(folder, fsq_params, fsq_out):
  fig = TokenizeJob(tiny(FSQ), fsq_params, None).rate_of(items(folder))  # what eval.py reports
  want = json.loads((fsq_out / "manifest.json").read_text())["rate"]
  for k in ("tokens", "pixels", "codes_used", "entropy_bits_per_token", "raw_bpp", "entropy_bpp"):
    assert fig[k] == pytest.approx(want[k], rel=1e-12), k
  assert fig["entropy_bpp"] <= fig["coded_bpp"] <= fig["raw_bpp"]


def test_rate_module_round_trip_on_a_skewed_stream():
  ids = np.random.default_rng(0).zipf(1.5, 20000) % 262144
  fig = rate.dataset_rate(ids, 262144, 20000 * 16)  # verifies the decode itself
  assert fig["coded_bits"] <= 20000 * 18
  h = fig["entropy_bits_per_token"]
  assert h <= fig["coded_bits_per_token"] < h + 0.05
  assert rate.dataset_rate(np.full(7, 3), 16, 70)["coded_bits"] == 0  # one code: no bits
  with pytest.raises(ValueError, match="token ids must be in"):
    rate.token_counts(np.array([16]), 16)
  assert [token_dtype(k) for k in (256, 257, 65536, 262144)] == [np.uint8, np.uint16, np.uint16,
                                                                 np.uint32]


def test_kl_latents_logvar_and_stats(folder, kl_out):
  cfg, params, out = kl_out
  ds = token_data.TokenDataset(out)
  model = vidtok_jax.VidTok(cfg.model)
  recs = [ds[i] for i in range(len(ds))]
  for name in ("a.mp4", "b.mp4"):
    mine = sorted((r for r in recs if r["path"] == name), key=lambda r: r["window"])
    clips = windows_of(folder, name)
    _, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
        params, jnp.asarray(clips) * 2 - 1)
    np.testing.assert_allclose(np.stack([r["latent"] for r in mine]), aux["mean"], atol=2e-5)
    np.testing.assert_allclose(np.stack([r["logvar"] for r in mine]), aux["logvar"], atol=2e-5)
  lat = np.concatenate([r["latent"].reshape(-1, 4) for r in recs]).astype(np.float64)
  stats = json.loads((out / "stats.json").read_text())
  np.testing.assert_allclose(stats["mean"], lat.mean(0), rtol=1e-10)
  np.testing.assert_allclose(stats["std"], lat.std(0), rtol=1e-10)
  assert stats["num_values"] == lat.size


def test_kl_bfloat16_records_are_the_float32_latents_rounded(folder, kl_out, tmp_path):
  cfg, params, out = kl_out
  one = [i for i in items(folder) if i.path == "b.mp4"]
  TokenizeJob(cfg, params, tmp_path / "bf16", store="mean_logvar", dtype="bfloat16",
              batch_size=2).run(one, progress=False)
  got = token_data.TokenDataset(tmp_path / "bf16")[0]
  want = next(r for r in (token_data.TokenDataset(out)[i]
                          for i in range(len(token_data.TokenDataset(out))))
              if r["path"] == "b.mp4")
  assert got["latent"].dtype.name == "bfloat16" and got["logvar"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(got["latent"].astype(np.float32),
                                want["latent"].astype(got["latent"].dtype).astype(np.float32))


def test_reader_batches_resume_by_step_split_by_host_and_normalise(kl_out):
  _, _, out = kl_out
  n = len(token_data.TokenDataset(out))
  full = list(token_data.iterate_batches(out, 2, seed=1, process_index=0, process_count=1,
                                         num_steps=n))
  later = list(token_data.iterate_batches(out, 2, seed=1, start_step=3, process_index=0,
                                          process_count=1, num_steps=n - 3))
  for a, b in zip(full[3:], later):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["latent"], b["latent"])
  epoch = np.concatenate([b["index"] for b in full[:n // 2]])
  assert len(set(epoch.tolist())) == len(epoch)  # an epoch is a permutation
  for p in range(2):
    host = next(token_data.iterate_batches(out, 2, seed=1, start_step=5, process_index=p,
                                           process_count=2))
    np.testing.assert_array_equal(host["index"], full[5]["index"][p:p + 1])
  other = list(token_data.iterate_batches(out, 2, seed=2, process_index=0, process_count=1,
                                          num_steps=n // 2))
  assert not all(np.array_equal(a["index"], b["index"]) for a, b in zip(full, other))
  normed = np.concatenate([b["latent"].reshape(-1, 4) for b in token_data.iterate_batches(
      out, 1, seed=0, process_index=0, process_count=1, normalize=True, num_steps=n)])
  np.testing.assert_allclose(normed.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(normed.std(0), 1, atol=1e-5)


def test_two_processes_write_disjoint_shards_equal_to_one_process(folder, fsq_params, fsq_out,
                                                                  tmp_path):
  out = tmp_path / "two"
  r1 = fsq_job(folder, fsq_params, out, process_index=1, process_count=2).run(
      items(folder), progress=False)
  assert r1["status"] == "partial" and r1["written"] == [1, 3]
  assert not (out / "manifest.json").exists()
  r0 = fsq_job(folder, fsq_params, out, process_index=0, process_count=2).run(
      items(folder), progress=False)
  assert r0["status"] == "done" and r0["written"] == [0, 2]
  assert files(out) == files(fsq_out)


def test_changed_model_protocol_or_videos_are_refused(folder, fsq_params, fsq_out):
  other = random_params(vidtok_jax.abstract_params(tiny(FSQ).model), seed=4)
  with pytest.raises(JobMismatchError, match="model.params_sha256"):
    fsq_job(folder, other, fsq_out).run(items(folder), progress=False)
  cfg = tiny(FSQ)
  cfg.data.size = 64
  params = random_params(vidtok_jax.abstract_params(cfg.model), seed=3)
  with pytest.raises(JobMismatchError, match="protocol.size"):
    TokenizeJob(cfg, params, fsq_out, videos_per_shard=1,
                source={"data_dir": str(folder), "csv": None}).run(items(folder), progress=False)
  with pytest.raises(JobMismatchError, match="videos.count"):
    fsq_job(folder, fsq_params, fsq_out).run(items(folder)[:2], progress=False)


class _TermAfterFirst:
  """A VideoItem whose load sends SIGTERM to this process (as a preemption would)."""

  def __init__(self, item):
    self.path, self._item = item.path, item

  def load(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return self._item.load()


def test_sigterm_finishes_the_shard_then_a_rerun_completes_identically(folder, fsq_params,
                                                                       fsq_out, tmp_path):
  out = tmp_path / "term"
  its = items(folder)
  its[0] = _TermAfterFirst(its[0])
  res = fsq_job(folder, fsq_params, out).run(its, progress=False, handle_sigterm=True)
  assert res["status"] == "interrupted"
  assert sorted(p.name for p in out.glob("*.json")) == ["job.json",
                                                         "train-00000-of-00004.array_record.json"]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
  res = fsq_job(folder, fsq_params, out).run(items(folder), progress=False)
  assert res["status"] == "done" and res["written"] == [1, 2, 3]
  assert files(out) == files(fsq_out)


def test_cli_killed_mid_way_then_rerun_gives_byte_identical_output(folder, fsq_params, fsq_out,
                                                                   tmp_path):
  import orbax.checkpoint as ocp

  ckpt = tmp_path / "params"
  c = ocp.StandardCheckpointer()
  c.save(ckpt, jax.tree.map(np.asarray, fsq_params))
  c.wait_until_finished()
  out = tmp_path / "killed"
  cmd = [sys.executable, "-m", "vidtok_jax.tokenize",
         f"--config={REPO}/configs/vidtok.py:{FSQ},tiny",
         f"--checkpoint={ckpt}", f"--data_dir={folder}", f"--size={SIZE}",
         f"--num_frames={FRAMES}", f"--sample_fps={FPS}", f"--out={out}",
         "--videos_per_shard=1", "--noprogress"]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  first = out / "train-00000-of-00004.array_record.json"
  deadline = time.monotonic() + 600
  while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  proc.kill()
  _, err = proc.communicate()
  assert first.exists(), err.decode()[-3000:]
  done = sorted(p.name for p in out.glob("train-*.json"))
  assert len(done) < 4 and not (out / "manifest.json").exists()  # killed mid-way
  res = fsq_job(folder, fsq_params, out).run(items(folder), progress=False)
  assert res["status"] == "done" and len(res["written"]) == 4 - len(done)
  assert files(out) == files(fsq_out)
  assert not list(out.glob(".*"))  # no temporary file left behind


def test_reader_works_without_tensorflow(fsq_out):
  code = ("import sys; sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None\n"
          "from vidtok_jax.data.tokens import iterate_batches\n"
          f"b = next(iterate_batches({str(fsq_out)!r}, 2, process_index=0, process_count=1))\n"
          "print(b['tokens'].shape, b['tokens'].dtype)")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.split() == ["(2,", "3,", "4,", "4)", "uint16"], p.stdout


def test_batch_size_none_is_the_evaluation_default_and_bad_ones_are_refused(fsq_params):
  """eval.py's rate pass hands its resolved batch size; None (the flag's default) means the
  evaluation's default rather than a TypeError deep in the constructor."""
  assert TokenizeJob(tiny(FSQ), fsq_params, None, batch_size=None).batch_size == \
      evaluation.default_batch_size()
  with pytest.raises(TypeError, match="batch_size must be an int"):
    TokenizeJob(tiny(FSQ), fsq_params, None, batch_size="2")
  with pytest.raises(ValueError, match="must be >= 1"):
    TokenizeJob(tiny(FSQ), fsq_params, None, batch_size=0)
