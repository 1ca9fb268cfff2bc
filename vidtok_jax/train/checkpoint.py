"""Train checkpoints (Orbax `CheckpointManager`) and the params a run starts from.

    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), keep_last=3, keep_best=1)
    restored = ckpts.restore(abstract_state)           # (TrainState, step), or None when empty
    ckpts.save(step, state, metrics={"val/psnr": psnr})  # async; refuses a non-finite state
    ckpts.wait_until_finished(); ckpts.close()
    params = load_init_params("runs/stage1", config)   # = vidtok_jax.weights.load.load_params

On disk, `<directory>/<step>/` holds three Orbax items:
  state    the `TrainState` as a nested dict (`flax.serialization.to_state_dict`: dataclass fields,
           namedtuple fields and tuple indices become keys; `MaskedNode`s, empty optax states and
           None leave no arrays), WITHOUT `lpips_params` (frozen VGG weights, put back by the
           loop after restoring).
  meta     JSON: format, step, save time, metrics and, when a config was given, variant / stage /
           model config.
  metrics  Orbax's own JSON of `metrics` (ranks the keep-best checkpoints, also after a restart).
Retention keeps the last `keep_last` steps and the `keep_best` best by `best_metric`.

Restoring the latest step (`restore()` without a step) tells two kinds of failure apart:
- the step is shown to be broken (unreadable or invalid metadata, a missing or truncated file,
  data that does not decode): it is moved aside to `<directory>_corrupt/<step>-<unix time>`
  (never deleted), with a warning, and the previous step is tried;
- anything else (permission, I/O or network errors, out of memory): the read is retried
  (`RETRY_DELAYS_S`); if it still fails, `CheckpointReadError` names the step and path, and
  nothing is moved.
With several processes every one must call `restore` (it is collective): each reads the step,
the verdicts are gathered (`multihost_utils.process_allgather`) and all take the same decision,
so all restore the same step, or all move the same broken step aside, or all raise.
Orbax writes into `<step>.orbax-checkpoint-tmp` and renames it when complete, so an interrupted
save leaves only that tmp folder: never listed as a step, and replaced by the next save of it.
No checksum of the array data is written (Orbax's zarr2 format has none); a truncated or
undecodable chunk is detected by the read itself.
Reading a step (which step, what is broken, retries, agreement across processes) is
`vidtok_jax.weights.steps.StepReader`, which `Checkpoints` extends with saving and moving broken
steps aside: inference reads train workdirs with the same code, without importing this package.
"""

import json
import logging
import time
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vidtok_jax.weights.steps import (
    FAILED,
    META,
    OK,
    STATE,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    StepReader,
    as_path,
    gather,
    keystr,
    leaf_specs,
    short,
)
from vidtok_jax.weights.steps import shows_corruption as _shows_corruption  # noqa: F401 (tests)

log = logging.getLogger(__name__)

FORMAT = "vidtok_jax.train.checkpoint/1"
# Waits (seconds) before the 2nd, 3rd... read of a step whose read failed for a reason that does
# not show it is broken (a transient I/O or network error, memory still held by a failed read).
RETRY_DELAYS_S = (0.5, 2.0)


class NonFiniteStateError(CheckpointError):
  """`Checkpoints.save` refused a state with NaN/inf leaves (`.paths` lists them)."""

  def __init__(self, step, paths):
    self.paths = list(paths)
    shown = "\n".join(f"  {p}" for p in self.paths[:20])
    more = f"\n  ... and {len(self.paths) - 20} more" if len(self.paths) > 20 else ""
    super().__init__(f"refusing to save step {step}: {len(self.paths)} leaf/leaves hold NaN or "
                     f"inf:\n{shown}{more}")


def nonfinite_paths(tree) -> list:
  """Paths (`a/b/c`) of the floating-point leaves of `tree` holding any NaN or inf."""
  flat = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  # One small reduction per leaf where it lives; only the booleans come back to the host.
  ok = jax.device_get([jnp.isfinite(x).all() if isinstance(x, jax.Array) else np.isfinite(x).all()
                       for _, x in flat])
  return [keystr(p) for (p, _), good in zip(flat, ok, strict=True) if not good]


def _strip_lpips(state):
  if hasattr(state, "lpips_params"):
    return state.replace(lpips_params=None)
  return state


def _abstract(x, default_sharding):
  """A target leaf: `jax.ShapeDtypeStruct` with a sharding (the array's own, or the default)."""
  sharding = getattr(x, "sharding", None) or default_sharding
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _metric_key(best_metric: str, best_mode: str):
  """Ranking value for Orbax (higher = better); a missing or NaN metric ranks worst."""
  sign = 1.0 if best_mode == "max" else -1.0

  def key(metrics) -> float:
    value = (metrics or {}).get(best_metric)
    value = float("nan") if value is None else float(value)
    return -float("inf") if np.isnan(value) else sign * value

  return key


class Checkpoints(StepReader):
  """Train checkpoints under `directory` (e.g. WORKDIR/checkpoints).

  Args:
    directory: the folder of step folders (created unless `read_only`).
    keep_last: the latest steps always kept.
    keep_best: also keep this many best steps by `best_metric` among the saves that had
      `metrics` (0: none); a step may be both latest and best.
    best_metric, best_mode: the metric key ranking the saves, and "max" or "min".
    async_save: `save` returns once the arrays are copied to host; the write continues in the
      background (`wait_until_finished` blocks on it).
    config: optional full config; its variant, stage and model config go into each step's meta.
    read_only: never create, write or move anything (a corrupt step is only skipped).

  With several JAX processes, `save`, `restore`, `restore_raw` and `close` must be called by all.
  """

  def __init__(self, directory, *, keep_last: int = 3, keep_best: int = 1,
               best_metric: str = "val/psnr", best_mode: str = "max", async_save: bool = True,
               config=None, read_only: bool = False):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if keep_last < 1 or keep_best < 0:
      raise ValueError(f"need keep_last >= 1 and keep_best >= 0, got {keep_last}, {keep_best}")
    directory = as_path(directory)
    self.best_metric = best_metric
    self._config = config
    key = _metric_key(best_metric, best_mode)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep_last),
        checkpoint_managers.BestN(get_metric_fn=key, reverse=False, n=keep_best,
                                  keep_checkpoints_without_metrics=False)])
    # `best_fn` is what makes Orbax write the metrics to disk (and read them back on restart);
    # with `preservation_policy` alone they live in memory only, so after a restart BestN sees
    # no metrics and deletes the best step. `best_fn` does not decide retention here.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=key, best_mode="max",
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only)
    manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
    super().__init__(directory, manager, read_only)

  # ------------------------------------------------------------------ queries

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The step with the best `best_metric` (the latest when none had metrics)."""
    return self._manager.best_step()

  def reached_preemption(self, step: int) -> bool:
    """True once a multi-host preemption sync point is reached (save now, then stop)."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def _retry_delays(self) -> tuple:
    return RETRY_DELAYS_S  # this module's (tests and multi-host runs shorten it)

  # ------------------------------------------------------------------ save

  def save(self, step: int, state, metrics: Optional[dict] = None, force: bool = False) -> bool:
    """Saves `state` (without `lpips_params`) as `step`; returns whether a save started.

    A step at or below the latest saved one is skipped (False), also with `force`, which only
    overrides Orbax's save-decision policy. Raises `NonFiniteStateError` naming the leaves if
    any floating-point leaf is NaN/inf (nothing is written). `metrics` (e.g.
    `{"val/psnr": 23.1}`) feed keep-best. With `async_save` the state's buffers may be donated
    or freed as soon as this returns (Orbax has copied them to host memory).
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only")
    step, latest = int(step), self.latest_step()
    if latest is not None and step <= latest:
      log.info("checkpoint step %d not saved: step %d is already saved", step, latest)
      return False
    if not force and not self._manager.should_save(step):
      return False
    state = _strip_lpips(state)
    bad = nonfinite_paths(state)
    if bad:
      raise NonFiniteStateError(step, bad)
    metrics = {str(k): float(v) for k, v in (metrics or {}).items() if v is not None}
    meta = {"format": FORMAT, "step": step, "time": time.time(), "metrics": metrics}
    if self._config is not None:
      c = self._config
      meta.update(variant=c.get("variant"), stage=c.get("stage"),
                  model=json.loads(c.model.to_json_best_effort()) if "model" in c else None)
    tree = flax.serialization.to_state_dict(state)
    args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(tree), META: ocp.args.JsonSave(meta)})
    # Always some metrics: without them Orbax logs a warning per save (best_fn is set).
    return self._manager.save(step, args=args, metrics=metrics, force=force)

  # ------------------------------------------------------------------ restore

  def read_meta(self, step: int) -> dict:
    """The `meta` JSON of `step`."""
    args = ocp.args.Composite(**{META: ocp.args.JsonRestore()})
    return self._manager.restore(step, args=args)[META]

  def restore(self, abstract_state, step: Optional[int] = None):
    """`(TrainState, step)` restored onto `abstract_state`'s structure and shardings, or None.

    `abstract_state`: a `TrainState` of `jax.ShapeDtypeStruct` (e.g. `jax.eval_shape` +
    `mesh.state_shardings`) or of arrays; each leaf is restored with its `.sharding` (the first
    local device when it has none). `lpips_params` is ignored and None in the result.
    `step` None: the latest step that restores; one shown to be broken (bad metadata, missing
    or truncated files) is logged, moved aside (unless `read_only`) and the previous step
    tried. None when there is no checkpoint at all. A read failing otherwise (permission, I/O,
    out of memory) is retried, then raises `CheckpointReadError` with nothing moved. An
    explicit `step` that is missing or broken raises `CheckpointError`. A target whose keys or
    shapes differ from a checkpoint raises `CheckpointError` (never treated as corruption).
    Collective with several processes (all call it; all restore the same step or all raise).
    """
    target = _strip_lpips(abstract_state)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: _abstract(x, default), target)
    target_dict = flax.serialization.to_state_dict(target)
    args = lambda: ocp.args.PyTreeRestore(
        target_dict, restore_args=ocp.checkpoint_utils.construct_restore_args(target_dict))
    found = self.restore_item(args, leaf_specs(target_dict), step, "the train state")
    if found is None:
      return None
    restored, step = found
    return flax.serialization.from_state_dict(target, restored), step

  def restore_raw(self, step: Optional[int] = None) -> dict:
    """The stored state of `step` (default: the latest good one) as a nested dict of numpy
    arrays, with no target: for inspection and tests. Raises `CheckpointError` when empty."""

    def select(stored):
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                  dict(stored), is_leaf=lambda x: hasattr(x, "shape"))
      return None, ocp.args.PyTreeRestore(dict(stored), restore_args=restore_args)

    found = self.restore_item(None, None, step, "the train state", select=select)
    if found is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    return found[0]

  def _quarantine(self, step, reason: str):
    """Moves a broken step folder aside (kept for inspection) and forgets it. Called by every
    process with the same step; process 0 moves it, and all learn whether that worked."""
    path = self.step_path(step)
    if self.read_only:
      return super()._quarantine(step, reason)
    aside = (self.directory.parent / f"{self.directory.name}_corrupt"
             / f"{step}-{int(time.time())}")
    log.warning("checkpoint step %d at %s failed to restore (%s); moving it to %s and trying "
                "the previous step", step, path, reason, aside)
    error = None
    if jax.process_index() == 0:
      try:
        aside.parent.mkdir(parents=True, exist_ok=True)
        path.rename(aside)
      except Exception as e:  # noqa: BLE001 -- reported on every process below
        error = e
    # Also the barrier: nobody lists the steps again before the move is done.
    moved = gather(step, OK if error is None else FAILED)[0][1] == OK
    if not moved:
      raise CheckpointError(f"checkpoint step {step} at {path} is broken ({reason}), and moving "
                            f"it to {aside} failed" + (f": {short(error)}" if error else
                                                       " on process 0"))
    self._manager.reload()


def load_init_params(path, config, *, use_ema: bool = False, details: Optional[dict] = None):
  """Params to start a run from (stage 2 `init_from`, or fine-tuning an official model): any
  weights source; `vidtok_jax.weights.load.load_params`, which documents the sources and
  errors."""
  from vidtok_jax.weights.load import load_params

  return load_params(path, config, use_ema=use_ema, details=details)


__all__ = ["CheckpointError", "CheckpointNotFoundError", "CheckpointReadError", "Checkpoints",
           "NonFiniteStateError", "load_init_params", "nonfinite_paths"]
