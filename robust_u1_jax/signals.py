"""SIGTERM as a stop, for work that stops cleanly on Ctrl-C (the evaluation keeps its finished
units and says so): `sigterm_stops` raises `Terminated`, a KeyboardInterrupt, where the program
runs, and `cli.call` exits 143 for it. Training loops handle both signals themselves
(training/checkpoint.py)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
  """SIGTERM within `sigterm_stops`: work that stops cleanly on Ctrl-C stops the same way (and
  the program exits 143)."""


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
  """SIGTERM (a service's stop, a preemption) raises `Terminated` in the main thread for the
  block, instead of ending the process where it stands, so what a Ctrl-C keeps and says is kept
  and said."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def stop(signum, frame):
    del signum, frame
    raise Terminated()

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
