"""Writing a file so that no reader, and no resumed run, ever finds it half written; reading a
user's JSON file so that a broken one is named; telling whether files changed since."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any


class UnreadableFile(ValueError):
  """A file that does not parse as what it should be: the message names it."""


def read_json(path: str) -> Any:
  """`path` parsed as JSON; UnreadableFile naming it where it does not parse (a file cut short by
  an interrupted copy, or edited by hand), where json's own message names no file."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data)
  except json.JSONDecodeError as e:
    raise UnreadableFile(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                         "cut short or edited by hand?") from None
  except UnicodeDecodeError as e:
    raise UnreadableFile(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte "
                         f"{e.start})") from None


def read_json_object(path: str, what: str = "fields") -> dict[str, Any]:
  """`read_json(path)` where it must be an object (a config): UnreadableFile naming the file where
  it parses as another kind (a list, a number), whose fields would be met as a traceback."""
  values = read_json(path)
  if not isinstance(values, dict):
    raise UnreadableFile(f"{path}: a JSON {type(values).__name__}, not an object of {what}")
  return values


REQUIRED = object()
_KINDS = {int: "a whole number >= 1", float: "a finite number", bool: "true or false",
          str: "a text"}


def json_field(values: Mapping[str, Any], key: str, source: str, kind: type,
               default: Any = REQUIRED) -> Any:
  """`values[key]` of a JSON config as `kind` (int: a whole number >= 1; float: a finite number;
  bool; str), `default` where it is missing or null. UnreadableFile naming `source`, the field and
  its value where it is required and missing, or not of its kind: a hand-edited model config is
  named, not met deep in the model's construction (an int() of a text, a negative layer count)."""
  value = values.get(key)
  if value is None:
    if default is REQUIRED:
      raise UnreadableFile(f"{source}: required field {key!r} " + (
          f"= null: not {_KINDS[kind]}" if key in values else "missing"))
    return default
  if kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
  else:
    ok = isinstance(value, kind)
  if not ok:
    raise UnreadableFile(f"{source}: field {key!r} = {json.dumps(value)}: not {_KINDS[kind]}")
  return kind(value)


@contextlib.contextmanager
def naming(source: str) -> Iterator[None]:
  """A config read inside the block whose ValueError names no file names `source`, as an
  UnreadableFile: a model config's own checks (heads that do not divide, an unknown activation)
  say what is wrong, not in which file."""
  try:
    yield
  except UnreadableFile:
    raise
  except ValueError as e:
    message = str(e)
    raise UnreadableFile(message if source in message else f"{source}: {message}") from None


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
  """A file to write `path`'s contents into. It is a temporary file beside `path`, named for this
  process (processes writing into one shared folder never collide), renamed over `path` when the
  block ends; an error or an interrupt removes it and leaves `path` as it was."""
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def files_fingerprint(paths: Iterable[str], *, relative: bool = False) -> list[list]:
  """(path, size, modification time) of every file under `paths` (files or folders), sorted: what
  results computed from them (an evaluation's, a recovery cache's) are kept for. A model written
  again in its place differs; so does a copy. `relative`: each file's path within the folder
  given (a file's: its name), so a folder moved whole (`mv`, `cp -a`) keeps its fingerprint."""
  out = []
  for path in paths:
    if os.path.isfile(path):
      name = os.path.basename(path) if relative else os.path.abspath(path)
      out.append([name, os.path.getsize(path), os.stat(path).st_mtime_ns])
      continue
    for root, dirs, names in os.walk(path):
      dirs.sort()
      for name in sorted(names):
        full = os.path.join(root, name)
        shown = os.path.relpath(full, path) if relative else os.path.abspath(full)
        out.append([shown, os.path.getsize(full), os.stat(full).st_mtime_ns])
  return out


def files_digest(paths: Iterable[str], *, relative: bool = False) -> str:
  """A short digest of `files_fingerprint(paths, relative=relative)`."""
  listing = json.dumps(files_fingerprint(paths, relative=relative))
  return hashlib.sha256(listing.encode()).hexdigest()[:16]


@functools.cache
def code_digest(root: str | None = None) -> str:
  """A digest of the Python sources under `root` (this package's by default): results kept for a
  later run (an evaluation's finished units, its report) are another code's when it differs. A
  unit kept by another version may lack a field this one reads, and a report would mix two
  versions' figures."""
  if root is None:
    root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for folder, dirs, names in os.walk(root):
    dirs.sort()
    for name in sorted(names):
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
          digest.update(f.read() + b"\0")
  return digest.hexdigest()[:16]
