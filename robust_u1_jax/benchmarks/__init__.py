"""Benchmark implementations; `python -m robust_u1_jax.bench <name>` runs one.

Each module exposes `run(*, seconds: float, config: str = "") -> dict` that prints a small table
as it measures and returns the numbers, so a test or notebook can call it without flags.

Every comparison of two sides (JAX vs a host library, JAX vs PyTorch, corrupted vs clean
pipeline) is measured with `alternate`: the sides take turns, round after round, in one process,
so load from other processes on a shared machine lands on both alike; the ratio printed is the
median of the per-round ratios with its spread (`Ratio`), never one call of each side.
"""

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Ratio:
  """Per-round ratios of two alternated sides: median and spread (quartiles, extremes)."""
  median: float
  low: float  # 25th percentile
  high: float  # 75th percentile
  minimum: float
  maximum: float
  rounds: int

  @classmethod
  def of(cls, values) -> "Ratio":
    v = sorted(float(x) for x in values)
    if not v:
      raise ValueError("a ratio needs at least one round")
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return cls(statistics.median(v), q[0], q[2], v[0], v[-1], len(v))

  def __str__(self) -> str:
    return (f"{self.median:.3g} (quartiles {self.low:.3g}-{self.high:.3g}, range "
            f"{self.minimum:.3g}-{self.maximum:.3g}, {self.rounds} rounds)")

  def short(self) -> str:
    """'median [q1-q3]' for a table cell."""
    return f"{self.median:.3g} [{self.low:.3g}-{self.high:.3g}]"


@dataclasses.dataclass(frozen=True)
class Alternated:
  """Wall times of alternated sides: times[name][k] is that side's k-th round, in seconds."""
  times: dict[str, list[float]]

  def median(self, name: str) -> float:
    return statistics.median(self.times[name])

  def ratio(self, numerator: str, denominator: str) -> Ratio:
    """numerator time / denominator time, round by round."""
    return Ratio.of(a / b for a, b in zip(self.times[numerator], self.times[denominator]))


def alternate(fns: Mapping[str, Callable[[], object]], seconds: float, *, min_reps: int = 5,
              warmup: int = 1, max_reps: int | None = None,
              min_measurement_s: float = 0.0) -> Alternated:
  """Times each fn once per round, the sides in turn, for about `seconds` of wall time in all
  (at least `min_reps` rounds, at most `max_reps`).

  Odd rounds run the sides in reverse order, so neither always goes first (after the other's
  cache traffic, or just after a pause). Each fn must block until its result is ready. With
  `min_measurement_s`, a side's measurement calls its fn as many times as the fastest side needs
  to take that long (the same count on every side) and records the time per call: a call of a
  millisecond or two alone is mostly the timer's and the scheduler's noise.
  """
  for fn in fns.values():
    for _ in range(warmup):  # compilation and first-touch costs are not what we measure
      fn()
  if min_measurement_s > 0:
    fastest = min(_time_call(fn) for fn in fns.values())
    calls = max(1, math.ceil(min_measurement_s / max(fastest, 1e-9)))
    fns = {name: _repeated(fn, calls) for name, fn in fns.items()}
  else:
    calls = 1
  names = list(fns)
  times: dict[str, list[float]] = {name: [] for name in names}
  start = time.perf_counter()
  rounds = 0
  while rounds < min_reps or time.perf_counter() - start < seconds:
    if max_reps is not None and rounds >= max_reps:
      break
    for name in (names if rounds % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      fns[name]()
      times[name].append((time.perf_counter() - t0) / calls)
    rounds += 1
  return Alternated(times)


def _time_call(fn: Callable[[], object]) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
  def run() -> None:
    for _ in range(calls):
      fn()
  return run


def usable_cpus() -> int:
  """The CPUs this process may run on (`taskset` narrows them), not all the host's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def goal(value: float, bound: float, *, at_most: bool) -> str:
  """'(goal <= 1.3: met)' or '(goal >= 1: missed)': the verdict beside the bound, so that a missed
  goal does not read like a met one."""
  met = value <= bound if at_most else value >= bound
  return f"(goal {'<=' if at_most else '>='} {bound:g}: {'met' if met else 'missed'})"


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
  """Plain-text table, columns right-aligned after the first."""
  cells = [tuple(str(c) for c in header)] + [tuple(_fmt(c) for c in r) for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = []
  for k, r in enumerate(cells):
    lines.append("  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i])
                           for i in range(len(r))))
    if k == 0:
      lines.append("  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
  return str(value)
