"""vidtok_jax.files: refusal to replace, and no half file after an interrupted write."""

import pytest

from vidtok_jax.files import OutputExistsError, atomic_path, refuse_existing, write_text


def test_refuses_existing_unless_forced(tmp_path):
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text("old")
  with pytest.raises(OutputExistsError, match=r"a\.json exists; refusing .* --force"):
    write_text(a, "new", force=False)
  assert a.read_text() == "old"
  with pytest.raises(ValueError, match="--overwrite"):  # a ValueError too, with the flag named
    refuse_existing([a, b, None], flag="--overwrite")
  refuse_existing([b, None])  # nothing there: fine
  write_text(a, "new", force=True)
  assert a.read_text() == "new"


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
  a = tmp_path / "out" / "x.npz"
  with pytest.raises(KeyboardInterrupt):
    with atomic_path(a) as tmp:
      assert tmp.endswith(".npz") and tmp != str(a)  # writers keep choosing the format by suffix
      with open(tmp, "wb") as f:
        f.write(b"half")
      raise KeyboardInterrupt
  assert list((tmp_path / "out").iterdir()) == []  # neither a half x.npz nor the temporary
  with atomic_path(a) as tmp:
    with open(tmp, "wb") as f:
      f.write(b"whole")
  assert a.read_bytes() == b"whole" and [p.name for p in a.parent.iterdir()] == ["x.npz"]
