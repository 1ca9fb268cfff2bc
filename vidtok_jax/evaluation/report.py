"""The evaluation's results: each shard's part gathered as videos finish (`ShardPart`), parts
merged into the result dict (`merge_parts`: frame-weighted aggregates, FVD, protocol), and the
fixed-width table the eval command prints (`format_table`).
"""

import collections
import logging

import numpy as np

log = logging.getLogger("vidtok_jax.eval")


class ShardPart:
  """Per-video rows and score sums, skipped entries and embeddings of one shard's videos, as
  they finish (in any order); `bar` (tqdm) advances once per video."""

  def __init__(self, score_padded: bool, bar):
    self.score_padded, self.bar = score_padded, bar
    self.rows, self.skipped, self.emb = {}, [], {}

  def finish(self, i, info, scores, emb_pair):
    weight = np.ones_like(info["valid"]) if self.score_padded else info["valid"]
    row = {"path": info["path"], "fps": info["fps"], "frames": info["frames"],
           "windows": int(len(info["valid"])), "scored_frames": int(weight.sum()),
           **info["meta"]}
    sums = {}
    for k, v in scores.items():
      sums[k] = float(np.sum(v * weight))
      row[k] = sums[k] / max(weight.sum(), 1)
    self.rows[i] = (row, sums)
    if emb_pair is not None:
      self.emb[i] = emb_pair
    self.bar.update(1)

  def skip(self, i, entry):
    self.skipped.append((i, entry))
    self.bar.update(1)

  def part(self, seconds: float, timing) -> dict:
    """The part for `merge_parts` (rows, skipped and embeddings in video order)."""
    return {"rows": sorted(self.rows.items()),
            "skipped": sorted(self.skipped, key=lambda s: s[0]),
            "emb": sorted(self.emb.items()), "seconds": seconds, "timing": dict(timing)}


def merge_parts(parts, protocol: dict, *, lpips: bool, fvd_lib=None) -> dict:
  """The result dict of shard parts (any order): per-video rows in video order, frame-weighted
  aggregates, FVD over all windows (`fvd_lib` None: off), `protocol` with the counts."""
  rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r[0])
  skipped = [s for _, s in sorted((s for p in parts for s in p["skipped"]),
                                  key=lambda s: s[0])]
  emb = sorted((e for p in parts for e in p["emb"]), key=lambda e: e[0])
  per_video = [r for _, (r, _) in rows]
  frames_scored = sum(r["scored_frames"] for r in per_video)
  sums = {k: sum(s.get(k, 0.0) for _, (_, s) in rows) for k in ("psnr", "ssim", "lpips")}
  result = {k: (sums[k] / frames_scored if frames_scored and (k != "lpips" or lpips)
                else None) for k in sums}
  result["fvd"] = None
  n_clips = sum(len(r) for _, (r, _) in emb)
  if fvd_lib is not None and n_clips >= 2:
    result["fvd"] = float(fvd_lib.frechet_distance(
        np.concatenate([r for _, (r, _) in emb]), np.concatenate([f for _, (_, f) in emb])))
  elif fvd_lib is not None:
    log.warning("FVD needs at least 2 clips, got %d: not computed", n_clips)
  protocol = dict(protocol, num_videos=len(per_video), num_clips=n_clips,
                  num_frames_scored=frames_scored, num_skipped=len(skipped))
  result.update(protocol=protocol, videos=per_video, skipped=skipped,
                seconds=max(p["seconds"] for p in parts))
  timing = collections.Counter()
  for p in parts:
    timing.update(p["timing"])
  # Main-thread seconds: waiting for decoded videos, dispatching, waiting for device results.
  result["timing"] = {k: round(v, 3) for k, v in timing.items()}
  return result


def format_table(result: dict) -> str:
  """Per-video rows and the aggregate as a fixed-width table."""
  cols = [("psnr", "{:.2f}"), ("ssim", "{:.4f}"), ("lpips", "{:.4f}")]
  lines = [f"{'video':40s} {'frames':>7s} " + " ".join(f"{c:>8s}" for c, _ in cols)]
  for v in result["videos"]:
    name = v["path"] if len(v["path"]) <= 40 else "..." + v["path"][-37:]
    vals = " ".join(f"{(fmt.format(v[c]) if v.get(c) is not None else '-'):>8s}"
                    for c, fmt in cols)
    lines.append(f"{name:40s} {v['scored_frames']:7d} {vals}")
  agg = " ".join(f"{(fmt.format(result[c]) if result.get(c) is not None else '-'):>8s}"
                 for c, fmt in cols)
  lines.append(f"{'ALL (frame-weighted)':40s} {result['protocol']['num_frames_scored']:7d} {agg}")
  if result.get("fvd") is not None:
    lines.append(f"FVD {result['fvd']:.2f} over {result['protocol']['num_clips']} clips "
                 "(I3D logits; biased at small N: compare only on the same clip set)")
  for s in result["skipped"]:
    lines.append(f"skipped {s['path']}: {s['reason']}: {s['message']}")
  return "\n".join(lines)


__all__ = ["ShardPart", "format_table", "merge_parts"]
