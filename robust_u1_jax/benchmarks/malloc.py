"""`python -m robust_u1_jax.bench malloc`: XLA:CPU training steps with glibc's malloc as it comes
against malloc keeping freed memory (`host_malloc`), in the same run.

  python -m robust_u1_jax.bench malloc                          # 2 rounds, about 3 minutes
  python -m robust_u1_jax.bench malloc --override rounds=4 --override steps=60

The setting binds before the backend starts its threads, so each side runs in a process of its
own: `rounds` x (glibc, kept), alternated so that a machine whose speed drifts favours neither.
Each process times the demo's base part (`configs/demo.py`, random weights: its time does not
depend on them; the step with the largest temporaries of the demo) as `bench train_step` times a
step (`train_step.time_train_step`: the trainer's own setup, warm-up on every batch, then `steps`
steps one by one over 4 pipeline batches). It reports the median step time, and its own minor
page faults and system CPU seconds over the timed steps.
Prints each process's figures, then each side's median and the ratio glibc / kept.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

from robust_u1_jax import host_malloc

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "demo.py")
OPTIONS = {"rounds": 2, "steps": 40}
SIDES = ("glibc", "keep")
BATCHES = 4


def run(*, overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
  """Prints the table (module docstring); returns {side: [each process's figures]}. It times
  configs/demo.py's base part, `steps` steps a round (no --seconds, --config or --threads)."""
  from robust_u1_jax.benchmarks import aot

  given = aot.parse_overrides(overrides)
  unknown = set(given) - set(OPTIONS)
  if unknown:
    raise SystemExit(f"malloc: times configs/demo.py's base part; options are "
                     f"{', '.join(OPTIONS)} (got {sorted(unknown)})")
  options = {k: given.get(k, v) for k, v in OPTIONS.items()}
  if not all(type(v) is int for v in options.values()) or (
      options["rounds"] < 1 or options["steps"] < 2):
    raise SystemExit(f"malloc: rounds must be an integer >= 1 and steps >= 2; got {options}")
  results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
  print(f"configs/demo.py base step, {options['steps']} timed steps a process, "
        f"{options['rounds']} round{'' if options['rounds'] == 1 else 's'} of "
        f"{' / '.join(SIDES)}", flush=True)
  print(f"{'malloc':8s} {'median ms':>10s} {'page faults':>12s} {'system s':>9s}", flush=True)
  for _ in range(options["rounds"]):
    for side in SIDES:
      r = _child(side, options["steps"])
      results[side].append(r)
      print(f"{side:8s} {r['step_ms']:10.1f} {r['minor_faults']:12.0f} {r['system_s']:9.2f}",
            flush=True)
  medians = {side: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
             for side, rows in results.items()}
  g, k = medians["glibc"], medians["keep"]
  print(f"median over processes: step {g['step_ms']:.1f} ms (glibc) / {k['step_ms']:.1f} ms "
        f"(kept) = {g['step_ms'] / k['step_ms']:.2f}x; page faults {g['minor_faults']:.0f} / "
        f"{k['minor_faults']:.0f}; system CPU {g['system_s']:.2f} / {k['system_s']:.2f} s",
        flush=True)
  return results


def _child(side: str, steps: int) -> dict[str, float]:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update({host_malloc.ENV: side, "JAX_PLATFORMS": "cpu"})
  code = f"from robust_u1_jax.benchmarks import malloc; malloc.child({steps})"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"malloc: the {side} process failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def child(steps: int) -> None:
  """One process's side: prints its figures as the last line, in JSON."""
  host_malloc.configure()  # before jax starts its backend
  import jax

  from robust_u1_jax import config_lib
  from robust_u1_jax.benchmarks import train_step
  from robust_u1_jax.training import demo

  # The part as the demo runs it (its seed the demo's), from random weights.
  config = demo.part_config(config_lib.load_file(DEMO_CONFIG), "base", "unused")
  config.init_from = "random"
  r = train_step.time_train_step(config_lib.validate(config), jax.devices()[0], seconds=0.0,
                                 min_steps=steps, batches=BATCHES)
  print(json.dumps({"step_ms": 1e3 * r["step_s"], "minor_faults": float(r["timed_minor_faults"]),
                    "system_s": r["timed_system_s"]}), flush=True)
