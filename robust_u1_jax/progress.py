"""Progress bars that read well wherever they are written.

On a terminal (and in a notebook) a bar is tqdm's, redrawn in place. Written to a pipe or a file
(`train ... 2>&1 | tee run.log`, a batch job's log), tqdm's frames would pile up on one line of
carriage returns, one frame per update, in the middle of the step lines; there a bar becomes a
plain line now and then instead: its first frame, at most one every `LINE_INTERVAL_S`, and its
last when it closes.
"""

import sys
import time

import tqdm
import tqdm.auto

LINE_INTERVAL_S = 30.0


def bar(iterable=None, **kwargs) -> tqdm.tqdm:
  """tqdm(iterable, **kwargs) on stderr (or kwargs' file), as lines where that is no terminal."""
  stream = kwargs.pop("file", None) or sys.stderr
  if "ipykernel" in sys.modules:  # a notebook's widget
    return tqdm.auto.tqdm(iterable, file=stream, **kwargs)
  if _is_terminal(stream):
    return tqdm.tqdm(iterable, file=stream, **kwargs)
  kwargs.pop("dynamic_ncols", None)  # a file has no width to follow
  # tqdm offers a frame at twice the lines' rate: at the same rate, a frame arriving a hair under
  # the interval after the last line (clocks read at other moments) waited a whole interval more.
  return tqdm.tqdm(iterable, file=_Lines(stream, LINE_INTERVAL_S),
                   mininterval=LINE_INTERVAL_S / 2, **kwargs)


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # no isatty, or closed
    return False


class _Lines:
  """A file for tqdm that turns its frames into lines: the first, then at most one every
  LINE_INTERVAL_S (tqdm.write's redraws included), and the last standing when the bar closes."""

  def __init__(self, stream, interval_s: float = LINE_INTERVAL_S, clock=time.monotonic):
    self.stream, self.interval_s, self.clock = stream, interval_s, clock
    self.last_written: float | None = None
    self.pending = ""  # the newest frame not yet written

  def write(self, text: str) -> None:
    if not text:  # tqdm's probe of a closed stream
      return
    frame = text.replace("\r", "").strip()
    if not frame:  # the close's newline, or a clearing of the line: the last frame stands
      self._write_pending()
      return
    self.pending = frame
    now = self.clock()
    if self.last_written is None or now - self.last_written >= self.interval_s:
      self._write_pending(now)

  def _write_pending(self, now: float | None = None) -> None:
    """Writes the newest frame; the interval counts from `now`, when it came (not from when its
    write ended: a slow pipe would hold back the frame a full interval later)."""
    if self.pending:
      self.stream.write(self.pending + "\n")
      self.stream.flush()
      self.pending, self.last_written = "", self.clock() if now is None else now

  def flush(self) -> None:
    self.stream.flush()
