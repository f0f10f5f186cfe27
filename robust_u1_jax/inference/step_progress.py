"""A progress bar over the sampling steps of one recovery, fed from inside the compiled sampler.

A recovery is one compiled program (the sampler is a `lax.scan`), so the host sees a step end only
through a callback: the program calls `tick` once per step (`jax.debug.callback`, once whatever
the mesh). `tick` is a module function, the same static argument on every call, so a program
compiles once; `bar` routes its ticks to the recovery running now. The bar appears at the first
step: the compile before it (minutes for a 7B model) is not counted as sampling.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from robust_u1_jax import progress

_lock = threading.Lock()
_active: dict | None = None  # the running recovery's: total, desc, its tqdm once the first tick


def tick(step, *after) -> None:
  """One sampling step done (called by the compiled program, from a runtime thread, with values
  of the step's result that make the call wait for it)."""
  del step, after  # the count is the ticks': callbacks of one program may run out of order
  with _lock:
    if _active is None:  # a program compiled with ticks, run outside `bar`
      return
    if _active["tqdm"] is None:
      # The sampler's steps are the schedule's points, the noise at t = 1 the first of them.
      _active["tqdm"] = progress.bar(total=_active["total"], initial=1, desc=_active["desc"],
                                  unit="step", dynamic_ncols=True)
    _active["tqdm"].update(1)


@contextlib.contextmanager
def bar(total: int, desc: str) -> Iterator[None]:
  """Shows `tick`'s steps as a bar for the block, which must wait for the program's results before
  it ends (a step's callback runs before the results are ready). `total`: the sampler's
  `num_steps`, the points of its schedule (one move fewer)."""
  global _active
  with _lock:
    if _active is not None:
      raise RuntimeError("step_progress.bar: another recovery's bar is open in this process")
    _active = {"total": total, "desc": desc, "tqdm": None}
  try:
    yield
  finally:
    with _lock:
      shown, _active = _active["tqdm"], None
    if shown is not None:
      shown.close()
