"""The persistent compilation cache (`vidtok_jax.train.compile_cache`): a restarted process loads the
program its predecessor compiled, and says so. (`train_loop_test` checks the same on a
restarted `train.py` run.)"""

import json
import os
import subprocess
import sys

from vidtok_jax.train.compile_cache import cache_dir

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp
from vidtok_jax.train import compile_cache
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


TWO = r"""
import json, os, sys
import jax, jax.numpy as jnp
import numpy as np
jax.distributed.initialize(f"localhost:{sys.argv[2]}", 2, int(sys.argv[3]))
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vidtok_jax.train import compile_cache
path = compile_cache.enable(compile_cache.cache_dir("auto", sys.argv[1]))
sh = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d"))
f = jax.jit(lambda x: jnp.sin(x) @ x.T + x.sum(), in_shardings=sh, out_shardings=sh)
with compile_cache.Watch() as w:
  f.lower(jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=sh)).compile()
compile_cache.barrier("compiled", 60)
print(json.dumps({"source": w.source, "path": os.path.relpath(path, sys.argv[1])}))
"""


def test_every_process_of_a_job_finds_its_own_entries(tmp_path):
  """JAX writes cache entries from process 0 only and, on CPU, the other processes' keys differ
  from its keys: `enable` gives each process its own folder and lets it write there, so after a
  restart every process loads its program."""
  import socket

  def job():
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", TWO, str(tmp_path), str(port), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    out = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, out):
      assert p.returncode == 0, e[-3000:]
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in out]

  first, second = job(), job()
  assert [r["path"] for r in first] == [f"xla_cache/process-{i}-of-2" for i in range(2)]
  assert [r["source"] for r in first] == ["compiled", "compiled"]
  assert [r["source"] for r in second] == ["cache", "cache"], second
