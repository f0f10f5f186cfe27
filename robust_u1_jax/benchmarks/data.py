"""`python -m robust_u1_jax.bench data`: the Grain input pipeline's speed, corrupted vs clean.

1. Shapes-world pipeline at 64 x 64 (the tiny SFT config) with its on-the-fly corruption (the
   Robust-R1 four-stage pipeline) against the same pipeline with corruption 'none', measured in
   one run: the two take turns for several rounds (each round builds its pipeline afresh, so one
   side's prefetch threads never run during the other's turn), and the ratio printed is the median
   of the per-round cost ratios with its spread. Also the parts (rendering alone, corrupting one
   record alone), so a slow number points at its cause. Goal: >= 500 samples/s on 2 cores.
2. Per-image cost of each Robust-R1 degradation at 64 x 64 (jitted, one image, alternated): the
   pipeline's corruption cost is the mean over the drawn degradations, so the expensive ones show.

JAX corruptions against host references (NumPy, SciPy, PIL) are `bench corrupt`.
Compilation is excluded from every number (each measurement warms up first).
"""

from __future__ import annotations

import os
import statistics
import time

import grain
import jax
import numpy as np

from robust_u1_jax import config_lib
from robust_u1_jax.benchmarks import Ratio, alternate, goal, table, usable_cpus
from robust_u1_jax.data import corruptions
from robust_u1_jax.data import pipeline
from robust_u1_jax.data import sources
from robust_u1_jax.data import transforms

DEFAULT_CONFIG = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sft.py")) + ":tiny"
GOAL_SAMPLES_PER_S = 500
GOAL_COST_RATIO = 1.2  # corrupted / clean, the goal when corruption runs on the device
ROUNDS = 5


def _load_config(spec: str, corruption: str | None = None):
  overrides = {"data.shapes_size": 1_000_000}
  if corruption is not None:
    overrides["data.corruption"] = corruption
  return config_lib.load(spec, overrides)


def _warm_corruptions(data_config) -> None:
  """Compiles every corruption the config can draw at its image size, outside the timings."""
  spec = transforms.corruption_spec(data_config.corruption, data_config.severity,
                                    data_config.intensity)
  if spec.mode == "none":
    return
  hw = transforms.bagel_size(data_config.image_size, data_config.image_size,
                             **transforms.resize_rule(data_config, "vae"))
  image = np.zeros((*hw, 3), np.uint8)
  key = jax.random.key(0)
  if spec.mode == "pipeline":
    level = {"intensity": spec.intensity} if spec.intensity >= 0 else {}
    corruptions.corrupt(image, corruptions.PIPELINE, key, **level)
    return
  names = (transforms.IMAGENET_C_NAMES if spec.mode == "imagenet_c" else
           [spec.name] if spec.mode == "single" else [])
  for name in names:
    qualified = name if "/" in name else f"imagenet_c/{name}"
    level = ({"severity": spec.severity or 1} if spec.level == "severity" or "imagenet_c/" in
             qualified else {"intensity": max(spec.intensity, 0.5)})
    corruptions.corrupt(image, qualified, key, **level)


def _read_options(threads: int | None):
  if not threads:
    return None
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads + 8)


def pipeline_samples_per_s(data_config, seconds: float, *, seed: int = 0,
                           threads: int | None = None) -> float:
  """Samples/s of a fresh make_pipeline over `seconds`, after two batches of warm-up."""
  p = pipeline.make_pipeline(data_config, seed=seed, read_options=_read_options(threads))
  try:
    for _ in range(2):
      next(p)
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      samples += len(next(p)["index"])
    return samples / (time.perf_counter() - start)
  finally:
    p.close()


def compare_pipelines(config_spec: str, seconds: float, *, threads: int | None = None,
                      rounds: int = ROUNDS, corruption: str | None = None) -> dict:
  """The config's pipeline (corrupted; `corruption` replaces the config's) and the same with
  corruption 'none' (clean), alternated round by round; `seconds` per side per round. Returns
  samples/s per round of each and the per-round cost ratio corrupted / clean (time per sample)."""
  corrupted = _load_config(config_spec, corruption).data
  clean = _load_config(config_spec, "none").data
  _warm_corruptions(corrupted)
  rates: dict[str, list[float]] = {"clean": [], "corrupted": []}
  for r in range(rounds):
    order = ("clean", "corrupted") if r % 2 == 0 else ("corrupted", "clean")
    for side in order:
      data = clean if side == "clean" else corrupted
      rates[side].append(pipeline_samples_per_s(data, seconds, seed=r, threads=threads))
  return {"corruption": corrupted.corruption, "clean": rates["clean"],
          "corrupted": rates["corrupted"],
          "cost_ratio": Ratio.of(c / k for c, k in zip(rates["clean"], rates["corrupted"]))}


def _records_per_s(fn, seconds: float) -> float:
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or n < 3:
    fn(n)
    n += 1
  return n / (time.perf_counter() - start)


def part_rows(config_spec: str, seconds: float) -> dict[str, float]:
  """Records/s of the pipeline's parts, each alone on one thread."""
  data = _load_config(config_spec).data
  rows: dict[str, float] = {}
  world = sources.make_source(data)
  rows["render the shapes world"] = _records_per_s(lambda i: world[i], seconds)
  spec = transforms.corruption_spec(data.corruption, data.severity, data.intensity)
  _warm_corruptions(data)
  image = world[0]["image"]
  rows[f"corrupt one record: {data.corruption}"] = _records_per_s(
      lambda i: transforms.corrupt_image(image, spec, 0, i, 0), seconds)
  return rows


def degradation_costs(image_size: int, seconds: float) -> list[tuple[str, float]]:
  """(name, ms per image) of every Robust-R1 degradation, jitted, one image at a time; all
  alternated in one loop, so load from other processes spreads over them alike."""
  from robust_u1_jax.data.corruptions import robust_r1  # deferred: heavy

  x = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
  key = jax.random.key(1)
  fns = {name: (lambda name=name: jax.block_until_ready(robust_r1.degrade(x, name, key, 0.5)))
         for name in robust_r1.DEGRADATIONS}
  timed = alternate(fns, seconds, min_reps=3)
  return sorted(((name, 1e3 * timed.median(name)) for name in fns), key=lambda r: -r[1])


def run(*, seconds: float = 3.0, config: str = "", threads: int | None = None) -> dict:
  """Runs both data benchmarks, printing each table as it completes."""
  spec = config or DEFAULT_CONFIG
  _load_config(spec)  # a bad config or variant is the command's one line, before any other
  print(f"devices: {jax.devices()}; corruption on {corruptions.data_device()}; host CPUs: "
        f"{usable_cpus()}; {seconds:g} s per measurement", flush=True)
  results = {"parts": part_rows(spec, seconds)}
  cmp = results["pipelines"] = compare_pipelines(spec, seconds, threads=threads)
  clean, corrupted = statistics.median(cmp["clean"]), statistics.median(cmp["corrupted"])
  print(f"\n1. shapes-world pipeline ({spec}), samples/s, {ROUNDS} alternated rounds (goal >= "
        f"{GOAL_SAMPLES_PER_S} with corruption on 2 cores):")
  rows = [(f"{name} (1 thread)", v) for name, v in results["parts"].items()]
  rows += [("pipeline, corruption none", clean),
           (f"pipeline, corruption {cmp['corruption']}", corrupted)]
  print(table(("measurement", "samples/s"), rows))
  cpus = usable_cpus()
  print(f"   with corruption: {corrupted:.0f} samples/s "
        f"{goal(corrupted, GOAL_SAMPLES_PER_S, at_most=False)}"
        + ("" if cpus == 2 else f", a goal for 2 cores, measured on {cpus}"))
  on_device = corruptions.data_device().platform != "cpu"
  print(f"   corrupted / clean cost per sample: {cmp['cost_ratio']}"
        + (f" {goal(cmp['cost_ratio'].median, GOAL_COST_RATIO, at_most=True)}" if on_device
           else ""), flush=True)

  size = _load_config(spec).data.image_size
  results["degradations"] = degradation_costs(size, seconds)
  print(f"\n2. Robust-R1 degradations at {size} x {size}, one image, jitted, alternated:")
  print(table(("degradation", "ms/image"), results["degradations"]), flush=True)
  return results
