"""The last step of a tokenize job: the shard sidecars of a folder merged into manifest.json and
stats.json (and, for FSQ models, the dataset's rate figures), in shard order, so the files do
not depend on how the work was split.

    manifest = finalize_dir("tokens/")   # None while shards are missing
"""

import json
import logging
import os
import shutil
import tempfile
from typing import Optional

import numpy as np
from etils import epath

from vidtok_jax.data import tokens as token_format
from vidtok_jax.metrics import rate as rate_lib
from vidtok_jax.tokenize.output import shard_name, write_json
from vidtok_jax.tokenize.stats import Moments

log = logging.getLogger("vidtok_jax.tokenize")


def finalize_dir(out, verify_rate: bool = True) -> Optional[dict]:
  """Merge the shard sidecars of `out` into manifest.json and stats.json (and the FSQ rate
  figures); None (nothing written) while shards are missing. The merge runs in shard order, so
  the files do not depend on how the work was split."""
  out = epath.Path(out)
  job = json.loads((out / "job.json").read_text())
  sides = _read_sidecars(out, job)
  if sides is None:
    return None
  moments = Moments.zeros(job["model"]["channels"])
  for s in sides:
    moments = moments.merge(Moments.from_json(s["moments"]))
  manifest = _manifest(job, sides)
  if job["model"]["regularizer"] == "fsq" and manifest["counts"]["records"]:
    manifest["rate"] = _rate(out, job, sides, verify_rate)
  write_json(out / "stats.json", _stats(job, moments))
  write_json(out / "manifest.json", manifest)
  return manifest


def _read_sidecars(out: epath.Path, job: dict) -> Optional[list]:
  """Every shard's sidecar in shard order; None (logged) while some are missing."""
  v = job["protocol"]["videos_per_shard"]
  m = -(-job["videos"]["count"] // v)
  names = [shard_name(job["protocol"]["split"], s, m) for s in range(m)]
  missing = [n for n in names if not (out / f"{n}.json").exists()]
  if missing:
    log.info("%d of %d shards not complete yet (e.g. %s): manifest not written", len(missing), m,
             missing[0])
    return None
  return [json.loads((out / f"{n}.json").read_text()) for n in names]


def _stats(job: dict, moments: Moments) -> dict:
  """stats.json: per-channel mean and std of the stored values."""
  return {"of": "FSQ codes" if job["model"]["regularizer"] == "fsq" else
          f"latent ({job['protocol']['store']}, stored {job['protocol']['dtype']})",
          "channels": job["model"]["channels"], "num_values": int(moments.n) * len(moments.mean),
          "values_per_channel": int(moments.n), "mean": moments.mean.tolist(),
          "std": np.sqrt(moments.m2 / max(moments.n, 1)).tolist(),
          "computed": "float64, exact pairwise merge of per-shard moments in shard order"}


def _manifest(job: dict, sides: list) -> dict:
  """manifest.json without the rate figures: the job, counts, skipped entries and shards."""
  count = job["videos"]["count"]
  skipped = list(job.get("skipped_inputs", []))
  for s in sides:
    skipped += s["skipped"]
  manifest = {k: job[k] for k in ("format", "model", "protocol", "videos")}
  manifest["source"] = job.get("source", {})
  encoded_videos = count - sum(1 for s in sides for _ in s["skipped"])
  manifest["counts"] = {"videos": count, "videos_encoded": encoded_videos,
                        "videos_skipped": count - encoded_videos,
                        "inputs_skipped": len(job.get("skipped_inputs", [])),
                        "records": sum(s["records"] for s in sides), "shards": len(sides)}
  manifest["skipped"] = skipped
  manifest["shards"] = [{k: s[k] for k in ("name", "records", "sha256", "bytes", "videos")}
                        for s in sides]
  return manifest


def _rate(out, job, sides, verify: bool) -> dict:
  """Rate figures over all shards: the order-0 model from the merged counts, each shard's ids
  ANS-coded with it (and decoded back when `verify`)."""
  k = job["model"]["codebook_size"]
  counts = np.zeros(k, np.int64)
  for s in sides:
    counts[np.asarray(s["token_counts"]["ids"], np.int64)] += np.asarray(
        s["token_counts"]["counts"], np.int64)
  bits = 0
  for s in sides:
    if not s["records"]:
      continue
    ids = _shard_ids(out, s["name"])
    words = rate_lib.entropy_code(ids, counts)
    if verify and not np.array_equal(rate_lib.entropy_decode(words, counts, len(ids)), ids):
      raise RuntimeError(f"{s['name']}: entropy-coding round trip failed")
    bits += 32 * len(words)
  fig = rate_lib.rate_figures(counts, k, sum(s["pixels"] for s in sides), coded_bits=bits)
  fig["coder"] = ("constriction 0.5 ANS (stack) coder, order-0 categorical model of the "
                  "dataset's ids, one stream per shard; model side information not included")
  return fig


def _shard_ids(out: epath.Path, name: str) -> np.ndarray:
  """All token ids of shard `name`, int64, in record order."""
  from array_record.python.array_record_module import ArrayRecordReader

  path, tmpdir = out / name, None
  if "://" in out.as_posix():  # the reader opens local files only
    tmpdir = tempfile.mkdtemp(prefix="vidtok_rate_")
    path = epath.Path(tmpdir) / name
    with (out / name).open("rb") as src, open(path, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
  r = ArrayRecordReader(os.fspath(path))
  ids = np.concatenate([token_format.decode_record(d)["tokens"].reshape(-1)
                        for d in r.read_all()]).astype(np.int64)
  r.close()
  if tmpdir:
    path.unlink()
    os.rmdir(tmpdir)
  return ids


__all__ = ["finalize_dir"]
