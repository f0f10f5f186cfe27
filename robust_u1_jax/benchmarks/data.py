"""Data benchmarks: pipeline throughput, and JAX corruptions against host references.

1. Shapes-world pipeline at 64 x 64 with corruption on the fly (the tiny SFT config): samples/s
   of the full pipeline, and of its parts (rendering alone, corruption alone, the pipeline with
   corruption 'none'), so a slow number points at its cause. Goal: >= 500 samples/s on 2 cores.
2. Per-image cost of each Robust-R1 degradation at 64 x 64 (jitted, one image): the pipeline's
   corruption cost is the mean over the drawn degradations, so the expensive ones show here.
3. JAX corruptions on a batch of 64 images at 224 x 224 (jitted, vmapped, via `corrupt_batch`)
   against host references of the same operations (JPEG: PIL; Gaussian blur: scipy.ndimage;
   Gaussian noise: numpy), measured in one run and printed as ratios.

Compilation is excluded from every number (each measurement warms up first).
"""

from __future__ import annotations

import io
import os
import time

import grain
import jax
import numpy as np
from PIL import Image
from scipy import ndimage

from robust_u1_jax import config_lib
from robust_u1_jax.benchmarks import median_time, table
from robust_u1_jax.data import corruptions
from robust_u1_jax.data import pipeline
from robust_u1_jax.data import sources
from robust_u1_jax.data import transforms
from robust_u1_jax.data.corruptions import imagenet_c_digital
from robust_u1_jax.data.corruptions import imagenet_c_noise_blur

DEFAULT_CONFIG = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sft.py")) + ":tiny"
GOAL_SAMPLES_PER_S = 500
HOST_BATCH, HOST_SIZE, SEVERITY = 64, 224, 3


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
    from robust_u1_jax.data.corruptions import robust_r1  # deferred: heavy

    for name in robust_r1.DEGRADATIONS:
      robust_r1.degrade(image, name, key, 0.5)
  names = (transforms.IMAGENET_C_NAMES if spec.mode == "imagenet_c" else
           [spec.name] if spec.mode == "single" else [])
  for name in names:
    qualified = name if "/" in name else f"imagenet_c/{name}"
    level = ({"severity": spec.severity or 1} if spec.level == "severity" or "imagenet_c/" in
             qualified else {"intensity": max(spec.intensity, 0.5)})
    corruptions.corrupt(image, qualified, key, **level)


def pipeline_samples_per_s(data_config, seconds: float, *, seed: int = 0,
                           threads: int | None = None) -> float:
  """Samples/s of make_pipeline over `seconds`, after warming up its compilations."""
  _warm_corruptions(data_config)
  read_options = None
  if threads:
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads + 8)
  p = pipeline.make_pipeline(data_config, seed=seed, read_options=read_options)
  try:
    for _ in range(2):
      next(p)
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      samples += len(next(p)["index"])
    return samples / (time.perf_counter() - start)
  finally:
    p.close()


def _records_per_s(fn, seconds: float) -> float:
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or n < 3:
    fn(n)
    n += 1
  return n / (time.perf_counter() - start)


def pipeline_rows(config_spec: str, seconds: float, threads: int | None = None) -> dict:
  config = _load_config(config_spec)
  data = config.data
  rows: dict[str, float] = {}
  world = sources.make_source(data)
  rows["render the shapes world (1 thread)"] = _records_per_s(lambda i: world[i], seconds)
  spec = transforms.corruption_spec(data.corruption, data.severity, data.intensity)
  _warm_corruptions(data)
  image = world[0]["image"]
  rows[f"corrupt one image: {data.corruption} (1 thread)"] = _records_per_s(
      lambda i: transforms.corrupt_image(image, spec, 0, i, 0), seconds)
  rows["pipeline, corruption none"] = pipeline_samples_per_s(
      _load_config(config_spec, "none").data, seconds, threads=threads)
  rows[f"pipeline, corruption {data.corruption}"] = pipeline_samples_per_s(
      data, seconds, threads=threads)
  return rows


def degradation_costs(image_size: int, reps: int) -> list[tuple[str, float]]:
  """(name, ms per image) of every Robust-R1 degradation, jitted, one image at a time."""
  from robust_u1_jax.data.corruptions import robust_r1  # deferred: heavy

  x = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
  out = []
  for name in robust_r1.DEGRADATIONS:
    fn = lambda: jax.block_until_ready(robust_r1.degrade(x, name, jax.random.key(1), 0.5))
    out.append((name, 1e3 * median_time(fn, 0.0, min_reps=reps)))
  return sorted(out, key=lambda r: -r[1])


# ------------------------------------------------------------------- JAX vs host references

def _host_jpeg(images: np.ndarray, quality: int) -> np.ndarray:
  out = np.empty_like(images)
  for i, im in enumerate(images):
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
      out[i] = np.asarray(decoded.convert("RGB"))
  return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _host_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  x = images.astype(np.float32) / 255.0
  return _to_uint8(ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="reflect"))


def _host_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
  x = images.astype(np.float32) / 255.0
  return _to_uint8(x + rng.normal(0.0, std, x.shape).astype(np.float32))


def jax_vs_host(seconds: float, batch: int = HOST_BATCH, size: int = HOST_SIZE) -> list[tuple]:
  """Rows (operation, JAX ms/batch, host ms/batch, host / JAX) at severity 3."""
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(0), batch)
  rng = np.random.default_rng(1)
  s = SEVERITY - 1
  cases = [
      ("jpeg_compression (PIL)", "imagenet_c/jpeg_compression",
       lambda: _host_jpeg(images, imagenet_c_digital.JPEG_QUALITY[s])),
      ("gaussian_blur (scipy.ndimage)", "imagenet_c/gaussian_blur",
       lambda: _host_blur(images, imagenet_c_noise_blur.GAUSSIAN_BLUR[s])),
      ("gaussian_noise (numpy)", "imagenet_c/gaussian_noise",
       lambda: _host_noise(images, imagenet_c_noise_blur.GAUSSIAN_NOISE[s], rng)),
  ]
  rows = []
  for label, name, host_fn in cases:
    # corrupt_batch returns numpy for numpy input: the device-to-host copy is included, as the
    # host reference's output is numpy too.
    jax_fn = lambda name=name: corruptions.corrupt_batch(images, name, keys, severity=SEVERITY)
    t_jax = median_time(jax_fn, seconds / 2)
    t_host = median_time(host_fn, seconds / 2)
    rows.append((label, 1e3 * t_jax, 1e3 * t_host, t_host / t_jax))
  return rows


def run(*, seconds: float = 3.0, config: str = "", threads: int | None = None) -> dict:
  """Runs the three data benchmarks, printing each table as it completes."""
  spec = config or DEFAULT_CONFIG
  print(f"devices: {jax.devices()}; host CPUs: {os.cpu_count()}; {seconds:g} s per measurement",
        flush=True)
  results = {"pipeline": pipeline_rows(spec, seconds, threads)}
  print(f"\n1. shapes-world pipeline ({spec}), samples/s (goal >= {GOAL_SAMPLES_PER_S} on 2 "
        "cores):")
  print(table(("measurement", "samples/s"), list(results["pipeline"].items())), flush=True)

  size = _load_config(spec).data.image_size
  results["degradations"] = degradation_costs(size, reps=max(3, int(seconds * 3)))
  print(f"\n2. Robust-R1 degradations at {size} x {size}, one image, jitted:")
  print(table(("degradation", "ms/image"), results["degradations"]), flush=True)

  results["jax_vs_host"] = jax_vs_host(seconds)
  print(f"\n3. corruptions on {HOST_BATCH} images at {HOST_SIZE} x {HOST_SIZE}, severity "
        f"{SEVERITY}: JAX (jit + vmap, {jax.default_backend()}) vs host reference")
  print(table(("operation", "JAX ms", "host ms", "host/JAX"), results["jax_vs_host"]),
        flush=True)
  return results
