"""The persistent XLA compilation cache of training runs, and whether a compile came from it.

    path = compile_cache.enable(compile_cache.cache_dir(config.compilation_cache_dir, workdir))
    with compile_cache.Watch() as w:
      compiled = jitted.lower(*args).compile()
    w.source  # "cache" (loaded from the persistent cache), "compiled" or "uncached"

A restarted or preempted job with the same program loads the compiled step instead of compiling
it again (minutes for the full-size train step on a TPU slice).

Several processes (`train.py --distributed`): JAX writes cache entries from process 0 only
(`jax/_src/compiler.py` `_cache_write`, to spare shared filesystems concurrent writes). Whether the
other processes can read them depends on the platform's cache key (`jax/_src/cache_key.py`):
* CPU: the key hashes the topology of the devices, whose fingerprint differs per process, so
  process i > 0 never finds an entry and compiles again on every restart while process 0 loads.
* GPU: the device assignment is stripped from the key "to use cache key as invariant between
  processes" (JAX's comment): shared keys, process 0's entries serve all when the folder is shared.
* TPU: the key hashes the slice's topology and the global device assignment, the same on every
  host: shared keys as on GPU (read from the source; not run on a pod here).
`jax_share_binary_between_hosts` (process 0 compiles, the others wait for its executable in the
distributed key-value store) waits under each process's OWN key: on CPU the keys differ and the
others wait out its 20-minute timeout; after a restart where process 0 loads from the cache it
never publishes, so a process without the entry waits likewise. It is left off.
What `enable` does instead with several processes: every process keeps its own entries in its own
subfolder (`PATH/process-I-of-N`) and writes them itself, so every process finds its programs
after a restart on every platform, whether or not the folder is shared between hosts, and no two
processes ever write the same file. (N copies of each program: the price of not depending on the
key being shared.) A process that loads fast still must not enter the first collective while
another compiles (gloo on CPU gives up after 30 s): the loop waits at `barrier` after the compile.
"""

import inspect
import logging
import os
import time
import warnings
from typing import Optional

import jax
from jax import monitoring

log = logging.getLogger(__name__)

_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
OFF = ("", "off", "none")


def cache_dir(setting: Optional[str], workdir: str) -> Optional[str]:
  """`config.compilation_cache_dir` -> a path, or None when off: "auto" is WORKDIR/xla_cache."""
  setting = "" if setting is None else str(setting)
  if setting.lower() in OFF:
    return None
  return os.path.join(workdir, "xla_cache") if setting == "auto" else setting


def enable(path: Optional[str]) -> Optional[str]:
  """Points JAX's persistent cache at `path` (every program cached, however quick to compile)
  and returns the folder in use: `path`, or with several processes this process's own
  `path/process-I-of-N` (see the module doc). No-op for None. Re-initialises the cache when this
  process already used another directory."""
  if path is None:
    return None
  if jax.process_count() > 1:
    path = os.path.join(path, f"process-{jax.process_index()}-of-{jax.process_count()}")
    _write_from_every_process()
  os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()  # the cache is set up once per process, at its first compile
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def disable(path: Optional[str] = None) -> None:
  """Turns the persistent cache off again (when `path` is None, or the directory in use is
  `path` or inside it: a process's own subfolder), e.g. before its directory is removed."""
  current = jax.config.jax_compilation_cache_dir
  if path is not None and not (current and os.path.commonpath(
      [os.path.abspath(current), os.path.abspath(path)]) == os.path.abspath(path)):
    return
  jax.config.update("jax_compilation_cache_dir", None)
  from jax.experimental.compilation_cache import compilation_cache as cc

  cc.reset_cache()


def _write_from_every_process() -> bool:
  """Let processes other than 0 write their persistent-cache entries (JAX skips them).

  Wraps the private `jax._src.compiler._cache_write` (checked against the signature of jax
  0.10.2): process 0, and programs with host callbacks (never cached), go through JAX's own
  function; the others store the entry with `compilation_cache.put_executable_and_time`, as JAX
  does for process 0. On a JAX whose internals differ this only warns: the run stays correct
  (the loop's barrier), processes other than 0 just compile again after a restart."""
  from jax._src import compilation_cache as jax_cc
  from jax._src import compiler, distributed

  original = compiler._cache_write
  if getattr(original, "_vidtok_every_process", False):
    return True
  expected = ["cache_key", "compile_time_secs", "module_name", "backend", "executable",
              "host_callbacks"]
  if (list(inspect.signature(original).parameters) != expected
      or not hasattr(jax_cc, "put_executable_and_time")):
    log.warning("this JAX's compilation cache internals differ from jax 0.10.2: only process 0 "
                "writes cache entries, the others compile again after a restart")
    return False

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable,
                  host_callbacks):
    if distributed.global_state.process_id == 0 or host_callbacks:
      return original(cache_key, compile_time_secs, module_name, backend, executable,
                      host_callbacks)
    if compile_time_secs < jax.config.jax_persistent_cache_min_compile_time_secs:
      return None
    try:
      jax_cc.put_executable_and_time(cache_key, module_name, executable, backend,
                                     int(compile_time_secs))
    except Exception as e:  # pylint: disable=broad-except  (as JAX: a failed write only warns)
      warnings.warn(f"error writing persistent compilation cache entry for {module_name!r}: "
                    f"{type(e).__name__}: {e}")
    return None

  cache_write._vidtok_every_process = True
  compiler._cache_write = cache_write
  return True


def barrier(name: str, timeout_s: float) -> float:
  """Wait until every process reached `barrier(name)`; returns the seconds waited (0 with one
  process). Uses the coordination service (`jax.distributed`'s client), not a collective: no
  gloo/NCCL 30-s timeouts, nothing to compile. Raises when `timeout_s` passes or a process
  failed (the coordination service reports dead peers)."""
  if jax.process_count() == 1:
    return 0.0
  from jax._src import distributed

  t0 = time.monotonic()
  distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
  return time.monotonic() - t0


class Watch:
  """Counts persistent-cache hits and misses of the compiles inside the `with` block."""

  def __init__(self):
    self.hits = self.misses = 0

  def _on(self, event, **kwargs):
    del kwargs
    if event == _HIT:
      self.hits += 1
    elif event == _MISS:
      self.misses += 1

  def __enter__(self):
    monitoring.register_event_listener(self._on)
    return self

  def __exit__(self, *exc):
    monitoring.unregister_event_listener(self._on)

  @property
  def source(self) -> str:
    if self.hits and not self.misses:
      return "cache"
    return "compiled" if self.misses else "uncached"
