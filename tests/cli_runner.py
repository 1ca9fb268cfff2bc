"""Runs several invocations of one command in one process, for tests/cli_test.py (one process
per command instead of one per case: each start imports jax, and TensorFlow for most).

    python tests/cli_runner.py SPEC.json RESULT.json

SPEC: {"module": "vidtok_jax.cli.eval", "script": "eval.py",
       "cases": {name: {"argv": [...], "cwd": folder}}}. Each case resets the flags, parses its
argv as `vidtok_jax.cli.run` does (the bundled-config fallback included) and runs the
command's main under `vidtok_jax.cli.guard`, its stdout, stderr (file descriptors) and exit
status captured. RESULT: {name: {"returncode", "stdout", "stderr"}}.
"""

import importlib
import json
import os
import sys
import tempfile
import traceback


def _invoke(main, argv):
  from absl import flags

  from vidtok_jax.cli import guard, parse_flags, resolve_config_arg

  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # the --config.FIELD overrides a parsed --config registered
  flags.FLAGS.unparse_flags()
  try:
    rest = parse_flags(resolve_config_arg(argv))  # as `run` hands it to absl.app.run
    guard(main)(rest)
    return 0
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # noqa: BLE001 -- reported like an uncaught error
    traceback.print_exc()
    return 1


def _captured(main, argv):
  """`(returncode, stdout, stderr)` of one case, captured at the file-descriptor level."""
  with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err:
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
    try:
      code = _invoke(main, argv)
    finally:
      sys.stdout.flush(), sys.stderr.flush()
      os.dup2(saved[0], 1), os.dup2(saved[1], 2)
      os.close(saved[0]), os.close(saved[1])
    out.seek(0), err.seek(0)
    return code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def main(spec_path, result_path):
  with open(spec_path) as f:
    spec = json.load(f)
  from absl import app

  from vidtok_jax.cli import _prepare

  module = importlib.import_module(spec["module"])
  sys.argv = [spec["script"]]
  app.define_help_flags()
  _prepare(spec["module"])
  results = {}
  for name, case in spec["cases"].items():
    os.chdir(case["cwd"])
    sys.argv = [spec["script"], *case["argv"]]
    code, stdout, stderr = _captured(module.main, sys.argv)
    results[name] = {"returncode": code, "stdout": stdout, "stderr": stderr}
  with open(result_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
