"""The training loop behind `train.py`: mesh, state (fresh, `init_from` or resumed), the jitted
step, logging, validation, checkpoints, preemption.

    from vidtok_jax.train.loop import train_and_evaluate
    state = train_and_evaluate(config, workdir)   # config: configs/vidtok.py get_config(...)

Restarting with the same config and workdir resumes exactly: the state (params, optimizer
moments, EMA, LeCAM, discriminator statistics, rng, step) comes from the latest good checkpoint,
the data pipeline is step-indexed (batch s is a pure function of the seed and s) and the step's
randomness is `fold_in(state.rng, step)`. So a killed and restarted run ends bitwise equal (CPU)
to an uninterrupted one.

Host work per step: the next batch (tf.data prefetches in background threads) and the metrics
of the PREVIOUS step, read after the current step is dispatched so the device never waits on the
host. A run of `config.train.max_consecutive_nonfinite` skipped (non-finite) steps stops with
`NonFiniteError` naming the step and the terms; the train step never lets a non-finite value
into the state, and `Checkpoints.save` refuses one anyway.
"""

import collections
import logging
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from vidtok_jax.train import compile_cache
from vidtok_jax.train import precision as precision_lib
from vidtok_jax.train.compile_options import compiler_options
from vidtok_jax.data import config as data_config_lib
from vidtok_jax.train import checkpoint as ckpt_lib
from vidtok_jax.train import mesh as mesh_lib
from vidtok_jax.train import state as state_lib
from vidtok_jax.train import step as step_lib
from vidtok_jax.train import validation

log = logging.getLogger("vidtok_jax.train")

BEST_METRIC = "val/psnr"
# How long a process that has its train step waits for the others to compile theirs: generous,
# a full-size step compiles for minutes on a busy host.
STEP_READY_TIMEOUT_S = 3600
# Metrics written as interval means; the rest (counters, flags) as their latest value.
_LATEST = ("step", "skipped", "nonfinite_streak", "disc_factor", "disc_factor_d")


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss, gradient or statistic."""


def validate_config(config) -> None:
  """Raise ValueError naming the first bad top-level loop field."""
  for name in ("total_steps", "log_every", "checkpoint_every", "keep_last"):
    v = config.get(name)
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"config.{name}: must be a positive int, got {v!r}")
  # 0 turns validation (eval_every) / the image samples (sample_every) off.
  for name in ("eval_every", "sample_every", "eval_clips", "keep_best", "profile_steps"):
    v = config.get(name)
    if not isinstance(v, int) or v < 0:
      raise ValueError(f"config.{name}: must be an int >= 0, got {v!r}")
  m = config.train.max_consecutive_nonfinite
  if not isinstance(m, int) or m < 1:
    raise ValueError(f"config.train.max_consecutive_nonfinite: must be a positive int, got {m!r}")
  precision_lib.resolve_precision(config.train.get("precision", "auto"),
                                  precision_lib.resolve_dtype(config.train.dtype))
  mesh_lib.check_mesh_config(config, jax.device_count())
  # The data fields too, before anything compiles: a missing folder or a bad size is refused in
  # a second, not after the state init's compile.
  data_config_lib.resolve(config, jax.process_count())


class _PreemptionFlag:
  """SIGTERM sets a flag (the loop saves and returns at the next step boundary) instead of
  killing the process mid-step. Single-process only: with several processes all hosts must
  agree on the step, which `CheckpointManager.reached_preemption` (JAX's preemption sync) does:
  `jax.distributed.initialize` installs its own SIGTERM handler (the preemption notifier) that a
  Python handler would replace, so none is installed then."""

  def __init__(self):
    self.set = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: saving a checkpoint at the end of this step, then stopping")
    self.set = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _init_state(config, shardings, lpips_params):
  """A fresh state: `init_from` params (stage 2 / fine-tuning) or a new initialisation."""
  tc = config.train
  params = None
  if tc.init_from:
    log.info("initialising the autoencoder from %s%s", tc.init_from,
             " (EMA weights)" if tc.init_from_ema else "")
    params = ckpt_lib.load_init_params(tc.init_from, config, use_ema=tc.init_from_ema)
  elif config.stage == 2:
    raise ValueError("stage 2 starts from a stage-1 model: set --config.train.init_from to a "
                     "stage-1 workdir, a `convert to-flax` folder or an official .ckpt")
  create = jax.jit(lambda rng, p, lp: state_lib.create_train_state(config, rng, p, lp),
                   out_shardings=shardings)
  return create(jax.random.PRNGKey(config.seed), params, lpips_params)


def resolve_precision(config):
  """A copy of `config` with `train.dtype` ("auto": bf16 on GPU/TPU, float32 on CPU) and
  `train.precision` resolved for this backend, the requested dtype kept as
  `train.requested_dtype`. `config.model` (saved with checkpoints, read by inference) keeps its
  own float32 fields; `state.model_config` applies the training ones."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    resolved = state_lib.model_config(config)
    config.train.requested_dtype = config.train.dtype
    config.train.dtype = resolved.dtype
    config.train.precision = resolved.precision
  return config


def _restore_or_init(config, mesh, ckpts, lpips_params):
  abstract = state_lib.abstract_train_state(config, lpips_params=lpips_params)
  shardings = mesh_lib.state_shardings(mesh, abstract, fsdp=config.train.mesh.fsdp,
                                       fsdp_axis=config.train.mesh.fsdp_axis)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  restored = ckpts.restore(target.replace(lpips_params=None))
  if restored is None:
    return _init_state(config, shardings, lpips_params), shardings, 0
  state, step = restored
  log.info("resumed from the checkpoint of step %d", step)
  if lpips_params is not None:
    state = state.replace(lpips_params=jax.device_put(lpips_params, shardings.lpips_params))
  return state, shardings, step


def _nonfinite_terms(m) -> list:
  return sorted(k[len("finite/"):] for k, v in m.items() if k.startswith("finite/") and v < 0.5)


class _Monitor:
  """Host side of the metrics: non-finite accounting, interval means, console/TensorBoard."""

  def __init__(self, config, writer, start_step):
    self.config, self.writer = config, writer
    self.limit = config.train.max_consecutive_nonfinite
    self.buf = collections.defaultdict(list)
    self.t_last, self.s_last = time.monotonic(), start_step
    self.first_bad = None  # (step, terms) that started the current non-finite streak

  def add(self, m):
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    step = int(m["step"]) + 1  # iterations completed, as checkpoints count them
    if m["nonfinite"] > 0:
      terms = _nonfinite_terms(m)
      if self.first_bad is None or m["nonfinite_streak"] == 1:
        self.first_bad = (step, terms)
      log.warning("step %d: update skipped, non-finite %s (%d in a row, %d in total)", step,
                  ", ".join(terms), m["nonfinite_streak"], m["skipped"])
      if m["nonfinite_streak"] >= self.limit:
        first, first_terms = self.first_bad
        raise NonFiniteError(
            f"stopping at step {step}: {int(m['nonfinite_streak'])} consecutive steps with "
            f"non-finite values (config.train.max_consecutive_nonfinite={self.limit}); at step "
            f"{step}: {', '.join(terms)}; the streak began at step {first} with "
            f"{', '.join(first_terms)}. Updates were skipped, so the state and its checkpoints "
            "hold only finite values; lower the learning rate or check the data.")
    for k, v in m.items():
      self.buf[k].append(v)

  def flush(self, step, clips_per_step):
    """Write interval means at `step` (steps completed) with throughput and ETA."""
    if not self.buf:
      return
    now = time.monotonic()
    out = {("train/" + k): (v[-1] if k in _LATEST else float(np.mean(v)))
           for k, v in self.buf.items() if not k.startswith("finite/")}
    out.pop("train/step", None)
    dt, ds = now - self.t_last, step - self.s_last
    if ds > 0 and dt > 0:
      out["perf/steps_per_sec"] = ds / dt
      out["perf/clips_per_sec_per_device"] = ds * clips_per_step / dt / jax.device_count()
      eta = (self.config.total_steps - step) * dt / ds
      log.info("step %d/%d  total_loss %.4g  nll %.4g  rec %.4g  p %.4g  d_loss %.4g  "
               "%.2f steps/s  %.2f clips/s/device  ETA %s", step, self.config.total_steps,
               out.get("train/total_loss", np.nan), out.get("train/nll_loss", np.nan),
               out.get("train/rec_loss", np.nan), out.get("train/p_loss", np.nan),
               out.get("train/disc_loss", np.nan), out["perf/steps_per_sec"],
               out["perf/clips_per_sec_per_device"], time.strftime("%H:%M:%S", time.gmtime(eta)))
    self.writer.write_scalars(step, out)
    self.buf.clear()
    self.t_last, self.s_last = now, step


def _due(step, every, total):
  """Whether a periodic action with period `every` (0: never) runs at `step`."""
  return every > 0 and (step % every == 0 or step == total)


def _validation_on(config) -> bool:
  """Validation (PSNR, and the image samples drawn from its clips) runs unless `eval_every` or
  `eval_clips` is 0."""
  return config.eval_clips > 0 and config.eval_every > 0


def train_and_evaluate(config, workdir: str):
  """Train `config` in `workdir` (TensorBoard events, checkpoints/) to `config.total_steps`.

  Returns the final `TrainState`. Resumes from `workdir/checkpoints` when it holds a checkpoint.
  Raises `NonFiniteError` after too many consecutive non-finite steps.
  """
  validate_config(config)
  config = resolve_precision(config)
  # A run refused before its first step (a checkpoint that does not match the config, a bad
  # init_from, no readable videos) must leave no stray files: note what is new, remove it on
  # such a failure. A compilation cache folder this run created (WORKDIR/xla_cache by default)
  # counts as new; the events file is only created once the restore succeeded.
  cache_path = compile_cache.cache_dir(config.compilation_cache_dir, workdir)
  created = [p for p in (workdir, os.path.join(workdir, "checkpoints")) if not os.path.exists(p)]
  ours = [cache_path] if cache_path and not os.path.exists(cache_path) and _inside(
      cache_path, workdir) else []
  progress = {"started": False}
  try:
    return _train(config, workdir, cache_path, progress)
  except BaseException:
    if not progress["started"] and jax.process_index() == 0:
      for p in ours:  # this run's new compilation cache folder (inside the workdir)
        compile_cache.disable(p)
        shutil.rmtree(p, ignore_errors=True)
      for p in reversed(created):  # the checkpoints folder first, then the workdir
        _remove_if_only_ours(p)
    raise


def _inside(path, folder) -> bool:
  path, folder = os.path.abspath(path), os.path.abspath(folder)
  return os.path.commonpath([path, folder]) == folder


def _remove_if_only_ours(path):
  """Remove `path` (a folder this run created) when it holds nothing but empty folders and
  TensorBoard event files of this run."""
  if not os.path.isdir(path):
    return
  for root, _, files in os.walk(path):
    if any(not f.startswith("events.out.tfevents.") for f in files):
      log.warning("not removing %s: it holds files (%s)", path, root)
      return
  shutil.rmtree(path, ignore_errors=True)


def _train(config, workdir: str, cache_path, progress: dict):
  os.makedirs(workdir, exist_ok=True)
  cache = compile_cache.enable(cache_path)
  mesh = mesh_lib.make_mesh(config)
  log.info("%d process(es), %d device(s) (%s), mesh %s", jax.process_count(), jax.device_count(),
           jax.devices()[0].platform, dict(mesh.shape))
  log.info("precision: %s compute (config.train.dtype=%s), conv/matmul precision %s; params, "
           "optimizer state, norm statistics and loss reductions float32",
           config.train.dtype, config.train.requested_dtype, config.train.precision)
  log.info("compilation cache: %s", cache or "off")
  # keep-best ranks by validation PSNR at checkpoint steps: off without validation.
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), keep_last=config.keep_last,
                               keep_best=config.keep_best if _validation_on(config) else 0,
                               best_metric=BEST_METRIC, best_mode="max",
                               async_save=config.async_checkpointing, config=config)
  try:
    lpips_params = None
    if config.loss.perceptual_weight > 0:
      from vidtok_jax.metrics.lpips import load_lpips_params  # only with the perceptual term

      lpips_params = load_lpips_params(net=config.loss.lpips_net)
    state, shardings, start = _restore_or_init(config, mesh, ckpts, lpips_params)
  except BaseException:
    ckpts.close()
    raise
  # Created only now, so a refused restore leaves no events file behind.
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  total = config.total_steps
  if start == 0 and jax.process_index() == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
    parameter_overview.log_parameter_overview(jax.device_get(state.g_params["model"]),
                                              msg="autoencoder parameters")
    parameter_overview.log_parameter_overview(jax.device_get(state.d_params),
                                              msg="discriminator parameters")
  if start >= total:
    log.info("checkpoint step %d >= total_steps %d: nothing to train", start, total)
    ckpts.close()
    return state

  from vidtok_jax.data import make_train_iterator  # tf.data only once training starts

  data = make_train_iterator(config, start_step=start)
  batch_sh = mesh_lib.batch_sharding(mesh)
  step_fn = jax.jit(step_lib.make_train_step(config, mesh=mesh),
                    in_shardings=(shardings, batch_sh),
                    out_shardings=(shardings, None), donate_argnums=0,
                    compiler_options=compiler_options())
  batch = mesh_lib.shard_batch(mesh, next(data))
  progress["started"] = True  # restored (or initialised) and reading data
  t0 = time.monotonic()
  with compile_cache.Watch() as watch:
    step_fn = step_fn.lower(state, batch).compile()
  dt = time.monotonic() - t0
  who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
  log.info(who + {"cache": "train step loaded from the compilation cache in %.1f s (not compiled "
                           "again)",
                  "compiled": "compiled the train step in %.1f s (now in the compilation cache)",
                  "uncached": "compiled the train step in %.1f s"}[watch.source], dt)
  writer.write_scalars(start, {"perf/compile_seconds": dt,
                               "perf/compile_cache_hit": float(watch.source == "cache")})
  if jax.process_count() > 1:
    # The first step's collectives must not start while a peer still compiles: a process that
    # loaded its step from the cache would otherwise wait there alone and fail (gloo gives up
    # after 30 s). A peer that dies meanwhile ends the waiting processes too (the coordination
    # service, within train.py's heartbeat timeout).
    waited = compile_cache.barrier(f"vidtok_train_step_ready_{start}", STEP_READY_TIMEOUT_S)
    log.info("%sall %d processes have the train step (waited %.1f s)", who,
             jax.process_count(), waited)

  eval_set = (validation.load_eval_set(config, config.eval_clips) if _validation_on(config)
              else None)
  eval_fn = validation.make_eval_step(config, mesh) if eval_set is not None else None
  eval_params = lambda s: (s.ema_params if config.eval_use_ema and s.ema_params is not None
                           else s.g_params)["model"]

  def run_eval(s, step, want_sample):
    psnr, (x0, r0) = validation.evaluate(eval_fn, eval_params(s), eval_set, mesh,
                                         config.data.global_batch_size)
    log.info("step %d: validation PSNR %.3f dB on %d window(s)", step, psnr, config.eval_clips)
    writer.write_scalars(step, {BEST_METRIC: psnr})
    if want_sample:
      writer.write_images(step, {"val/input_top_recon_bottom": validation.sample_grid(x0, r0)})
    return psnr

  if start == 0 and eval_set is not None:
    run_eval(state, 0, config.sample_every > 0)

  monitor = _Monitor(config, writer, start)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.log_every, every_secs=None)]
  if config.profile_steps and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                          first_profile=start + config.log_every + 1,
                                          every_secs=None))
  clips_per_step = config.data.global_batch_size
  pending = None  # metrics of the previous step, read after the next one is dispatched
  with _PreemptionFlag() as preempt:
    step = start
    while step < total:
      state, metrics = step_fn(state, batch)
      step += 1
      if pending is not None:
        monitor.add(pending)
      pending = metrics
      for hook in hooks:
        hook(step)
      preempted = preempt.set if jax.process_count() == 1 else ckpts.reached_preemption(step)
      if _due(step, config.log_every, total) or preempted:
        monitor.add(pending)
        pending = None
        monitor.flush(step, clips_per_step)
      psnr = None
      if eval_set is not None and (_due(step, config.eval_every, total) or
                                   _due(step, config.sample_every, total)):
        psnr = run_eval(state, step, _due(step, config.sample_every, total))
      if _due(step, config.checkpoint_every, total) or preempted:
        if pending is not None:  # never save past an unchecked step
          monitor.add(pending)
          pending = None
        ckpts.save(step, state, metrics={BEST_METRIC: psnr} if psnr is not None else None,
                   force=preempted)
      if preempted:
        ckpts.wait_until_finished()
        log.warning("preempted: saved step %d; rerun the same command to resume", step)
        break
      if step < total:
        batch = mesh_lib.shard_batch(mesh, next(data))
    if pending is not None:
      monitor.add(pending)
  ckpts.wait_until_finished()
  ckpts.close()
  data.close()
  writer.flush()
  return state


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
