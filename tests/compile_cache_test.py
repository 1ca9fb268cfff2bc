"""The persistent compilation cache (`vidtok_jax.compile_cache`): a restarted process loads the
program its predecessor compiled, and says so. (`train_loop_test` checks the same on a
restarted `train.py` run.)"""

import json
import subprocess
import sys

from vidtok_jax.compile_cache import cache_dir

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
from vidtok_jax import compile_cache
compile_cache.enable(compile_cache.cache_dir("auto", sys.argv[1]))
with compile_cache.Watch() as w:
  jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0).lower(jnp.ones((64, 64))).compile()
print(json.dumps({"source": w.source, "hits": w.hits, "misses": w.misses}))
"""


def test_restarted_process_loads_from_the_cache(tmp_path):
  def run():
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])

  first, second = run(), run()
  # (jnp.ones runs its own small program: every program is counted)
  assert first["source"] == "compiled" and first["hits"] == 0 and first["misses"] >= 1
  assert second == {"source": "cache", "hits": first["misses"], "misses": 0}
  assert any((tmp_path / "xla_cache").iterdir())  # "auto": under the workdir


def test_off_and_explicit_paths():
  assert cache_dir("off", "w") is None and cache_dir("", "w") is None
  assert cache_dir("/c", "w") == "/c"
