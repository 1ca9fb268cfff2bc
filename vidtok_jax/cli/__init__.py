"""The command-line programs, installed with the package as console scripts:

    vidtok-train        = train.py        (vidtok_jax.cli.train)
    vidtok-eval         = eval.py         (vidtok_jax.cli.eval)
    vidtok-reconstruct  = reconstruct.py  (vidtok_jax.cli.reconstruct)
    vidtok-tokenize     = python -m vidtok_jax.tokenize  (vidtok_jax.cli.tokenize)
    vidtok-convert      = python -m vidtok_jax.cli.convert
    vidtok-check-data   = python -m vidtok_jax.data

`train.py` / `eval.py` / `reconstruct.py` of a checkout are thin scripts calling the same `run`
(the tokenizer's `python -m` entry too).
What `run` adds to `absl.app.run`:
* `--config=configs/vidtok.py:...` works outside a checkout: when that file is not there, the
  copy bundled in the package (`vidtok_jax/train/configs.py`) is used;
* `--help` lists the command's own flags (absl lists only the main module's, and the flags live
  here, not in the script);
* a usage or input error (bad flag value, missing folder, broken or mismatched checkpoint, an
  output that exists) prints one `error: ...` line, not the 50-70-line flag list or a traceback
  (`--verbosity=1` shows the traceback).
"""

import os
import sys

CONFIG_FILE = "vidtok.py"  # `configs/vidtok.py` of a checkout


def bundled_config_path() -> str:
  """The packaged copy of `configs/vidtok.py` (same `get_config`)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train",
                      "configs.py")


def resolve_config_arg(argv):
  """`argv` with `--config=configs/vidtok.py[:ARGS]` pointing to the bundled configs when that
  path does not exist (an installed package run outside a checkout)."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      prefix, value = "--config=", a[len("--config="):]
    elif a == "--config" and i + 1 < len(out):
      prefix, value, i = "", out[i + 1], i + 1
    else:
      continue
    path, sep, rest = value.partition(":")
    if os.path.basename(path) == CONFIG_FILE and not os.path.exists(path):
      out[i] = prefix + bundled_config_path() + sep + rest
  return out


def model_overrides_as_set(argv):
  """`--config.model.FIELD=VALUE` (the scripts' spelling) -> `--set FIELD=VALUE`, for the
  argparse commands (`vidtok-convert`, `python -m vidtok_jax.planning`) whose `--config` is a
  variant name: one override spelling everywhere, the older `--set` kept."""
  out = []
  for a in argv:
    if a.startswith("--config.model.") and "=" in a:
      out += ["--set", a[len("--config.model."):]]
    elif a.startswith("--config."):
      raise SystemExit(f"error: {a.split('=')[0]}: only model fields can be set here "
                       "(--config.model.FIELD=VALUE or --set FIELD=VALUE)")
    else:
      out.append(a)
  return out


def _user_errors():
  """Exceptions that mean bad input, reported as one line."""
  from absl import app

  from vidtok_jax.files import OutputExistsError
  from vidtok_jax.train.checkpoint import CheckpointError

  return (app.UsageError, CheckpointError, OutputExistsError, FileNotFoundError,
          NotADirectoryError, ValueError)


def _error(message, code: int):
  prog = os.path.basename(sys.argv[0]) if sys.argv else "vidtok"
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _prepare(module_name: str):
  """`--help` of the command in `module_name`: its flags and its module doc."""
  from absl import flags

  fv = flags.FLAGS
  by_module = fv.flags_by_module_dict()
  for name in (module_name, "vidtok_jax.cli.flags"):
    for flag in by_module.get(name, []):
      fv.register_key_flag_for_module(sys.argv[0], flag)
  main_module = sys.modules.get("__main__")
  if main_module is not None:  # absl prints the main module's doc with --help
    main_module.__doc__ = sys.modules[module_name].__doc__


def parse_flags(argv):
  """absl's flag parsing with a bad value (a misspelt config variant, a malformed number)
  reported as one `error:` line, exit status 2, instead of absl's "FATAL Flags parsing error"
  with the config file's traceback and a pointer to --helpfull."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    message = lines[0] if lines else type(e).__name__
    if len(lines) > 1 and "Traceback (most recent call last)" in str(e):
      # A config file raised: its flag and the exception's last line say what is wrong.
      message = f"{lines[0].split(': Error whilst', 1)[0]}: {lines[-1]}"
    _error(message.removeprefix("flag "), 2)


def guard(main):
  """`main` with its user errors (`_user_errors`) reported as one `error:` line and exit status
  2 (usage) or 1 (input); `--verbosity=1` lets the traceback through."""
  from absl import app, flags

  def guarded(argv):
    try:
      return main(argv)
    except _user_errors() as e:
      if flags.FLAGS["verbosity"].value >= 1:
        raise
      _error(e, 2 if isinstance(e, app.UsageError) else 1)

  return guarded


def exit_now_on_failure(main, when):
  """`main` that, when `when()` is true at the time of a failure (an exception, or a non-zero
  `sys.exit`), logs the error, flushes the logs and ends the process with `os._exit` (status 1,
  or the `sys.exit` code): no atexit handlers, no joining of threads. For multi-process runs,
  whose normal exit waits for every peer (`jax.distributed.shutdown`) while the peers may wait in
  a collective for this process."""
  import logging
  import traceback

  def wrapped(argv):
    try:
      return main(argv)
    except BaseException as e:  # pylint: disable=broad-except
      if not when():
        raise
      if isinstance(e, SystemExit):
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 0:
          raise
      else:
        code = 1
        logging.error("%s", "".join(traceback.format_exception(e)).rstrip())
      logging.error("exiting with status %d without waiting for the other processes", code)
      for h in logging.getLogger().handlers + [sys.stdout, sys.stderr]:
        try:
          h.flush()
        except Exception:  # pylint: disable=broad-except  (a closed stream: nothing to flush)
          pass
      os._exit(code)

  return wrapped


def run(module_name: str, main, hard_exit_when=None):
  """`absl.app.run(main)` for the command defined in `module_name` (see the module doc).
  `hard_exit_when`: optional callable; a failure while it returns true ends the process at once
  (`exit_now_on_failure`)."""
  from absl import app

  _prepare(module_name)
  guarded = guard(main)
  if hard_exit_when is not None:
    guarded = exit_now_on_failure(guarded, hard_exit_when)
  app.run(guarded, argv=resolve_config_arg(sys.argv), flags_parser=parse_flags)


def check_positive(**values):
  """`absl.app.UsageError` naming the first flag whose value is not > 0 (None is skipped)."""
  from absl import app

  for name, value in values.items():
    if value is not None and not value > 0:
      raise app.UsageError(f"--{name} must be > 0, got {value}")
