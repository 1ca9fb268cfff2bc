"""In-training validation: PSNR on fixed validation windows and an input/reconstruction grid.

The windows are the first `config.eval_clips` of `iterate_eval_clips` (as officially: frames at
`eval_sample_fps` from frame 0, non-overlapping `num_frames` windows, the last one padded by
repeating its last frame; padded frames are not scored). Every process loads the same windows and
feeds its rows of each global batch, so the mean is the same on every host. This is a training
monitor; `eval.py` reports the full metric set.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import vidtok_jax
from vidtok_jax.metrics.psnr import psnr
from vidtok_jax.train import mesh as mesh_lib
from vidtok_jax.train import state as state_lib


@dataclasses.dataclass
class EvalSet:
  video: np.ndarray  # float32 (N, T, H, W, 3) in [-1, 1], N a multiple of the global batch
  valid: np.ndarray  # float32 (N, T): 1 for real frames, 0 for padding (repeated or filler rows)
  paths: list


def load_eval_set(config, num_clips: int) -> EvalSet | None:
  """The first `num_clips` validation windows, padded to whole global batches; None if 0."""
  if num_clips <= 0:
    return None
  from vidtok_jax.data import iterate_eval_clips  # tf.data: only when evaluating

  clips = []
  for clip in iterate_eval_clips(config):
    clips.append(clip)
    if len(clips) == num_clips:
      break
  if not clips:
    raise ValueError(f"config.data.eval_split={config.data.eval_split!r} has no usable video")
  t = config.data.num_frames
  video = np.stack([c["video"] for c in clips]).astype(np.float32)
  valid = np.stack([np.arange(t) < c["num_valid"] for c in clips]).astype(np.float32)
  b = config.data.global_batch_size
  pad = -len(clips) % b
  if pad:  # filler rows (copies of the first window) carry zero weight
    video = np.concatenate([video, np.repeat(video[:1], pad, 0)])
    valid = np.concatenate([valid, np.zeros((pad, t), np.float32)])
  return EvalSet(video, valid, [c["path"] for c in clips])


def make_eval_step(config, mesh):
  """`eval_step(model_params, video, valid) -> (psnr_sum, frames, first_input, first_recon)`.

  Deterministic reconstruction (posterior mode / FSQ codes, no aux losses) in the training
  compute dtype; PSNR per frame in [0, 1] as the official evaluation; sums are replicated scalars.
  """
  model = vidtok_jax.VidTok(state_lib.model_config(config))
  batch_sh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  valid_sh = mesh_lib.batch_sharding(mesh, 2)  # (B, T) flags: rows only

  def eval_step(params, video, valid):
    _, recon, _ = model.apply({"params": params}, video, False, 0, False)
    x01 = (video + 1.0) / 2.0
    r01 = jnp.clip((recon.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    p = psnr(x01, r01)  # (B, T)
    return jnp.sum(p * valid), jnp.sum(valid), x01[0], r01[0]

  return jax.jit(eval_step, in_shardings=(None, batch_sh, valid_sh),
                 out_shardings=(rep, rep, rep, rep))


def evaluate(eval_step, params, eval_set: EvalSet, mesh, global_batch: int):
  """`(mean PSNR over real frames, (input, recon) of the first window as (T, H, W, 3) [0, 1])`."""
  per_host = global_batch // jax.process_count()
  me = jax.process_index()
  total, frames, sample = 0.0, 0.0, None
  for lo in range(0, eval_set.video.shape[0], global_batch):
    rows = slice(lo + me * per_host, lo + (me + 1) * per_host)
    video, valid = mesh_lib.shard_batch(mesh, (eval_set.video[rows], eval_set.valid[rows]))
    s, n, x0, r0 = eval_step(params, video, valid)
    total, frames = total + float(s), frames + float(n)
    if sample is None:
      sample = (np.asarray(x0), np.asarray(r0))
  return total / max(frames, 1.0), sample


def sample_grid(x, recon, max_frames: int = 9) -> np.ndarray:
  """`(1, 2H, F*W, 3)` image in [0, 1]: input frames on top, reconstructions below (F evenly
  spaced frames, at most `max_frames`)."""
  t = x.shape[0]
  idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
  top = np.concatenate(list(np.asarray(x)[idx]), axis=1)
  bottom = np.concatenate(list(np.asarray(recon)[idx]), axis=1)
  return np.concatenate([top, bottom], axis=0)[None].astype(np.float32)
