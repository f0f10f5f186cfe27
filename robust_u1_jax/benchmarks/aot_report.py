"""The report of an AOT compile (`bench aot`, aot.py): what the compile measured, and the verdict.

`AotResult` holds what `aot.compile_step` measured; `report` writes it out, `verdict` says whether
the step fits one device's memory: per-device need against the chip's HBM (`CHIPS`), a given
--hbm_gib, or the TPU compiler's own capacity when it refused the program.

FLOPs, three ways: the model FLOPs of the step's useful work (`flops.py`: each token through its
own expert, the mask's attended pairs, the backward the trainable set needs); the compiled
program's matmul FLOPs per device with every loop body counted as often as it runs
(`hlo_flops.py`); and XLA's cost analysis, which counts each loop body (the layer scans, the
sampler) once. The compiler's step-time estimate (`optimal_seconds`) counts loop bodies once as
well, so it is printed but is no step time; what the compile does bound is the model-FLOPs MFU:
at most model FLOPs / compiled matmul FLOPs, reached if every compiled matmul ran at peak.

Apart from aot.py, which finds the devices, builds the abstract train state and compiles: reading
the numbers needs none of that, and `bench recover_7b` reads the same chip table.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from robust_u1_jax.benchmarks.compiled import GIB, format_bytes, format_number, host_memory_bytes

# After a compile time that JAX's persistent cache served (a fraction of a fresh compile's).
CACHED_COMPILE = (" (read from the persistent compilation cache; "
                  "JAX_ENABLE_COMPILATION_CACHE=false times a fresh compile)")

# Per chip (one JAX device per chip: megacore on v4/v5p), by device_kind: HBM in GiB and peak
# bf16 FLOP/s (Cloud TPU documentation).
CHIPS = {
    "TPU v4": (32.0, 275e12),
    "TPU v5 lite": (16.0, 197e12),
    "TPU v5": (95.0, 459e12),  # v5p
    "TPU v5p": (95.0, 459e12),
    "TPU v6 lite": (32.0, 918e12),
}


@dataclasses.dataclass
class AotResult:
  config: str
  stage: str
  topology: str
  description: str
  device_kind: str
  num_devices: int
  mesh: dict[str, int]
  inputs: str  # the step's input arrays, global shapes
  params: int  # parameters of the model
  trainable: int
  state_bytes_per_device: int  # the train state's shards on one device
  # Train-state leaves of 1 MiB or more that every device holds whole: (bytes, count, largest).
  replicated_state: tuple[int, int, tuple[str, ...]]
  batch_bytes_per_device: int
  build_s: float  # abstract model, stage, train state shardings
  lower_s: float
  compile_s: float
  compile_cached: bool  # the step was read from the persistent compilation cache (cpu:N)
  memory: dict[str, int] | None  # CompiledMemoryStats fields (bytes, per device)
  flops_per_device: float | None  # compiled.cost_analysis()
  flops_program: float | None  # lowered.cost_analysis(): the unpartitioned program
  optimal_seconds: float | None  # the TPU compiler's own step-time estimate, when it gives one
  model_flops: dict[str, Any]  # flops.step_flops of the step's work, over all devices
  work_note: str  # what the model-FLOPs count assumes
  # hlo_flops.count of one device's compiled program (None when refused or not readable)
  hlo: Any = None
  oom: dict[str, Any] | None = None  # the compiler's RESOURCE_EXHAUSTED numbers, when refused

  @property
  def device_bytes(self) -> int | None:
    """Peak bytes one device needs (compiled.memory's total), or the compiler's count when it
    refused the program."""
    if self.memory is None:
      if not self.oom:
        return None
      if "lower bound" in self.oom["what"]:  # temporaries only: add the argument shards
        return self.oom["used"] + self.state_bytes_per_device + self.batch_bytes_per_device
      return self.oom["used"]
    return self.memory["total"]


# ----------------------------------------------------------------------------------- the verdict

def device_limit(result: AotResult, hbm_gib: float | None = None) -> tuple[int, str]:
  """(bytes one device may use, where that number comes from)."""
  if hbm_gib is not None:
    return int(hbm_gib * GIB), f"--hbm_gib {hbm_gib:g}"
  if result.oom and result.oom.get("capacity"):
    return result.oom["capacity"], f"the TPU compiler's HBM capacity of {result.device_kind}"
  if result.device_kind in CHIPS:
    return int(CHIPS[result.device_kind][0] * GIB), f"HBM of one {result.device_kind} chip"
  host = host_memory_bytes()
  return host // max(result.num_devices, 1), (
      f"host memory / {result.num_devices} fake devices")


def verdict(result: AotResult, hbm_gib: float | None = None) -> tuple[bool, str]:
  """(fits, one line): per-device need against the chip's (or the given) memory."""
  need = result.device_bytes
  limit, source = device_limit(result, hbm_gib)
  if need is None:
    return False, "UNKNOWN: the compiler reported no memory analysis"
  b = lambda n: format_bytes(n).strip()
  if need <= limit and (result.oom is None or hbm_gib is not None):
    used = 100 * need / limit  # a tiny config's: 0.027 %, not a spare of "100%"
    share = f"{used:.0f} %" if used >= 1 else f"{used:.2g} %"
    return True, (f"FITS: needs {b(need)} per device ({share}) of {b(limit)} ({source}); "
                  f"{b(limit - need)} to spare")
  refused = "the TPU compiler refused the step: " if result.oom is not None else ""
  at_least = "at least " if result.oom and "lower bound" in result.oom["what"] else ""
  dense = ("; fake CPU devices run XLA's dense attention, whose (T x T) scores a TPU slice's "
           "splash attention never holds: long rows that fit a TPU need far more here "
           "(--topology of the slice, with libtpu, for its verdict)"
           if result.device_kind.lower() == "cpu" else "")
  return False, (f"DOES NOT FIT: {refused}needs {at_least}{b(need)} per device, {source} is "
                 f"{b(limit)}: "
                 f"over by {b(need - limit)} ({need / limit:.1f}x){dense}")


def report(result: AotResult, hbm_gib: float | None = None) -> str:
  r = result
  lines = [
      f"AOT compile of the {r.stage} train step: {r.config}",
      f"  target: {r.topology} = {r.description}, {r.num_devices} x {r.device_kind}, "
      f"mesh {r.mesh}",
      f"  model: {format_number(r.params)} parameters, {format_number(r.trainable)} trainable",
      f"  inputs: {r.inputs}",
      f"  build {r.build_s:.1f} s, lower {r.lower_s:.1f} s, compile {r.compile_s:.1f} s"
      + (CACHED_COMPILE if r.compile_cached else ""),
      "  per-device memory:",
      f"    train state shards (from shardings) {format_bytes(r.state_bytes_per_device)}",
      f"    batch shards (from shardings)       {format_bytes(r.batch_bytes_per_device)}",
  ]
  rep_bytes, rep_count, rep_paths = r.replicated_state
  if rep_count:
    lines.append(f"    of the state, replicated whole on every device: "
                 f"{format_bytes(rep_bytes).strip()} in {rep_count} leaves, largest "
                 f"{', '.join(rep_paths)}")
  if r.memory is not None:
    m = r.memory
    lines += [
        f"    arguments        {format_bytes(m['argument_size_in_bytes'])}",
        f"    outputs          {format_bytes(m['output_size_in_bytes'])}",
        f"    aliased (donated){format_bytes(m['alias_size_in_bytes'])}",
        f"    temporaries      {format_bytes(m['temp_size_in_bytes'])}",
        f"    generated code   {format_bytes(m['generated_code_size_in_bytes'])}",
        f"    total            {format_bytes(r.device_bytes)}  (arguments + outputs - aliased + "
        "temporaries + code)",
    ]
  if r.oom is not None:
    lines += [f"    compiler refused: {r.oom['what']} {format_bytes(r.oom['used']).strip()} of "
              f"{format_bytes(r.oom['capacity']).strip()} HBM"
              + (f", exceeded by {format_bytes(r.oom['exceeded']).strip()}" if "exceeded" in r.oom
                 else ""),
              "    " + r.oom["details"].replace("\n", "\n    ")]
  limit, source = device_limit(r, hbm_gib)
  lines.append(f"    limit            {format_bytes(limit)}  ({source})")
  lines += flops_report(r)
  lines.append("  VERDICT: " + verdict(r, hbm_gib)[1])
  return "\n".join(lines)


def flops_report(r: AotResult) -> list[str]:
  """The FLOPs, step-time and MFU lines of the report (per device)."""
  from robust_u1_jax import flops

  n = r.num_devices
  model = r.model_flops["total"] / n
  lines = ["  FLOPs per step, per device:",
           f"    model (flops.py)          {model:.4g}: " + flops.describe(r.model_flops)
           + f" over {n} devices",
           f"      {r.work_note}"]
  if r.hlo is not None:
    unknown = (f"; {r.hlo.unknown_trip_counts} loops of unknown trip count counted once"
               if r.hlo.unknown_trip_counts else "")
    lines.append(f"    compiled matmuls          {r.hlo.flops:.4g} ({r.hlo.flops / model:.2f}x the "
                 f"model FLOPs), loop bodies times their trip counts{unknown}")
  if r.flops_per_device:
    lines.append(f"    XLA cost analysis         {r.flops_per_device:.4g}, every loop body "
                 "counted once" + (f"; whole program before partitioning {r.flops_program:.4g}"
                                   if r.flops_program else ""))
  peak = CHIPS.get(r.device_kind, (None, None))[1]
  if not peak:
    return lines
  lines.append(f"  step time per device at 100% of {peak / 1e12:.0f} TFLOP/s: model FLOPs "
               f"{model / peak:.3f} s" + (f", compiled matmuls {r.hlo.flops / peak:.3f} s"
                                          if r.hlo is not None else ""))
  if r.optimal_seconds:
    loops = f" ({len(r.hlo.loops)} loops)" if r.hlo is not None else ""
    lines.append(f"  compiler's estimate {r.optimal_seconds:.3f} s: it counts each loop body once"
                 f"{loops}, so with scanned layers it is not the step's time")
  if r.hlo is not None:
    lines.append(f"  model-FLOPs MFU at most {model / r.hlo.flops:.1%}: every compiled matmul at "
                 "peak (the rest is padding, expert buffers beyond their tokens, "
                 "rematerialisation)")
  return lines
