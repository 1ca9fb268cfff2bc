"""The files of a tokenize output folder (local path or `etils.epath` URL such as gs://): each
written under a temporary name and renamed when complete, so a killed run leaves no half file.

    write_json(out / "job.json", identity)
    with shard_file(out, "train-00000-of-00004.array_record") as tmp:   # a local path
      write_records(tmp)                                                  # renamed on success

Local folders use `vidtok_jax.files.atomic_path`. Remote ones (no `os.replace`) are written to a
hidden name unique to the host and process, then renamed with `epath`.
"""

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile

from etils import epath

from vidtok_jax.files import atomic_path, write_text


def shard_name(split: str, s: int, m: int) -> str:
  """File name of shard `s` of `m` of `split`."""
  return f"{split}-{s:05d}-of-{m:05d}.array_record"


def is_local(path) -> bool:
  return "://" not in epath.Path(path).as_posix()


def _tmp_suffix() -> str:
  """Unique per process across hosts sharing one output folder."""
  return f"tmp-{socket.gethostname()}-{os.getpid()}"


def json_text(obj, compact: bool = False) -> str:
  if compact:  # sidecars: token counts can run to 2 x 262144 numbers
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"
  return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def write_json(path: epath.Path, obj, compact: bool = False):
  """Writes `obj` as JSON (sorted keys) to `path` atomically."""
  text = json_text(obj, compact)
  if is_local(path):
    write_text(os.fspath(path), text)
    return
  tmp = path.parent / f".{path.name}.{_tmp_suffix()}"  # atomic_path renames local files only
  tmp.write_text(text)
  tmp.replace(path)


@contextlib.contextmanager
def shard_file(out: epath.Path, name: str):
  """Yields a local path to write `out / name` to; it becomes `out / name` when the block ends
  without error and is deleted otherwise. A remote `out`: written in a local temporary folder,
  then streamed to a hidden name in `out` and renamed."""
  if is_local(out):
    with atomic_path(os.fspath(out / name)) as tmp:
      yield tmp
    return
  tmpdir = tempfile.mkdtemp(prefix="vidtok_tokenize_")
  tmp = os.path.join(tmpdir, name)
  try:
    yield tmp
    part = out / f".{name}.{_tmp_suffix()}"
    with open(tmp, "rb") as src, part.open("wb") as dst:  # local -> remote, streamed
      shutil.copyfileobj(src, dst, 1 << 24)
    part.replace(out / name)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
    os.rmdir(tmpdir)


def remove_stale(out: epath.Path, name: str):
  """Deletes temporaries of `out / name` and its sidecar left by a killed run (local folders;
  call it only for files no other process writes)."""
  if not is_local(out):
    return
  for file in (name, f"{name}.json"):
    stem, ext = os.path.splitext(file)
    # `files.temporary_name`'s `.<stem>.<tag><ext>`, and this module's older `.<name>.tmp-*`.
    for pattern in (f".{stem}.*{ext}", f".{file}.tmp-*"):
      for stale in out.glob(pattern):
        stale.unlink()


def sha256_file(path) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def diff(stored, wanted, prefix="") -> list:
  """Dotted fields whose values differ between two JSON-like dicts."""
  out = []
  for k in sorted(set(stored) | set(wanted)):
    a, b = stored.get(k), wanted.get(k)
    name = f"{prefix}{k}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += diff(a, b, name + ".")
    elif a != b:
      out.append(f"{name}: stored {a!r}, now {b!r}")
  return out


__all__ = ["diff", "is_local", "json_text", "remove_stale", "sha256_file", "shard_file",
           "shard_name", "write_json"]
