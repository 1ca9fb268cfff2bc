"""The persistent XLA compilation cache of training runs, and whether a compile came from it.

    path = compile_cache.enable(compile_cache.cache_dir(config.compilation_cache_dir, workdir))
    with compile_cache.Watch() as w:
      compiled = jitted.lower(*args).compile()
    w.source  # "cache" (loaded from the persistent cache), "compiled" or "uncached"

A restarted or preempted job with the same program loads the compiled step instead of compiling
it again (minutes for the full-size train step on a TPU slice).
"""

import os
from typing import Optional

import jax
from jax import monitoring

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
  """Points JAX's persistent cache at `path` (every program cached, however quick to compile).
  No-op for None. Re-initialises the cache when this process already used another directory."""
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    from jax.experimental.compilation_cache import compilation_cache as cc

    cc.reset_cache()  # the cache is set up once per process, at its first compile
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def disable(path: Optional[str] = None) -> None:
  """Turns the persistent cache off again (when `path` is None or the directory in use), e.g.
  before its directory is removed."""
  if path is not None and jax.config.jax_compilation_cache_dir != path:
    return
  jax.config.update("jax_compilation_cache_dir", None)
  from jax.experimental.compilation_cache import compilation_cache as cc

  cc.reset_cache()


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
