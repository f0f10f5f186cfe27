"""files.atomic_write: a file appears whole or not at all."""

import os

import pytest

from robust_u1_jax import files


def test_atomic_write_replaces_the_file_when_the_block_ends(tmp_path):
  path = tmp_path / "record.json"
  path.write_text("old")
  with files.atomic_write(str(path), "w") as f:
    f.write("new")
    assert path.read_text() == "old"  # nothing of the new contents until the block ends
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["record.json"]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
  path = tmp_path / "weights.safetensors"
  path.write_bytes(b"old")
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_write(str(path)) as f:
      f.write(b"half")
      raise KeyboardInterrupt
  assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.safetensors"]
