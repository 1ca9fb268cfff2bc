"""Prints the max abs error of every whole-model reference output, through the public API.

  python tools/parity_report.py [--reference ../shared/reference]

Runs in float32 with exact matmuls; compares with the float64 reference (`out64/` where stored).
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import vidtok_jax

FIXTURES = {"causal_kl_488": "", "causal_kl_288": "", "causal_kl_444": "",
            "causal_kl_488_groupnorm": "", "noncausal_kl_488": "", "causal_fsq_488": "",
            "v11_causal_kl_488_long": "untiled/"}


def to_torch(a):
  a = np.asarray(a, np.float64)
  return np.moveaxis(a, -1, 1) if a.ndim == 5 else a


def report(reference: pathlib.Path):
  rows = []
  for name, pre in FIXTURES.items():
    d = np.load(reference / f"{name}.npz")
    meta = json.loads((reference / f"{name}.json").read_text())
    enc = meta["config"]["encoder_config"]["params"]
    cfg = vidtok_jax.load_config(meta["topology"].split()[0],
                                 **{k: enc[k] for k in ("ch", "ch_mult", "norm_type")})
    model = vidtok_jax.VidTok(cfg)
    v = {"params": vidtok_jax.params_from_torch(
        {k[7:]: d[k] for k in d.files if k.startswith("params/")}, cfg)}
    x = jnp.asarray(np.moveaxis(d["in/x"], 1, -1))
    ref = lambda k: d[f"out64/{pre}{k}"] if f"out64/{pre}{k}" in d.files else d[f"out/{pre}{k}"]
    got = {"moments" if not model.is_fsq else "z_pre":
           model.apply(v, x, method=lambda m, x: m.encoder(x))}
    z, aux = model.apply(v, x, method=model.encode)
    got.update({k: aux[k] for k in ("mean", "logvar", "kl_loss", "per_sample_entropy",
                                    "codebook_entropy", "commit_loss") if k in aux})
    if model.is_fsq:
      got["codes"], got["aux_loss_engine"] = z, aux["aux_loss"]
      for step in (1000, 5000):
        got[f"aux_loss_step{step}"] = model.apply(v, x, step=step, method=model.encode)[1][
            "aux_loss"]
      got["dec_from_indices"] = model.apply(v, aux["indices"], method=model.decode_indices)
      same = np.array_equal(np.asarray(aux["indices"]), d[f"out/{pre}indices"])
      rows.append((name, "indices", "exact" if same else "MISMATCH"))
    got["dec"] = model.apply(v, z, method=model.decode)
    for key, value in got.items():
      err = np.max(np.abs(to_torch(value) - np.asarray(ref(key), np.float64)))
      rows.append((name, key, f"{err:.2e}"))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
  parser.add_argument("--reference", type=pathlib.Path, default=default)
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  print("| fixture | output | max abs error |\n| --- | --- | --- |")
  for row in report(args.reference):
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
