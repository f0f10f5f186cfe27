"""What XLA says of a compiled program, for the AOT checks (`bench aot`: aot.py; `bench recover
--topology`: recover_7b.py): per-device memory, cost analysis, the compiled matmul FLOPs, the TPU
compiler's out-of-memory refusal, and the byte sizes of sharded shapes."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from robust_u1_jax.benchmarks import hlo_flops

GIB = 1024 ** 3
# CompiledMemoryStats fields that a program's peak per-device bytes add up from.
PEAK_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
               "generated_code_size_in_bytes")


def memory(compiled) -> dict[str, int] | None:
  """`compiled.memory_analysis()`'s byte fields, per device, with 'total': the peak bytes one
  device needs (arguments + outputs - aliased (donated) + temporaries + code); None when the
  backend gives no analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  m = {f: int(getattr(stats, f)) for f in dir(stats)
       if f.endswith("_in_bytes") and isinstance(getattr(stats, f), (int, float))}
  m["total"] = sum(m[f] for f in PEAK_FIELDS) - m["alias_size_in_bytes"]
  return m


def abstract(tree, sharding_of: Callable[[tuple[int, ...]], Any]):
  """Arrays (or shapes) -> ShapeDtypeStructs placed by `sharding_of(shape)`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding_of(tuple(x.shape))), tree)


def shard_bytes(tree) -> int:
  """Bytes of one device's shards of `tree` (arrays or ShapeDtypeStructs with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.shape
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def replicated_leaves(tree, min_bytes: int = 1 << 20) -> tuple[int, int, tuple[str, ...]]:
  """(bytes, count, three largest paths) of leaves >= min_bytes that are fully replicated on a
  mesh of several devices: by design (the timestep embedder's second layer, docs/PERFORMANCE.md)
  or a sharding the step was meant to have and did not get, which the largest paths tell."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    sharding = getattr(leaf, "sharding", None)
    size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    if (size >= min_bytes and sharding is not None and len(sharding.device_set) > 1
        and sharding.is_fully_replicated):
      found.append((size, jax.tree_util.keystr(path)))
  found.sort(reverse=True)
  return sum(n for n, _ in found), len(found), tuple(p for _, p in found[:3])


def count(tree) -> int:
  """Elements of every leaf of `tree` (parameters of a model's state)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def cost(obj) -> dict[str, float]:
  """XLA's cost analysis of a lowered or compiled program ('flops', 'bytes accessed',
  'optimal_seconds', ...): per device when compiled; {} where the backend has none."""
  try:
    analysis = obj.cost_analysis()
  except Exception:  # not every backend implements it
    return {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def program_cost(lowered) -> dict[str, float]:
  """XLA's cost analysis of the unpartitioned program (whole-step FLOPs). libtpu's client has none
  for a lowering, so the same HLO module is analysed by the CPU client instead."""
  analysis = cost(lowered)
  if analysis.get("flops"):
    return analysis
  try:
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
    return dict(_jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module) or {})
  except Exception:  # private hooks moved: report no program FLOPs rather than fail
    return {}


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}


def _size(number: str, unit: str) -> int:
  return int(float(number) * _UNITS[unit])


def parse_oom(message: str) -> dict[str, Any] | None:
  """The TPU compiler's out-of-HBM refusal -> {'used', 'capacity', 'what', 'exceeded', 'details'}.

  Two forms: 'Ran out of memory in memory space hbm. Used X of Y hbm. Exceeded hbm capacity by Z'
  (the whole program, with its largest allocations listed), and 'Ran out of memory on HBM, the
  total memory required for HLO temporaries (X) exceeds available HBM (Y)' (temporaries alone: a
  lower bound on what a device needs).
  """
  size = r"([\d.]+)([KMGT]?)"
  used = re.search(rf"Used {size} of {size} hbm", message)
  temps = re.search(rf"required for HLO temporaries \({size}\) exceeds available HBM \({size}\)",
                    message)
  if used:
    out = {"used": _size(*used.group(1, 2)), "capacity": _size(*used.group(3, 4)),
           "what": "the whole program"}
  elif temps:
    out = {"used": _size(*temps.group(1, 2)), "capacity": _size(*temps.group(3, 4)),
           "what": "HLO temporaries alone (a lower bound)"}
  else:
    return None
  over = re.search(rf"[Ee]xceeded hbm capacity by {size}", message)
  if over:
    out["exceeded"] = _size(*over.group(1, 2))
  lines = [ln.rstrip() for ln in message.splitlines() if ln.strip()]
  start = next((i for i, ln in enumerate(lines) if "largest" in ln.lower()), None)
  out["details"] = "\n".join(lines[start:start + 40] if start is not None else lines[:12])
  return out


def matmul_flops(compiled):
  """hlo_flops.count of one device's compiled program; None when its text is not available."""
  try:
    return hlo_flops.count(compiled.as_text())
  except Exception:  # a backend without HLO text, or a format the parser does not know
    return None


def host_memory_bytes() -> int:
  """This machine's physical memory (0 where the system does not say)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return 0


def format_bytes(n: int | float | None) -> str:
  """'   1.50 GiB': right-aligned for the reports' columns."""
  if n is None:
    return "-"
  for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if abs(n) >= size:
      return f"{n / size:9.2f} {unit}"
  return f"{n:9.0f} B"


def format_number(n: float) -> str:
  """A count in B / M / K: '7.248 B' parameters."""
  for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.3f} {unit}"
  return f"{n:.0f}"
