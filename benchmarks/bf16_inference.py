r"""What bf16 inference costs in quality: float32 vs bf16 reconstructions of a trained model.

    python benchmarks/bf16_inference.py --workdir demo_out/run --videos VAL_FOLDER \
        [--size 64] [--sample_fps 15] [--json out.json]

The model is the one `make demo` trains (`vidtok_jax.cli.demo`'s config, its workdir) unless
`--config` names a config file spec (`configs/vidtok.py:VARIANT`) whose `model` matches the
checkpoint. Each video is evaluated twice with the eval protocol (`vidtok_jax.evaluation.evaluator`,
posterior mean, no LPIPS / FVD): float32 with "highest" convs (the inference default) and bf16
compute with the backend's default precision (`--config.model.dtype=bfloat16
--config.model.precision=default` on the commands), in clips mode (17-frame windows) and in long
mode (the whole video streamed chunk by chunk, where causal bf16 encoding could drift). Printed
and written: per-video PSNR of both and their difference, per mode, and the wall time of each.
"""

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="train workdir (its latest checkpoint)")
  p.add_argument("--videos", required=True, help="folder of evaluation videos")
  p.add_argument("--config", default=None, help="configs/vidtok.py:VARIANT (default: the demo's)")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--sample_fps", type=float, default=15.0)
  p.add_argument("--modes", default="clips,long")
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)

  from vidtok_jax.evaluation import evaluator as evaluation

  from vidtok_jax.cli import demo
  from vidtok_jax.train.checkpoint import load_init_params

  if a.config:
    from configs.vidtok import get_config

    config = get_config(a.config.split(":", 1)[-1])
  else:
    config = demo.demo_config(os.path.dirname(a.workdir), 1, a.size, 1)
  config.data.size = a.size
  config.data.eval_sample_fps = a.sample_fps
  config.data.num_frames = 17
  params = load_init_params(a.workdir, config)
  paths = sorted(glob.glob(os.path.join(a.videos, "*.mp4")))
  if not paths:
    raise SystemExit(f"--videos {a.videos}: no .mp4 files")

  out = {"workdir": a.workdir, "size": a.size, "sample_fps": a.sample_fps, "modes": {}}
  for mode in a.modes.split(","):
    res = {}
    for dtype, precision in (("float32", "highest"), ("bfloat16", "default")):
      c = config.copy_and_resolve_references()
      c.model.dtype, c.model.precision = dtype, precision
      ev = evaluation.Evaluator(c, params, lpips_net=None, fvd=False, batch_size=2,
                                sample_posterior=False, mode=mode)
      t0 = time.perf_counter()
      r = ev.run(evaluation.folder_videos(paths, a.sample_fps), progress=False)
      res[dtype] = dict(seconds=time.perf_counter() - t0, psnr=r["psnr"],
                        videos={os.path.basename(v["path"]): (v["psnr"], v["scored_frames"])
                                for v in r["videos"]})
    rows = []
    for name, (p32, n) in res["float32"]["videos"].items():
      p16 = res["bfloat16"]["videos"][name][0]
      rows.append(dict(video=name, frames=n, psnr_float32=p32, psnr_bf16=p16, diff=p16 - p32))
      print(f"{mode:5s} {name:40s} {n:5d} frames  float32 {p32:7.3f} dB  bf16 {p16:7.3f} dB  "
            f"diff {p16 - p32:+.4f} dB", flush=True)
    agg = res["bfloat16"]["psnr"] - res["float32"]["psnr"]
    print(f"{mode:5s} aggregate: float32 {res['float32']['psnr']:.3f} dB, bf16 "
          f"{res['bfloat16']['psnr']:.3f} dB, diff {agg:+.4f} dB; max |per-video diff| "
          f"{max(abs(r['diff']) for r in rows):.4f} dB; seconds float32 "
          f"{res['float32']['seconds']:.1f}, bf16 {res['bfloat16']['seconds']:.1f}", flush=True)
    out["modes"][mode] = dict(rows=rows, aggregate_diff=agg,
                              psnr_float32=res["float32"]["psnr"],
                              psnr_bf16=res["bfloat16"]["psnr"],
                              seconds={k: v["seconds"] for k, v in res.items()})
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
