"""What an evaluation has finished so far, kept on disk so a stopped one resumes where it stopped.

An evaluation is a few minutes of recoveries and answers in units (a corruption condition, the
clean images, another model's recoveries) that do not depend on each other: every corruption and
recovery key comes from (seed, record index), every answer is greedy. Each finished unit is written
to `<report folder>/partial/<unit>.npz` (its JSON-able structure beside its arrays, written to a
temporary name and renamed, so a kill leaves whole files only), and a re-run with the same config
and models reads it back instead of computing it again: the report is the one an uninterrupted run
writes. The folder is stamped with a fingerprint of the config, the models' files (size and
modification time) and the package's code (`files.code_digest`); a re-run that differs in any
starts afresh. `eval.run` removes the folder
once the report is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from robust_u1_jax import files

FOLDER = "partial"
_STAMP = "fingerprint.json"
_ARRAY = "__array__"  # a placeholder's key: {"__array__": the array's name in the .npz}


def stamp(fingerprint: Any) -> str:
  """The digest that stands for `fingerprint` (anything JSON-able that names an evaluation's config
  and files): kept units and a written report are this evaluation's when theirs is the same."""
  return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def kept_stamp(out_dir: str) -> str | None:
  """The stamp of the units a stopped evaluation kept in `out_dir`, None if it kept none (a run
  stopped before its first unit leaves the stamp alone)."""
  return _kept(out_dir).get("stamp")


def kept_fingerprint(out_dir: str) -> Any | None:
  """The fingerprint of the units a stopped evaluation kept in `out_dir` (None: it kept none, or
  an older version's, which wrote its stamp alone)."""
  return _kept(out_dir).get("fingerprint")


def _kept(out_dir: str) -> dict[str, Any]:
  folder = os.path.join(out_dir, FOLDER)
  try:
    if not any(name.endswith(".npz") for name in os.listdir(folder)):
      return {}
    with open(os.path.join(folder, _STAMP)) as f:
      kept = json.load(f)
  except (OSError, ValueError):
    return {}
  return kept if isinstance(kept, dict) else {}


class PartialResults:
  """Finished units of one evaluation in `<out_dir>/partial`, valid for `fingerprint` (anything
  JSON-able that names the config and the models)."""

  def __init__(self, out_dir: str, fingerprint: Any):
    self.folder = os.path.join(out_dir, FOLDER)
    self.stamp = stamp(fingerprint)
    stamp_path = os.path.join(self.folder, _STAMP)
    if kept_stamp(out_dir) != self.stamp:  # another config or model (or none yet): start afresh
      shutil.rmtree(self.folder, ignore_errors=True)
      os.makedirs(self.folder)
      with files.atomic_write(stamp_path, "w") as f:  # the fingerprint: what a refusal names
        json.dump({"stamp": self.stamp, "fingerprint": fingerprint}, f, default=str)

  def __len__(self) -> int:
    return sum(name.endswith(".npz") for name in os.listdir(self.folder))

  def _path(self, key: str) -> str:
    # Readable, and unique: two keys that differ only in punctuation get different files.
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    slug = re.sub(r"[^\w.-]+", "_", key)
    return os.path.join(self.folder, f"{slug}-{digest}.npz")

  def get(self, key: str) -> Any | None:
    """The unit `key` as it was put, or None if it has not finished."""
    path = self._path(key)
    if not os.path.exists(path):
      return None
    try:
      with np.load(path, allow_pickle=False) as data:
        return _decode(json.loads(str(data["structure"])), data)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # damaged: computed again
      os.remove(path)
      return None

  def put(self, key: str, value: Any) -> Any:
    arrays: dict[str, np.ndarray] = {}
    structure = json.dumps(_encode(value, arrays))
    with files.atomic_write(self._path(key)) as f:
      np.savez(f, structure=np.asarray(structure), **arrays)
    return value

  def get_or_compute(self, key: str, compute: Callable[[], Any],
                     progress: Callable[[str], None] = lambda line: None) -> Any:
    """The unit `key`: kept from an earlier run, or computed and kept. `progress` is told the key
    first (before the unit's work), and whether it was kept."""
    kept = self.get(key)
    progress(key + (": kept from the stopped run" if kept is not None else ""))
    return kept if kept is not None else self.put(key, compute())

  def remove(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
  if isinstance(value, np.ndarray):
    name = f"a{len(arrays)}"
    arrays[name] = value
    return {_ARRAY: name}
  if isinstance(value, dict):
    return {k: _encode(v, arrays) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_encode(v, arrays) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _decode(value: Any, data) -> Any:
  if isinstance(value, dict):
    if set(value) == {_ARRAY}:
      return data[value[_ARRAY]]
    return {k: _decode(v, data) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode(v, data) for v in value]
  return value
