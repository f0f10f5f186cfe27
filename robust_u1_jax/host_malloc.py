"""glibc's malloc set up for XLA:CPU, before the backend starts its threads.

XLA:CPU allocates a program's temporaries afresh on every run: the demo's base step asks for one
209 MB buffer per step. glibc serves a request that large with a fresh mmap, returned with munmap
when freed, and each thread's arena maps and unmaps pages as it grows and shrinks. So every step
faults tens of thousands of new zeroed pages into the process. On a 2-core machine that was a
fifth of a training step's CPU time (docs/PERFORMANCE.md, "Host memory on CPU").

`configure` keeps freed memory in the process instead, with three mallopt(3) settings:
- one arena, the main one, which grows with brk;
- no mmap for large chunks;
- no trimming until 2 GiB of the heap's top is free.

The price is a resident size that stays near its peak. That is why it applies only where XLA runs
on the CPU. `ROBUST_U1_MALLOC` chooses:
- `auto` (the default): only when JAX_PLATFORMS is `cpu`, or, when it is unset, when the machine
  has no TPU or GPU device file;
- `keep`: always;
- `glibc`: never (glibc's defaults).

The entry modules call it through `cli`; tests/conftest.py calls it for the test processes.
Library code that imports robust_u1_jax keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

ENV = "ROBUST_U1_MALLOC"
CHOICES = ("auto", "keep", "glibc")
# mallopt(3) parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
# The same settings for the processes this one starts: glibc reads them before any thread exists.
TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            f"glibc.malloc.trim_threshold={TRIM_THRESHOLD}")
# TPU VMs expose /dev/accel* (v4, v5p) or /dev/vfio/N (v5e, v6e); NVIDIA and AMD GPUs these.
ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def runs_on_cpu() -> bool:
  """Whether jax will pick the CPU backend, judged before jax starts one."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return {p.strip() for p in platforms.split(",")} == {"cpu"}
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_FILES)


def _glibc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION"):
      return None
    return ctypes.CDLL("libc.so.6")
  except (ValueError, OSError):  # musl and other C libraries: no such name or library
    return None


def configure() -> bool:
  """Keeps freed memory in this process, and in the processes it starts, where ROBUST_U1_MALLOC
  says so; returns whether it did. A GLIBC_TUNABLES of your own that sets malloc wins."""
  choice = os.environ.get(ENV, "auto")
  if choice not in CHOICES:
    print(f"error: {ENV}={choice!r}: choose one of {', '.join(CHOICES)}", file=sys.stderr)
    raise SystemExit(2)
  if choice == "glibc" or (choice == "auto" and not runs_on_cpu()):
    return False
  own = os.environ.get("GLIBC_TUNABLES", "")
  if TUNABLES in own:  # a process this module started: glibc applied them at its start
    return True
  libc = _glibc()
  if libc is None or "glibc.malloc." in own:
    return False
  # The arena limit binds threads that have not allocated yet: call before jax's backend starts.
  done = (libc.mallopt(_M_ARENA_MAX, 1) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
  if done:
    os.environ["GLIBC_TUNABLES"] = f"{own}:{TUNABLES}" if own else TUNABLES
  return done
