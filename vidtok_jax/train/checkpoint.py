"""Train checkpoints (Orbax `CheckpointManager`) and the params a run starts from.

    ckpts = Checkpoints(os.path.join(workdir, "checkpoints"), keep_last=3, keep_best=1)
    restored = ckpts.restore(abstract_state)           # (TrainState, step), or None when empty
    ckpts.save(step, state, metrics={"val/psnr": psnr})  # async; refuses a non-finite state
    ckpts.wait_until_finished(); ckpts.close()
    params = load_init_params("runs/stage1", config)   # stage-2 `init_from`, or an official .ckpt

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
"""

import json
import logging
import os
import re
import time
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger(__name__)

FORMAT = "vidtok_jax.train.checkpoint/1"
STATE, META = "state", "meta"  # item names inside a step folder
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
# Waits (seconds) before the 2nd, 3rd... read of a step whose read failed for a reason that does
# not show it is broken (a transient I/O or network error, memory still held by a failed read).
RETRY_DELAYS_S = (0.5, 2.0)


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: missing, corrupt, or not matching the target."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """A checkpoint path that does not exist (both a ValueError and a FileNotFoundError)."""


class CheckpointReadError(CheckpointError):
  """A checkpoint step that could not be read, for a reason that does not show it is broken
  (permission, I/O, network, out of memory), also after retries. Nothing was moved."""


class NonFiniteStateError(CheckpointError):
  """`Checkpoints.save` refused a state with NaN/inf leaves (`.paths` lists them)."""

  def __init__(self, step, paths):
    self.paths = list(paths)
    shown = "\n".join(f"  {p}" for p in self.paths[:20])
    more = f"\n  ... and {len(self.paths) - 20} more" if len(self.paths) > 20 else ""
    super().__init__(f"refusing to save step {step}: {len(self.paths)} leaf/leaves hold NaN or "
                     f"inf:\n{shown}{more}")


def _keystr(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def nonfinite_paths(tree) -> list:
  """Paths (`a/b/c`) of the floating-point leaves of `tree` holding any NaN or inf."""
  flat = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  # One small reduction per leaf where it lives; only the booleans come back to the host.
  ok = jax.device_get([jnp.isfinite(x).all() if isinstance(x, jax.Array) else np.isfinite(x).all()
                       for _, x in flat])
  return [_keystr(p) for (p, _), good in zip(flat, ok, strict=True) if not good]


def _strip_lpips(state):
  if hasattr(state, "lpips_params"):
    return state.replace(lpips_params=None)
  return state


def _abstract(x, default_sharding):
  """A target leaf: `jax.ShapeDtypeStruct` with a sharding (the array's own, or the default)."""
  sharding = getattr(x, "sharding", None) or default_sharding
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _leaf_specs(tree, dtypes: bool = True) -> dict:
  """{path: "shape dtype"} of every array leaf (Orbax metadata, arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {_keystr(p): f"{tuple(x.shape)}" + (f" {np.dtype(x.dtype)}" if dtypes else "")
          for p, x in flat if hasattr(x, "shape")}


def _mismatch(stored: dict, wanted: dict, what: str, limit: int = 20) -> Optional[str]:
  """A message listing missing / unexpected / mis-shaped keys, or None when they agree."""
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  misshaped = sorted(f"{k}: stored {stored[k]}, expected {wanted[k]}"
                     for k in set(stored) & set(wanted) if stored[k] != wanted[k])
  parts = []
  for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
    if keys:
      more = f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else ""
      parts.append(f"{name} keys ({len(keys)}):\n" + "\n".join(f"  {k}" for k in keys[:limit])
                   + more)
  return f"{what}:\n" + "\n".join(parts) if parts else None


def _metric_key(best_metric: str, best_mode: str):
  """Ranking value for Orbax (higher = better); a missing or NaN metric ranks worst."""
  sign = 1.0 if best_mode == "max" else -1.0

  def key(metrics) -> float:
    value = (metrics or {}).get(best_metric)
    value = float("nan") if value is None else float(value)
    return -float("inf") if np.isnan(value) else sign * value

  return key


class Checkpoints:
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
    self.directory = _path(directory)
    self.best_metric = best_metric
    self.read_only = read_only
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
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
    # Restores read the state item with the handler itself: `CheckpointManager.restore` ends in
    # a barrier, which a process whose read failed never reaches (the others would hang there).
    # `_restore_item` gathers every process's outcome instead.
    self._reader = ocp.PyTreeCheckpointHandler()

  # ------------------------------------------------------------------ queries

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    """The step with the best `best_metric` (the latest when none had metrics)."""
    return self._manager.best_step()

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def reached_preemption(self, step: int) -> bool:
    """True once a multi-host preemption sync point is reached (save now, then stop)."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
    self._reader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

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
    found = self._restore_item(args, _leaf_specs(target_dict), step, "the train state")
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

    found = self._restore_item(None, None, step, "the train state", select=select)
    if found is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    return found[0]

  def _restore_item(self, make_args, wanted: Optional[dict], step: Optional[int], what: str,
                    select=None):
    """(restored state item, step) of `step`, or of the latest good step when None.

    `make_args()`: the item's restore args; `wanted`: {path: "shape dtype"} the stored leaves
    must match (None: no check). `select`, when given, maps the stored metadata tree to
    `(wanted, args)` instead (a partial restore shaped by what is on disk).

    Each round, every process reads its candidate step and the (step, outcome) pairs of all
    processes are gathered; the decision below depends on the gathered pairs only, so it is the
    same everywhere and the processes stay in step (same collectives, same result).
    """
    self._manager.wait_until_finished()  # an async save in flight is not a broken step
    skipped = set()  # read-only: broken steps passed over (not moved)
    while True:
      steps = self.all_steps()
      if step is not None:
        candidate = step
      else:
        candidate = next((s for s in reversed(steps) if s not in skipped), -1)
      if candidate == -1:
        outcome, value = _OK, None
      elif candidate not in steps:
        outcome, value = _FAILED, CheckpointError(
            f"no checkpoint step {candidate} in {self.directory} (steps: {steps or 'none'})")
      else:
        outcome, value = self._read_step(candidate, make_args, wanted, what, select)
      verdicts = _gather(candidate, outcome)
      if len({s for s, _ in verdicts}) > 1:
        raise CheckpointError(f"processes disagree on the checkpoint step to restore in "
                              f"{self.directory}: " + ", ".join(
                                  f"process {i}: {s if s >= 0 else 'none'}"
                                  for i, (s, _) in enumerate(verdicts)))
      if candidate == -1:
        return None
      path = self.step_path(candidate)
      failed = [i for i, (_, o) in enumerate(verdicts) if o == _FAILED]
      broken = [i for i, (_, o) in enumerate(verdicts) if o == _BROKEN]
      if failed:  # a persistent error that is not corruption (or a wrong target): all stop
        if outcome == _FAILED:
          raise value
        raise CheckpointReadError(
            f"checkpoint step {candidate} at {path} could not be read by process(es) "
            f"{', '.join(map(str, failed))} (their logs give the error); nothing was moved")
      if broken:
        cause = _short(value) if outcome == _BROKEN else (
            f"broken as read by process(es) {', '.join(map(str, broken))}")
        if step is not None:
          raise CheckpointError(f"checkpoint step {candidate} at {path} is broken: {cause}") \
              from (value if outcome == _BROKEN else None)
        self._quarantine(candidate, cause)
        skipped.add(candidate)
        continue
      return value, candidate

  def _read_step(self, step, make_args, wanted, what, select):
    """(outcome, value): (_OK, restored item), (_BROKEN, the error showing it) or (_FAILED, the
    error to raise). Failures that do not show corruption are retried (`RETRY_DELAYS_S`)."""
    path = self.step_path(step)
    attempts = len(RETRY_DELAYS_S) + 1
    for attempt in range(attempts):
      try:
        return _OK, self._restore_step(step, make_args, wanted, what, select)
      except _Broken as e:
        return _BROKEN, e.__cause__
      except CheckpointError as e:  # a wrong target: the same on every try
        return _FAILED, e
      except Exception as e:  # noqa: BLE001 -- anything else: retried, then reported as is
        if attempt + 1 == attempts:
          log.error("checkpoint step %d at %s: read failed %d times, last: %s", step, path,
                    attempts, _short(e))
          error = CheckpointReadError(
              f"cannot read checkpoint step {step} at {path} ({attempts} attempts): "
              f"{_short(e)}; nothing was moved (this error does not show that the step is "
              "broken: fix the cause and rerun)")
          error.__cause__ = e
          return _FAILED, error
        log.warning("reading checkpoint step %d at %s failed (%s); retrying in %.1f s", step,
                    path, _short(e), RETRY_DELAYS_S[attempt])
      time.sleep(RETRY_DELAYS_S[attempt])  # outside `except`: a failed read's buffers are freed

  def _restore_step(self, step, make_args, wanted, what, select):
    """The restored state item; raises `_Broken` (cause chained) only for errors showing the
    step's files are broken, and other errors as they are."""
    path = self.step_path(step)
    try:
      stored = self._reader.metadata(path / STATE)
      if stored is None:
        raise FileNotFoundError(f"no {STATE!r} item metadata in {path}")
    except Exception as e:
      if _shows_corruption(e, metadata=True):
        raise _Broken() from e
      raise
    if select is not None:
      wanted, args = select(stored)
    else:
      args = make_args()
    if wanted is not None:
      # Checked before reading: a wrong target (another config) is an error, not corruption.
      problem = _mismatch(_leaf_specs(stored), wanted,
                          f"checkpoint step {step} at {path} does not match {what}")
      if problem:
        raise CheckpointError(problem)
    try:
      return self._reader.restore(path / STATE, args=args)
    except Exception as e:
      if _shows_corruption(e, metadata=False):
        raise _Broken() from e
      raise

  def _quarantine(self, step, reason: str):
    """Moves a broken step folder aside (kept for inspection) and forgets it. Called by every
    process with the same step; process 0 moves it, and all learn whether that worked."""
    path = self.step_path(step)
    if self.read_only:
      log.warning("checkpoint step %d at %s is broken, skipping it: %s", step, path, reason)
      return
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
    moved = _gather(step, _OK if error is None else _FAILED)[0][1] == _OK
    if not moved:
      raise CheckpointError(f"checkpoint step {step} at {path} is broken ({reason}), and moving "
                            f"it to {aside} failed" + (f": {_short(error)}" if error else
                                                       " on process 0"))
    self._manager.reload()


_OK, _BROKEN, _FAILED = 0, 1, 2  # outcomes of reading a step

# Status codes that tensorstore / XLA errors start with; these three mean that data the step's
# metadata points to is absent, shorter than recorded, or does not decode.
_STATUS = re.compile(r"\b(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|"
                     r"ALREADY_EXISTS|PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|"
                     r"ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|"
                     r"UNAUTHENTICATED): ")
_CORRUPT_STATUS = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")


def _shows_corruption(error: BaseException, metadata: bool) -> bool:
  """Whether `error`, raised reading a step's metadata (`metadata`) or arrays, shows the step's
  files are broken; other errors (permission, I/O, network, memory) say nothing about them."""
  if isinstance(error, FileNotFoundError):
    return True  # a file of the step is missing
  if isinstance(error, (OSError, MemoryError)):
    return False
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
    return True
  status = _STATUS.search(str(error))
  if status:
    return status.group(1) in _CORRUPT_STATUS
  if error.__cause__ is not None and error.__cause__ is not error:
    return _shows_corruption(error.__cause__, metadata)
  # Metadata that reads but is not what Orbax wrote (wrong keys or types) is broken.
  return metadata and isinstance(error, (AttributeError, KeyError, TypeError, ValueError))


def _gather(step: int, outcome: int) -> list:
  """[(step, outcome)] of every process (one collective; just this process's when alone)."""
  if jax.process_count() == 1:
    return [(int(step), int(outcome))]
  from jax.experimental import multihost_utils

  rows = multihost_utils.process_allgather(np.array([step, outcome], np.int32))
  return [(int(s), int(o)) for s, o in np.asarray(rows).reshape(-1, 2)]


def _short(error, limit: int = 400) -> str:
  text = f"{type(error).__name__}: {error}"  # tensorstore errors carry a long JSON spec
  return text if len(text) <= limit else text[:limit] + " ..."


def _path(p) -> epath.Path:
  p = os.fspath(p)
  return epath.Path(p if "://" in p else os.path.abspath(p))  # local: absolute; gs://: as is


class _Broken(Exception):
  """Internal: the step's files could not be read (the cause is chained)."""


# -------------------------------------------------------------------- params to start a run from


_TEMPLATES = {}  # model config JSON -> abstract params: tracing the model's init costs seconds


def _model_template(config):
  from vidtok_jax import abstract_params
  from vidtok_jax.train.state import model_config

  mc = model_config(config)
  key = mc.to_json_best_effort(sort_keys=True)
  if key not in _TEMPLATES:
    _TEMPLATES[key] = abstract_params(mc)
  return _TEMPLATES[key]


def _is_step_folder(path: epath.Path) -> bool:
  return (path / STATE).is_dir()


def _checkpoints_dir(path: epath.Path) -> Optional[epath.Path]:
  """The folder of step folders: `path` itself, or `path/checkpoints` (a train workdir)."""
  for d in (path / "checkpoints", path):
    if d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir()):
      return d
  return None


def _params_from_train_checkpoint(path: epath.Path, use_ema: bool, details: dict):
  """`g_params["model"]` (or the EMA shadow's) of the latest good step under `path` (a workdir,
  checkpoints dir or one step folder), restored alone as numpy (no optimizer templates)."""
  chosen = {}

  def select(stored):
    tree = dict(stored)
    source = "g_params"
    if use_ema:
      if isinstance(tree.get("ema_params"), dict) and "model" in tree["ema_params"]:
        source = "ema_params"
      else:
        log.warning("%s has no EMA params; using the trained params (g_params)", path)
    if not isinstance(tree.get(source), dict) or "model" not in tree[source]:
      raise CheckpointError(f"{path} is not a vidtok_jax train checkpoint (no {source}/model)")
    item = {source: {"model": tree[source]["model"]}}
    chosen["source"] = source
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item,
                                is_leaf=lambda x: hasattr(x, "shape"))
    return None, ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)

  if _is_step_folder(path):
    if not path.name.isdigit():
      raise CheckpointError(f"{path}: a step folder must be named by its step number")
    ckpts, step = Checkpoints(path.parent, read_only=True), int(path.name)
  else:
    directory = _checkpoints_dir(path)
    if directory is None:
      return None
    ckpts, step = Checkpoints(directory, read_only=True), None
  try:
    found = ckpts._restore_item(None, None, step, "params", select=select)
  finally:
    ckpts.close()
  if found is None:
    raise CheckpointError(f"no checkpoint under {path} could be restored (all steps broken)")
  restored, step = found
  details.update(step=int(step), source=chosen["source"])
  log.info("loaded %s/model of step %d from %s", chosen["source"], step, ckpts.directory)
  return restored[chosen["source"]]["model"]


def _params_from_orbax_tree(path: epath.Path):
  """A bare params tree saved with `ocp.StandardCheckpointer` (`convert to-flax`)."""
  ckptr = ocp.PyTreeCheckpointer()
  try:
    stored = ckptr.metadata(path).item_metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(stored),
                                is_leaf=lambda x: hasattr(x, "shape"))
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(dict(stored),
                                                           restore_args=restore_args))
  except Exception as e:
    raise CheckpointError(f"cannot read the orbax params folder {path}: {e}") from e
  finally:
    ckptr.close()


def _config_hints(stored, config, template) -> list:
  """`convert.infer.config_hints` of a stored state dict / params tree vs the config's."""
  from vidtok_jax.config import ModelSpec
  from vidtok_jax.weights.infer import config_hints, torch_shapes
  from vidtok_jax.train.state import model_config

  try:
    have, want = torch_shapes(stored), torch_shapes(template)
    other = {k for k in set(have) ^ set(want) if not k.startswith(("loss.", "model_ema."))}
    if any(not k.startswith(("encoder.", "decoder.")) for k in other):
      return []  # another regularizer / variant, not a width or depth: the key list says more
    return config_hints(have, ModelSpec.from_config(model_config(config)), want)
  except Exception:  # noqa: BLE001 -- a hint is a nicety: never hide the real mismatch
    return []


def load_init_params(path, config, *, use_ema: bool = False, details: Optional[dict] = None):
  """Params to start a run from (stage 2 `init_from`, or fine-tuning an official model):
  - a train workdir or its checkpoints dir (latest good step; g_params["model"], or the EMA
    shadow's "model" when use_ema and present), or one step folder of it,
  - an orbax params folder written by `python -m vidtok_jax.cli.convert to-flax` (a bare params tree
    saved with ocp.StandardCheckpointer; see vidtok_jax/cli/convert.py),
  - an official `.ckpt` / `.safetensors` state dict (via vidtok_jax.weights.io.load_state_dict
    + vidtok_jax.weights.keys.params_from_state_dict with the template
    `vidtok_jax.abstract_params(vidtok_jax.train.state.model_config(config))`),
  - `"hf:NAME"`: the official weights of variant NAME from the Hugging Face hub (downloaded and
    converted once, then cached; see vidtok_jax/weights/hub.py).
  Shapes are checked against `config.model`; a mismatch raises CheckpointError (a ValueError)
  naming the config field that differs when the shapes tell (e.g. "this checkpoint has ch=32
  ...; pass --config.model.ch=32"), else the keys.
  Nothing is written: broken steps of a train checkpoint are skipped, not moved.
  Returns a params tree (nested dicts) of float32 numpy arrays. `details`, when given, is
  filled with `step` (the train step restored; None for other files) and `source` (g_params,
  ema_params, state_dict (official files and `hf:` weights) or params).

  Raises `CheckpointNotFoundError` (a FileNotFoundError and ValueError) for a missing path, and
  `CheckpointError` (a ValueError) for a folder without checkpoints or a corrupt one.
  """
  from vidtok_jax.weights.io import load_state_dict
  from vidtok_jax.weights.keys import params_from_state_dict

  details = {} if details is None else details
  details.update(step=None, source="params")
  if isinstance(path, str) and path.startswith("hf:"):
    details["source"] = "state_dict"
    return _hub_params(path, config, use_ema)
  template = _model_template(config)
  p = _path(path)
  if not p.exists():
    raise CheckpointNotFoundError(f"init checkpoint {p} does not exist")
  if p.is_file():
    if not p.name.lower().endswith(TORCH_SUFFIXES):
      raise CheckpointError(f"{p}: unknown checkpoint file type; expected one of "
                            f"{', '.join(TORCH_SUFFIXES)} or a folder")
    if use_ema:
      raise CheckpointError(f"{p}: use_ema is only supported for vidtok_jax train checkpoints "
                            "(an official state dict's EMA weights are not converted)")
    state_dict = load_state_dict(os.fspath(path))
    details["source"] = "state_dict"
    try:  # shape-checked against the template (missing / unexpected / mis-shaped keys)
      return params_from_state_dict(state_dict, template)
    except ValueError as e:
      hints = _config_hints(state_dict, config, template)
      raise CheckpointError(f"{p} does not match config.model ({config.model.get('name')}): "
                            + ("; ".join(hints) if hints else str(e))) from e
  if (p / "_METADATA").exists() and not (p / STATE).exists():
    if use_ema:
      raise CheckpointError(f"{p}: use_ema needs a train checkpoint; this is a bare params tree")
    params = _params_from_orbax_tree(p)
  else:
    params = _params_from_train_checkpoint(p, use_ema, details)
    if params is None:
      raise CheckpointError(f"{p} holds no checkpoint: expected a train workdir (with "
                            "checkpoints/<step>/), a checkpoints folder, a step folder, a "
                            "`convert to-flax` params folder, or a .ckpt/.safetensors file")
  problem = _mismatch(_leaf_specs(params, dtypes=False), _leaf_specs(template, dtypes=False),
                      f"params in {p} do not match config.model ({config.model.get('name')})")
  if problem:
    hints = _config_hints(params, config, template)
    if hints:  # the field to change, not hundreds of mis-shaped keys
      problem = (f"params in {p} do not match config.model ({config.model.get('name')}): "
                 + "; ".join(hints))
    raise CheckpointError(problem)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _hub_params(spec, config, use_ema):
  from vidtok_jax.weights import hub as pretrained
  from vidtok_jax.config import VARIANTS
  from vidtok_jax.train.state import model_config

  if use_ema:
    raise CheckpointError(f"{spec}: use_ema is only supported for vidtok_jax train checkpoints "
                          "(an official state dict's EMA weights are not converted)")
  full = pretrained.variant_name(spec[len("hf:"):])
  mc = model_config(config)
  if mc.get("name") in VARIANTS and mc.name != full:
    raise CheckpointError(f"{spec} holds the weights of {full}, but config.model is {mc.name}")
  # Shapes are checked against config.model by the conversion (key and both shapes named).
  return pretrained.load_params(pretrained.download(full), mc)


__all__ = ["CheckpointError", "CheckpointNotFoundError", "CheckpointReadError", "Checkpoints",
           "NonFiniteStateError", "load_init_params", "nonfinite_paths"]
