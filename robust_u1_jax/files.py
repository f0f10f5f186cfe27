"""Writing a file so that no reader, and no resumed run, ever finds it half written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO


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
