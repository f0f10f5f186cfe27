"""Progress bars written to a pipe or a file: plain lines now and then, not tqdm's frames."""

import io

import tqdm

from robust_u1_jax import progress


class _Clock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_frames_become_lines_at_most_one_per_interval_and_the_last_stands():
  out, clock = io.StringIO(), _Clock()
  lines = progress._Lines(out, interval_s=30.0, clock=clock)
  lines.write("\r  0%|     | 0/9")  # the first is written at once
  for step, t in [(1, 10.0), (2, 20.0), (3, 31.0), (4, 40.0)]:
    clock.now = t
    lines.write(f"\r step {step}/9")
  assert out.getvalue() == "0%|     | 0/9\nstep 3/9\n"
  lines.write("")  # tqdm's probe of a closed stream, as its close begins
  lines.write("\n")  # the bar closes: the newest frame is written though 30 s have not passed
  lines.write("\n")
  assert out.getvalue().splitlines() == ["0%|     | 0/9", "step 3/9", "step 4/9"]


def test_the_interval_counts_from_a_frame_s_arrival_not_its_write_s_end():
  # A folder recovery piped to a log stayed at 0 % to its end: the interval counted from when the
  # first line's write ended, so the frame tqdm offered one interval later was held back.
  clock = _Clock()

  class SlowPipe(io.StringIO):
    def write(self, text):
      clock.now += 0.5  # a write that takes time
      return super().write(text)

  out = SlowPipe()
  lines = progress._Lines(out, interval_s=30.0, clock=clock)
  lines.write("\r  0%|     | 0/9")
  clock.now = 30.0
  lines.write("\r 33%|##   | 3/9")
  assert out.getvalue().splitlines() == ["0%|     | 0/9", "33%|##   | 3/9"]


def test_a_bar_on_a_pipe_writes_lines_around_other_lines(monkeypatch):
  out = io.StringIO()  # no terminal: isatty() is False
  monkeypatch.setattr(progress, "LINE_INTERVAL_S", 3600.0)
  bar = progress.bar(total=50, desc="steps", file=out, dynamic_ncols=True)
  for step in range(1, 51):
    bar.update(1)
    if step % 20 == 0:
      tqdm.tqdm.write(f"step {step}: loss=1.0", file=out)
  bar.close()
  text = out.getvalue()
  assert "\r" not in text and "\x1b" not in text
  lines = text.splitlines()
  assert lines[0].startswith("steps:   0%") and lines[-1].startswith("steps: 100%")
  assert lines[1:3] == ["step 20: loss=1.0", "step 40: loss=1.0"]
  assert len(lines) == 4  # frames within the hour are held back, only the last written


def test_a_bar_on_a_terminal_is_tqdm_s_own(monkeypatch):
  out = io.StringIO()
  monkeypatch.setattr(out, "isatty", lambda: True)
  bar = progress.bar(total=3, file=out)
  bar.update(3)
  bar.close()
  assert "\r" in out.getvalue()
