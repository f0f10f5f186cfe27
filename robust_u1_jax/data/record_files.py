"""Random access to records stored in files: index checks, lazily opened descriptors read with
pread, and the byte spans of a line-oriented file's records. Shared by the image-pair sources and
the VQA tables."""

import os
import threading

import numpy as np


def check_index(i, length: int, name: str) -> int:
  i = int(i)
  if i < 0:
    i += length
  if not 0 <= i < length:
    raise IndexError(f"{name} index {i} is out of range [0, {length})")
  return i


class LazyFile:
  """A read-only file descriptor opened on first use in each process, read with pread.

  pread takes an offset, so threads share the descriptor without seeking over each other.
  """

  def __init__(self, path: str):
    self.path = path
    self._fd = None
    self._pid = None
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def read(self, offset: int, length: int) -> bytes:
    with self._lock:
      if self._fd is None or self._pid != os.getpid():
        self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
    return os.pread(self._fd, length, offset)

  def __del__(self):
    if self._fd is not None and self._pid == os.getpid():
      os.close(self._fd)


def line_spans(path: str, *, quoted: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(byte offsets, byte lengths, 1-based first line numbers) of the non-blank records of a file.

  With quoted=True a record continues over newlines inside double-quoted fields (CSV/TSV as
  pandas writes them: a newline ends a record only when the record's quote count is even).
  """
  offsets, lengths, lines = [], [], []
  start, start_line, quotes, pos = 0, 1, 0, 0
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if quoted:
        quotes += line.count(b'"')
      pos += len(line)
      if quoted and quotes % 2:
        continue  # inside a quoted field: the record goes on
      if line.strip() or pos - start > len(line):
        offsets.append(start)
        lengths.append(pos - start)
        lines.append(start_line)
      start, start_line, quotes = pos, lineno + 1, 0
  if start < pos:  # an unterminated quote up to the end of the file: still one (bad) record
    offsets.append(start)
    lengths.append(pos - start)
    lines.append(start_line)
  return (np.asarray(offsets, np.int64), np.asarray(lengths, np.int64),
          np.asarray(lines, np.int64))
