"""Runs the installed console scripts (`vidtok-*` next to the interpreter) as a user does, for
tests/command_matrix_test.py: a set of named cases with dependencies, at most `jobs` at a time.

Each case runs in its own empty working folder (so a default output such as eval's
`results.json` lands there), its stdout and stderr captured to files. The environment is the
caller's without any `JAX_*` setting (a user's shell has JAX's defaults; the suite's conftest
numerics are in-process only), on the CPU.
"""

import dataclasses
import os
import pathlib
import resource
import shlex
import subprocess
import sys
import time
from typing import Callable, Optional


def scripts_dir() -> pathlib.Path:
  """Where pip put the console scripts: beside this interpreter (a venv's bin/)."""
  return pathlib.Path(sys.executable).parent


def user_env(extra: Optional[dict] = None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  # On the CPU like the rest of the suite: concurrent commands must not each claim an
  # accelerator's memory.
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra or {})
  return env


@dataclasses.dataclass
class Case:
  argv: list  # argv[0]: a console script name, e.g. "vidtok-eval"
  env: dict = dataclasses.field(default_factory=dict)
  after: list = dataclasses.field(default_factory=list)  # cases that must have succeeded first
  prepare: Optional[Callable[[], None]] = None  # in-process set-up, run just before the start
  timeout_s: float = 1200.0  # a hang guard only: a loaded 2-core host is slow


@dataclasses.dataclass
class Result:
  name: str
  argv: list
  returncode: Optional[int]
  stdout: str
  stderr: str
  seconds: float
  skipped: str = ""  # why it did not run
  cpu_s: float = 0.0  # user + system time of the process

  def report(self, tail: int = 4000) -> str:
    if self.skipped:
      return f"{self.name}: not run: {self.skipped}"
    return (f"{self.name}: exit {self.returncode} after {self.seconds:.0f} s\n$ "
            f"{shlex.join(map(str, self.argv))}\n--- stdout (tail)\n{self.stdout[-tail:]}\n"
            f"--- stderr (tail)\n{self.stderr[-tail:]}")


class Matrix:
  """`Matrix(cases, root).run()`, then `ok(name)` / `done(name)` per case."""

  def __init__(self, cases: dict, root: pathlib.Path, jobs: int = 2):
    self.cases, self.root, self.jobs = cases, pathlib.Path(root), jobs
    self.results = {}
    for name, case in cases.items():
      unknown = [d for d in case.after if d not in cases]
      assert not unknown, f"{name}: unknown dependencies {unknown}"

  def cwd(self, name) -> pathlib.Path:
    return self.root / name

  def _start(self, name):
    case = self.cases[name]
    cwd = self.cwd(name)
    cwd.mkdir(parents=True)
    if case.prepare is not None:
      try:
        case.prepare()
      except Exception as e:  # noqa: BLE001 -- reported as this case's failure
        self.results[name] = Result(name, case.argv, None, "", "", 0.0, f"set-up failed: {e!r}")
        return None
    argv = [str(scripts_dir() / case.argv[0]), *map(str, case.argv[1:])]
    out, err = open(cwd.with_suffix(".out"), "w+"), open(cwd.with_suffix(".err"), "w+")
    proc = subprocess.Popen(argv, cwd=cwd, env=user_env(case.env), stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL)
    return proc, out, err, time.monotonic(), [case.argv[0], *argv[1:]]

  def _blocker(self, name) -> Optional[str]:
    """None when `name` can start, "wait" while a dependency runs, else why it never will."""
    for d in self.cases[name].after:
      r = self.results.get(d)
      if r is None:
        return "wait"
      if r.returncode != 0:
        return f"{d} failed"
    return None

  def run(self):
    t0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    pending, running = list(self.cases), {}
    while pending or running:
      for name in list(pending):
        if len(running) >= self.jobs:
          break
        why = self._blocker(name)
        if why == "wait":
          continue
        pending.remove(name)
        if why:
          self.results[name] = Result(name, self.cases[name].argv, None, "", "", 0.0, why)
          continue
        started = self._start(name)
        if started is not None:
          running[name] = started
      time.sleep(0.2)
      for name, (proc, out, err, start, argv) in list(running.items()):
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # (its own CPU time, unlike poll)
        if not pid:
          if time.monotonic() - start < self.cases[name].timeout_s:
            continue
          proc.kill()
          pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        self.results[name] = Result(name, argv, proc.returncode, out.read(), err.read(),
                                    time.monotonic() - start,
                                    cpu_s=usage.ru_utime + usage.ru_stime)
        out.close(), err.close()
        del running[name]
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    self.wall_s = time.monotonic() - t0
    self.cpu_s = cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    print(f"\ncommand matrix: {len(self.cases)} commands in {self.wall_s:.0f} s "
          f"({self.cpu_s:.0f} CPU s)")
    for r in sorted(self.results.values(), key=lambda r: -r.seconds):
      print(f"  {r.seconds:6.1f} s  {r.cpu_s:6.1f} CPU s  exit {r.returncode}  {r.name}")

  def done(self, name) -> Result:
    r = self.results[name]
    assert not r.skipped, r.report()
    return r

  def ok(self, name) -> Result:
    r = self.done(name)
    assert r.returncode == 0, r.report()
    return r
