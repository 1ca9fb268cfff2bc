"""Writing user files safely: never replace an existing file unless asked, never leave half a file.

    refuse_existing([out_json, out_mp4], force=FLAGS.force)   # before any slow work
    with atomic_path(out_mp4) as tmp:                          # write `tmp`, renamed on success
      write_video(tmp, frames, fps)
    write_text(out_json, json.dumps(result))

Every command that writes a file a user names or owns (the converter, `reconstruct.py` outputs and
tokens files, `eval.py --output`) checks with `refuse_existing` first, so a slow run does not end
in a refusal, and an official checkpoint cannot be destroyed by a mistyped `--out`. Files are
written under a temporary name in the same folder and renamed over the final name only once
complete (`os.replace`, atomic on POSIX), so an interrupted write (Ctrl-C, a full disk, a killed
job) leaves the final name untouched or absent, never truncated.
"""

import contextlib
import os
import re
import socket


class OutputExistsError(FileExistsError, ValueError):
  """An output file already exists and `force` was not given. A ValueError too, so commands that
  report ValueErrors as one-line errors report this one the same way."""


def refuse_existing(paths, force: bool = False, flag: str = "--force"):
  """`OutputExistsError` naming every existing path of `paths` (str/PathLike, None ignored)
  unless `force`."""
  if force:
    return
  existing = [os.fspath(p) for p in paths if p is not None and os.path.lexists(os.fspath(p))]
  if existing:
    what = (f"{existing[0]} exists; refusing to replace it" if len(existing) == 1 else
            f"{len(existing)} outputs exist ({', '.join(existing)}); refusing to replace them")
    raise OutputExistsError(f"{what} (pass {flag} to overwrite)")


def temporary_name(path) -> str:
  """A hidden name beside `path` with the same extension (writers such as PyAV, numpy and
  matplotlib choose the format from it), unique to this process: the host's name and the process
  id, since hosts sharing a folder (NFS, a pod's shared disk) often run the same pid in their
  containers."""
  path = os.fspath(path)
  folder, base = os.path.split(path)
  stem, ext = os.path.splitext(base)
  host = re.sub(r"[^\w.-]", "_", socket.gethostname())[:64]
  return os.path.join(folder, f".{stem}.partial-{host}-{os.getpid()}{ext}")


@contextlib.contextmanager
def atomic_path(path, force: bool = True):
  """Yields a temporary path to write instead of `path`; renames it to `path` when the block
  ends without error, deletes it otherwise. Creates the parent folder. With `force=False`,
  refuses (`OutputExistsError`) when `path` exists, before and again at the rename."""
  path = os.fspath(path)
  refuse_existing([path], force)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = temporary_name(path)
  try:
    yield tmp
    if not os.path.exists(tmp):
      raise FileNotFoundError(f"nothing was written to {tmp} (for {path})")
    refuse_existing([path], force)  # appeared while we wrote
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def write_text(path, text: str, force: bool = True):
  """Writes `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
  with atomic_path(path, force) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


__all__ = ["OutputExistsError", "atomic_path", "refuse_existing", "temporary_name", "write_text"]
