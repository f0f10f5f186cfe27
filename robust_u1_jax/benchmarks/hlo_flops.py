"""Matmul FLOPs of a compiled program, every loop body counted as often as it runs.

XLA's cost analysis (`compiled.cost_analysis()['flops']`) and the TPU compiler's step-time
estimate count a `while` body once: a program whose decoder layers are one `lax.scan` is charged
for one layer, and SPMD-partitioned matmuls that XLA turns into loops (windowed einsums) for a few
of their iterations. This module reads the optimised HLO text of one device's program
(`compiled.as_text()`), counts 2 x (output elements) x (contracted elements) for every `dot` and
`convolution`, and multiplies each computation by the trip counts of the loops around it (the
compiler's `known_trip_count`). Elementwise work is left out, as in the model-FLOPs count.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|"
                    r"called_computations)=(?:\{([^}]*)\}|%?([\w.\-]+))")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass(frozen=True)
class HloFlops:
  flops: float  # dots and convolutions, loop bodies times their trip counts
  flops_once: float  # the same with every loop body counted once (XLA's convention)
  loops: tuple[tuple[str, int, float], ...]  # (body, trip count, its FLOPs per iteration)
  unknown_trip_counts: int  # loops without a known trip count (counted once)


def _dims(shape: str) -> list[int]:
  m = _SHAPE.search(shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _operands(args: str) -> list[str]:
  """Operand names of an instruction's argument text (up to the closing parenthesis)."""
  depth, out, token = 0, [], ""
  for ch in args:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      if depth == 0:
        break
      depth -= 1
    if ch == "," and depth == 0:
      out.append(token)
      token = ""
    else:
      token += ch
  out.append(token)
  return [t.strip().split()[-1].lstrip("%") for t in out if t.strip()]


def _field(text: str, name: str) -> list[int]:
  m = re.search(rf"\b{name}=\{{([\d,]*)\}}", text)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _instruction_flops(op: str, out_shape: str, args: str, shapes: dict[str, list[int]]) -> float:
  out = math.prod(_dims(out_shape))
  names = _operands(args)
  if op == "dot":
    lhs = shapes.get(names[0], [])
    contracted = math.prod(lhs[d] for d in _field(args, "lhs_contracting_dims") if d < len(lhs))
    return 2.0 * out * contracted
  if op == "convolution":
    return _convolution_flops(out_shape, args, [shapes.get(n, []) for n in names[:2]])
  return 0.0


def _window(args: str, key: str, rank: int, default: int) -> list[int]:
  m = re.search(rf"\b{key}=([\dx_\-]+)", args)
  if not m:
    return [default] * rank
  return [int(v) for v in m.group(1).split("x")] if key != "pad" else [
      int(v.split("_")[0]) for v in m.group(1).split("x")]


def _convolution_flops(out_shape: str, args: str, operands: list[list[int]]) -> float:
  """2 x (output batch x output features) x input features x the (output position, window tap)
  pairs that land on real input elements, per spatial dimension: TPU programs write batched
  matmuls as convolutions whose dilated, padded windows mostly land on holes, so the window
  volume alone would overcount them."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", args)
  lhs, rhs = operands
  out = _dims(out_shape)
  if not labels or len(lhs) != len(labels.group(1)) or len(rhs) != len(labels.group(2)):
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  spatial = sorted(c for c in rhs_l if c.isdigit())
  rank = len(spatial)
  size = _window(args, "size", rank, 1)
  stride, pad = _window(args, "stride", rank, 1), _window(args, "pad", rank, 0)
  lhs_dilate = _window(args, "lhs_dilate", rank, 1)
  rhs_dilate = _window(args, "rhs_dilate", rank, 1)
  pairs = 1
  for d, c in enumerate(spatial):
    o = np.arange(out[out_l.index(c)])[:, None] * stride[d]
    p = o + np.arange(size[d])[None, :] * rhs_dilate[d] - pad[d]
    extent = (lhs[lhs_l.index(c)] - 1) * lhs_dilate[d]
    pairs *= int(((p >= 0) & (p <= extent) & (p % lhs_dilate[d] == 0)).sum())
  return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * pairs


def count(hlo_text: str) -> HloFlops:
  """Dot and convolution FLOPs of an HLO module's text, loops counted by their trip counts."""
  own: dict[str, float] = {}
  calls: dict[str, list[tuple[str, int | str]]] = {}  # (callee, trip count or its condition)
  bounds: dict[str, int] = {}  # loop condition -> N of its `i < N` (a scan's counter from 0)
  entry, current, shapes, constants = None, None, {}, {}
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("(")[0]:
      current = header.group(2)
      own[current], calls[current], shapes, constants = 0.0, [], {}, {}
      if header.group(1):
        entry = current
      for name, shape in re.findall(r"([\w.\-]+):\s*([^,)]+\[[\d,]*\])", header.group(3) or ""):
        shapes[name] = _dims(shape)
      continue
    m = _INSTRUCTION.match(line)
    if current is None or not m:
      continue
    name, out_shape, op, args = m.groups()
    shapes[name] = _dims(out_shape)
    own[current] += _instruction_flops(op, out_shape, args, shapes)
    if op == "constant" and out_shape.startswith("s32[]"):
      constants[name] = int(re.match(r"\s*(-?\d+)", args).group(1))
    if op == "compare" and "direction=LT" in args and line.lstrip().startswith("ROOT"):
      limit = [constants[o] for o in _operands(args) if o in constants]
      if limit:
        bounds[current] = limit[0]
    trip: int | str = 1
    if op == "while":
      # XLA's own count when it states one (CPU, GPU), else the condition's bound (TPU).
      t = _TRIP.search(args)
      cond = re.search(r"condition=%?([\w.\-]+)", args)
      trip = int(t.group(1)) if t else cond.group(1) if cond else 1
    for kind, listed, single in _CALLS.findall(args):
      for target in (listed or single).split(","):
        target = target.strip().lstrip("%")
        if target:
          calls[current].append((target, trip if kind == "body" else 1))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  unknown = 0
  for comp, callees in calls.items():
    for k, (callee, trip) in enumerate(callees):
      if isinstance(trip, str):
        unknown += trip not in bounds
        callees[k] = (callee, bounds.get(trip, 1))

  def total(comp: str, trips: bool, seen: tuple[str, ...] = ()) -> float:
    if comp in seen or comp not in own:
      return 0.0
    return own[comp] + sum((n if trips else 1) * total(c, trips, seen + (comp,))
                           for c, n in calls[comp])

  loops = tuple((c, n, total(c, True)) for comp in own for c, n in calls[comp] if n > 1)
  return HloFlops(total(entry, True), total(entry, False), loops, unknown)
