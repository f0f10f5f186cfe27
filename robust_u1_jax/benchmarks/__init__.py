"""Benchmark implementations; `python -m robust_u1_jax.bench <name>` runs one.

Each module exposes `run(*, seconds: float, config: str = "") -> dict` that prints a small table
as it measures and returns the numbers, so a test or notebook can call it without flags.
"""

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], seconds: float, *, min_reps: int = 3,
                warmup: int = 1) -> float:
  """Median wall time of fn() in seconds, over as many calls as fit in `seconds` (>= min_reps).

  `fn` must block until its result is ready (call jax.block_until_ready on JAX outputs).
  """
  for _ in range(warmup):  # compilation and first-touch costs are not what we measure
    fn()
  times = []
  start = time.perf_counter()
  while len(times) < min_reps or time.perf_counter() - start < seconds:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


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
