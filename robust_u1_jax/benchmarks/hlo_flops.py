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


@dataclasses.dataclass
class _Computation:
  flops: float = 0.0
  calls: list = dataclasses.field(default_factory=list)  # (callee, 1 or the while instruction)
  # name -> (op, operand names, argument text), for reading loop counters
  instructions: dict = dataclasses.field(default_factory=dict)
  root: str = ""


def _constant(comp: _Computation, name: str) -> int | None:
  op, _, args = comp.instructions.get(name, ("", [], ""))
  m = re.match(r"\s*(-?\d+)", args) if op == "constant" else None
  return int(m.group(1)) if m else None


def _tuple_index(comp: _Computation, name: str) -> int | None:
  op, _, args = comp.instructions.get(name, ("", [], ""))
  m = re.search(r"index=(\d+)", args) if op == "get-tuple-element" else None
  return int(m.group(1)) if m else None


def _trip_count(comps: dict[str, _Computation], caller: _Computation, args: str) -> int | None:
  """A while loop's trip count: XLA's own when it states one (CPU, GPU); else read from the loop
  (TPU): the condition's ROOT `counter < N`, the counter's step in the body's ROOT tuple
  (`counter + s`) and its initial value in the loop's operand (a constant; 0 otherwise)."""
  stated = _TRIP.search(args)
  if stated:
    return int(stated.group(1))
  names = {k: re.search(rf"\b{k}=%?([\w.\-]+)", args) for k in ("condition", "body")}
  if not all(names.values()):
    return None
  cond, body = (comps.get(names[k].group(1)) for k in ("condition", "body"))
  if cond is None or body is None:
    return None
  op, operands, cmp_args = cond.instructions.get(cond.root, ("", [], ""))
  if op != "compare" or "direction=LT" not in cmp_args or len(operands) != 2:
    return None
  index, limit = _tuple_index(cond, operands[0]), _constant(cond, operands[1])
  if index is None or limit is None:
    return None
  step = 1
  root_op, root_operands, _ = body.instructions.get(body.root, ("", [], ""))
  if root_op == "tuple" and index < len(root_operands):
    add_op, add_operands, _ = body.instructions.get(root_operands[index], ("", [], ""))
    if add_op == "add":
      steps = [_constant(body, o) for o in add_operands]
      step = next((v for v in steps if v is not None), 1)
  start = 0
  init = _operands(args)[0] if _operands(args) else ""
  init_op, init_operands, _ = caller.instructions.get(init, ("", [], ""))
  if init_op == "tuple" and index < len(init_operands):
    start = _constant(caller, init_operands[index]) or 0
  return max(0, -(-(limit - start) // max(step, 1)))


def count(hlo_text: str) -> HloFlops:
  """Dot and convolution FLOPs of an HLO module's text, loops counted by their trip counts."""
  comps: dict[str, _Computation] = {}
  entry, current, shapes = None, None, {}
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("(")[0]:
      current = comps.setdefault(header.group(2), _Computation())
      shapes = {}
      if header.group(1):
        entry = header.group(2)
      for name, shape in re.findall(r"([\w.\-]+):\s*([^,)]+\[[\d,]*\])", header.group(3) or ""):
        shapes[name] = _dims(shape)
      continue
    m = _INSTRUCTION.match(line)
    if current is None or not m:
      continue
    name, out_shape, op, args = m.groups()
    shapes[name] = _dims(out_shape)
    current.flops += _instruction_flops(op, out_shape, args, shapes)
    current.instructions[name] = (op, _operands(args), args)
    if line.lstrip().startswith("ROOT"):
      current.root = name
    for kind, listed, single in _CALLS.findall(args):
      for target in (listed or single).split(","):
        target = target.strip().lstrip("%")
        if target:
          current.calls.append((target, args if kind == "body" else 1))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  unknown = 0
  for comp in comps.values():
    for k, (callee, trip) in enumerate(comp.calls):
      if isinstance(trip, str):
        n = _trip_count(comps, comp, trip)
        unknown += n is None
        comp.calls[k] = (callee, 1 if n is None else n)

  def total(name: str, trips: bool, seen: tuple[str, ...] = ()) -> float:
    if name in seen or name not in comps:
      return 0.0
    c = comps[name]
    return c.flops + sum((n if trips else 1) * total(callee, trips, seen + (name,))
                         for callee, n in c.calls)

  loops = tuple((callee, n, total(callee, True)) for c in comps.values()
                for callee, n in c.calls if n > 1)
  return HloFlops(total(entry, True), total(entry, False), loops, unknown)
