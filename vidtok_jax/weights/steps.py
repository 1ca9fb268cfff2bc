"""Reading the step folders of an Orbax checkpoints directory (what `vidtok-train` writes), one
item at a time, robustly: which step to read, which read failures show a step is broken, retries,
and the same decision on every process. Shared by the train checkpoints
(`vidtok_jax.train.checkpoint.Checkpoints`, which also saves and moves broken steps aside) and by
`vidtok_jax.weights.load` (the params of a train workdir, read-only), so inference never
imports the training package.

    reader = StepReader.open_read_only(directory)
    found = reader.restore_item(None, None, None, "params", select=select)  # (item, step) / None
    reader.close()

Reading the latest step (`step` None) tells two kinds of failure apart:
- the step is shown to be broken (unreadable or invalid metadata, a missing or truncated file,
  data that does not decode): it is skipped (read-only: with a warning; `Checkpoints` moves it
  aside) and the previous step is tried;
- anything else (permission, I/O or network errors, out of memory): the read is retried
  (`RETRY_DELAYS_S`); if it still fails, `CheckpointReadError` names the step and path.
With several processes every one must call `restore_item` (it is collective): the verdicts are
gathered (`multihost_utils.process_allgather`) and all take the same decision.
"""

import json
import logging
import os
import re
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

STATE, META = "state", "meta"  # item names inside a step folder
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


def keystr(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaf_specs(tree, dtypes: bool = True) -> dict:
  """{path: "shape dtype"} of every array leaf (Orbax metadata, arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {keystr(p): f"{tuple(x.shape)}" + (f" {np.dtype(x.dtype)}" if dtypes else "")
          for p, x in flat if hasattr(x, "shape")}


def mismatch(stored: dict, wanted: dict, what: str, limit: int = 20) -> Optional[str]:
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


class StepReader:
  """Reads the `STATE` item of the step folders under `directory` through `manager` (an Orbax
  `CheckpointManager` over it: the step listing). `read_only`: a broken step is only skipped;
  subclasses that write override `_quarantine`."""

  def __init__(self, directory, manager, read_only: bool = True):
    self.directory = as_path(directory)
    self.read_only = read_only
    self._manager = manager
    # Restores read the state item with the handler itself: `CheckpointManager.restore` ends in
    # a barrier, which a process whose read failed never reaches (the others would hang there).
    # `restore_item` gathers every process's outcome instead.
    self._reader = ocp.PyTreeCheckpointHandler()

  @classmethod
  def open_read_only(cls, directory) -> "StepReader":
    """A reader of `directory` that never creates, writes or moves anything."""
    directory = as_path(directory)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                           cleanup_tmp_directories=False)
    return cls(directory, ocp.CheckpointManager(directory, options=options), read_only=True)

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def close(self):
    self._manager.close()
    self._reader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _retry_delays(self) -> tuple:
    return RETRY_DELAYS_S

  def restore_item(self, make_args, wanted: Optional[dict], step: Optional[int], what: str,
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
        outcome, value = OK, None
      elif candidate not in steps:
        outcome, value = FAILED, CheckpointError(
            f"no checkpoint step {candidate} in {self.directory} (steps: {steps or 'none'})")
      else:
        outcome, value = self._read_step(candidate, make_args, wanted, what, select)
      verdicts = gather(candidate, outcome)
      if len({s for s, _ in verdicts}) > 1:
        raise CheckpointError(f"processes disagree on the checkpoint step to restore in "
                              f"{self.directory}: " + ", ".join(
                                  f"process {i}: {s if s >= 0 else 'none'}"
                                  for i, (s, _) in enumerate(verdicts)))
      if candidate == -1:
        return None
      path = self.step_path(candidate)
      failed = [i for i, (_, o) in enumerate(verdicts) if o == FAILED]
      broken = [i for i, (_, o) in enumerate(verdicts) if o == BROKEN]
      if failed:  # a persistent error that is not corruption (or a wrong target): all stop
        if outcome == FAILED:
          raise value
        raise CheckpointReadError(
            f"checkpoint step {candidate} at {path} could not be read by process(es) "
            f"{', '.join(map(str, failed))} (their logs give the error); nothing was moved")
      if broken:
        cause = short(value) if outcome == BROKEN else (
            f"broken as read by process(es) {', '.join(map(str, broken))}")
        if step is not None:
          raise CheckpointError(f"checkpoint step {candidate} at {path} is broken: {cause}") \
              from (value if outcome == BROKEN else None)
        self._quarantine(candidate, cause)
        skipped.add(candidate)
        continue
      return value, candidate

  def _read_step(self, step, make_args, wanted, what, select):
    """(outcome, value): (OK, restored item), (BROKEN, the error showing it) or (FAILED, the
    error to raise). Failures that do not show corruption are retried (`RETRY_DELAYS_S`)."""
    path = self.step_path(step)
    delays = self._retry_delays()
    attempts = len(delays) + 1
    for attempt in range(attempts):
      try:
        return OK, self._restore_step(step, make_args, wanted, what, select)
      except Broken as e:
        return BROKEN, e.__cause__
      except CheckpointError as e:  # a wrong target: the same on every try
        return FAILED, e
      except Exception as e:  # noqa: BLE001 -- anything else: retried, then reported as is
        if attempt + 1 == attempts:
          log.error("checkpoint step %d at %s: read failed %d times, last: %s", step, path,
                    attempts, short(e))
          error = CheckpointReadError(
              f"cannot read checkpoint step {step} at {path} ({attempts} attempts): "
              f"{short(e)}; nothing was moved (this error does not show that the step is "
              "broken: fix the cause and rerun)")
          error.__cause__ = e
          return FAILED, error
        log.warning("reading checkpoint step %d at %s failed (%s); retrying in %.1f s", step,
                    path, short(e), delays[attempt])
      time.sleep(delays[attempt])  # outside `except`: a failed read's buffers are freed

  def _restore_step(self, step, make_args, wanted, what, select):
    """The restored state item; raises `Broken` (cause chained) only for errors showing the
    step's files are broken, and other errors as they are."""
    path = self.step_path(step)
    try:
      stored = self._reader.metadata(path / STATE)
      if stored is None:
        raise FileNotFoundError(f"no {STATE!r} item metadata in {path}")
    except Exception as e:
      if shows_corruption(e, metadata=True):
        raise Broken() from e
      raise
    if select is not None:
      wanted, args = select(stored)
    else:
      args = make_args()
    if wanted is not None:
      # Checked before reading: a wrong target (another config) is an error, not corruption.
      problem = mismatch(leaf_specs(stored), wanted,
                          f"checkpoint step {step} at {path} does not match {what}")
      if problem:
        raise CheckpointError(problem)
    try:
      return self._reader.restore(path / STATE, args=args)
    except Exception as e:
      if shows_corruption(e, metadata=False):
        raise Broken() from e
      raise

  def _quarantine(self, step, reason: str):
    """Passes over a broken step (read-only: nothing is moved; `Checkpoints` moves it aside)."""
    log.warning("checkpoint step %d at %s is broken, skipping it: %s", step,
                self.step_path(step), reason)


OK, BROKEN, FAILED = 0, 1, 2  # outcomes of reading a step

# Status codes that tensorstore / XLA errors start with; these three mean that data the step's
# metadata points to is absent, shorter than recorded, or does not decode.
_STATUS = re.compile(r"\b(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|"
                     r"ALREADY_EXISTS|PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|"
                     r"ABORTED|OUT_OF_RANGE|UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|"
                     r"UNAUTHENTICATED): ")
_CORRUPT_STATUS = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")


def shows_corruption(error: BaseException, metadata: bool) -> bool:
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
    return shows_corruption(error.__cause__, metadata)
  # Metadata that reads but is not what Orbax wrote (wrong keys or types) is broken.
  return metadata and isinstance(error, (AttributeError, KeyError, TypeError, ValueError))


def gather(step: int, outcome: int) -> list:
  """[(step, outcome)] of every process (one collective; just this process's when alone)."""
  if jax.process_count() == 1:
    return [(int(step), int(outcome))]
  from jax.experimental import multihost_utils

  rows = multihost_utils.process_allgather(np.array([step, outcome], np.int32))
  return [(int(s), int(o)) for s, o in np.asarray(rows).reshape(-1, 2)]


def short(error, limit: int = 400) -> str:
  text = f"{type(error).__name__}: {error}"  # tensorstore errors carry a long JSON spec
  return text if len(text) <= limit else text[:limit] + " ..."


def as_path(p) -> epath.Path:
  p = os.fspath(p)
  return epath.Path(p if "://" in p else os.path.abspath(p))  # local: absolute; gs://: as is


class Broken(Exception):
  """Internal: the step's files could not be read (the cause is chained)."""


__all__ = ["BROKEN", "FAILED", "META", "OK", "RETRY_DELAYS_S", "STATE", "Broken",
           "CheckpointError", "CheckpointNotFoundError", "CheckpointReadError", "StepReader",
           "as_path", "gather", "keystr", "leaf_specs", "mismatch", "short", "shows_corruption"]
