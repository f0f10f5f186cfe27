"""The Robust-R1 degradation family: 16 degradations in four stages, and the weighted pipeline.

Robust-R1 (Tang et al., 2025) synthesises its training and adversarial-evaluation images by
degrading along the imaging chain: capture, transmission, environment, post-processing. The
pipeline applies one degradation per stage, in that order, each drawn by its weight within the
stage, at an intensity I in [0, 1] (one given I for every stage, or one drawn uniformly per
stage). Evaluation at "25% / 50% / 100%" uses I = 0.23 / 0.45 / 0.9 (`EVAL_INTENSITIES`).

Stage weights are those of the Robust-R1 release (add_degradation/generate_degradation.py):
uniform within a stage (20 each for the five capture degradations, 25 each in transmission and
environment, 33 / 33 / 34 for sharpness_change / graffiti / watermark_damage).

Each degradation's parameterisation is documented in its stage module (`robust_r1_capture`,
`robust_r1_transmission`, `robust_r1_environment`, `robust_r1_post`): the release's formulas
where they are continuous and identity at I = 0 (gaussian noise sigma 75 I / 255, dark
illumination x (1 - I^2), saturation x (1 - I), ...), otherwise reworked to be, and pixel sizes
scaled to the image (`robust_r1_common`). One exception keeps the release's formula: JPEG at
quality max(5, int(100 - 95 I)) is a round trip at quality 100 at I = 0, which still subsamples
the colour (a mean change of a few levels), so the pipeline at I = 0 is near the image, not it.

All 16 are pure JAX with a traced intensity (`host_side=False`): jit them once per image shape
and vmap them over a batch. `pipeline` is the whole four-stage pipeline as one pure JAX function
(a `lax.switch` per stage: jitted on one image only the drawn branch runs; under vmap every
branch is computed, so it costs all 16). The host entry points `degrade`, `sample_plan`,
`apply_pipeline` (one image: one jitted program with the plan, the four drawn degradations and the
pixel conversions, on the host CPU for numpy images) and `apply_pipeline_batch` (a batch, each
image paying only its own four degradations) take uint8 or float32 [0, 1] images, return the
same dtype, and would run any `host_side=True` degradation outside jit.
"""

from collections.abc import Callable, Mapping
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import pixels
from robust_u1_jax.data.corruptions import ops
from robust_u1_jax.data.corruptions import placement
from robust_u1_jax.data.corruptions import robust_r1_capture as _capture
from robust_u1_jax.data.corruptions import robust_r1_common as _common
from robust_u1_jax.data.corruptions import robust_r1_environment as _environment
from robust_u1_jax.data.corruptions import robust_r1_post as _post
from robust_u1_jax.data.corruptions import robust_r1_transmission as _transmission

REFERENCE_SIZE = _common.REFERENCE_SIZE
STAGES: tuple[str, ...] = ("capture", "transmission", "environment", "post_processing")
# "25% / 50% / 100%" corruption in the Robust-R1 evaluation -> intensity I.
EVAL_INTENSITIES: dict[int, float] = {25: 0.23, 50: 0.45, 100: 0.9}


@dataclasses.dataclass(frozen=True)
class Degradation:
  """One Robust-R1 degradation.

  fn(x_hwc_float01, key, intensity, *, reference_size=REFERENCE_SIZE) -> x_hwc_float01; with
  host_side=False it is pure JAX (intensity may be traced), else it takes numpy and a float.
  """
  name: str
  stage: str
  weight: float
  fn: Callable
  host_side: bool = False


_WEIGHTS = {
    "capture": {"lens_blur": 20, "lens_flare": 20, "motion_blur": 20, "dirty_lens": 20,
                "hsv_saturation": 20},
    "transmission": {"jpeg_compression": 25, "block_exchange": 25, "mean_shift": 25,
                     "scan_lines": 25},
    "environment": {"dark_illumination": 25, "atmospheric_turbulence": 25, "gaussian_noise": 25,
                    "color_diffusion": 25},
    "post_processing": {"sharpness_change": 33, "graffiti": 33, "watermark_damage": 34},
}
_FNS = {**_capture.CAPTURE, **_transmission.TRANSMISSION, **_environment.ENVIRONMENT,
        **_post.POST_PROCESSING}

DEGRADATIONS: dict[str, Degradation] = {
    name: Degradation(name, stage, float(weight), _FNS[name])
    for stage, table in _WEIGHTS.items() for name, weight in table.items()
}
PlanStep = tuple[str, str, float]  # (stage, degradation name, intensity)
# For the registry: the pipeline is one jitted program (`apply_pipeline`), not host code.
PIPELINE_HOST_SIDE = False


def _stage_members(table: Mapping[str, Degradation]) -> list[list[Degradation]]:
  members = [[d for d in table.values() if d.stage == stage] for stage in STAGES]
  for stage, m in zip(STAGES, members):
    if not m:
      raise ValueError(f"degradation table has no degradation for stage {stage!r}")
  unknown = sorted({d.stage for d in table.values()} - set(STAGES))
  if unknown:
    raise ValueError(f"degradation stages {unknown} are not among {list(STAGES)}")
  return members


def stage_keys(key) -> jax.Array:
  """The key each stage's degradation is applied with (len(STAGES) keys), as `pipeline` and
  `apply_pipeline` use them. The plan itself is drawn from a further key of the same split."""
  return jax.random.split(key, len(STAGES) + 1)[1:]


def _draw(key, intensity, members) -> tuple[jax.Array, jax.Array]:
  """Indices (within each stage) and intensities of the plan: two arrays of len(STAGES).

  One uniform draw serves every stage: each jax.random call compiles to its own threefry
  kernel, so a single draw keeps the plan cheap to compile and to vmap over many keys.
  """
  k_plan = jax.random.split(key, len(STAGES) + 1)[0]
  u = jax.random.uniform(k_plan, (2, len(STAGES)))
  idx = []
  for s, m in enumerate(members):
    w = np.asarray([d.weight for d in m], np.float64)
    thresholds = jnp.asarray(np.cumsum(w)[:-1] / w.sum(), jnp.float32)
    idx.append(jnp.sum(u[0, s] >= thresholds).astype(jnp.int32))  # inverse CDF of the weights
  intens = u[1] if intensity is None else jnp.full((len(STAGES),), intensity, jnp.float32)
  return jnp.stack(idx), intens


@functools.lru_cache(maxsize=16)
def _plan_drawer(table_values: tuple[Degradation, ...], fixed: bool) -> Callable:
  members = _stage_members({d.name: d for d in table_values})
  if fixed:
    return jax.jit(lambda key, intensity: _draw(key, intensity, members))
  return jax.jit(lambda key: _draw(key, None, members))


def plan_arrays(key, intensity=None, *, table: Mapping[str, Degradation] = DEGRADATIONS):
  """Jitted plan draw for one key: (stage-local indices, intensities), each of len(STAGES).

  Cheap and vmap-able over keys (`jax.vmap(lambda k: plan_arrays(k))`); `sample_plan` names it.
  """
  if intensity is None:
    return _plan_drawer(tuple(table.values()), False)(key)
  return _plan_drawer(tuple(table.values()), True)(key, intensity)


def sample_plan(key, intensity=None, *,
                table: Mapping[str, Degradation] = DEGRADATIONS) -> list[PlanStep]:
  """The (stage, name, intensity) that `apply_pipeline(image, key, intensity)` will apply."""
  if intensity is not None:
    _common.check_intensity(intensity, "robust_r1 pipeline")
  members = _stage_members(table)
  idx, intens = jax.device_get(plan_arrays(key, intensity, table=table))
  return [(stage, m[int(j)].name, float(v)) for stage, m, j, v in zip(STAGES, members, idx, intens)]


@functools.lru_cache(maxsize=64)
def _jitted(fn: Callable, reference_size: int | None) -> Callable:
  return jax.jit(functools.partial(fn, reference_size=reference_size))


def _run(deg: Degradation, x_hwc, key, intensity, reference_size) -> jax.Array:
  if deg.host_side:
    out = deg.fn(np.asarray(x_hwc, np.float32), key, float(intensity),
                 reference_size=reference_size)
    return jnp.asarray(out, jnp.float32)
  return _jitted(deg.fn, reference_size)(x_hwc, key, intensity)


def degrade(image, name: str, key, intensity, *, reference_size: int | None = REFERENCE_SIZE,
            table: Mapping[str, Degradation] = DEGRADATIONS) -> jax.Array:
  """Applies Robust-R1 degradation `name` at `intensity` to a uint8 or float [0, 1] H x W x 3
  image; returns the same dtype and shape. Deterministic per key."""
  if name not in table:
    raise ValueError(f"unknown Robust-R1 degradation {name!r}; allowed: {sorted(table)}")
  _common.check_image(image, f"robust_r1/{name}")
  _common.check_intensity(intensity, f"robust_r1/{name}")
  dtype = jnp.asarray(image).dtype
  out = _run(table[name], ops.to_float(image), key, intensity, reference_size)
  return ops.from_float(out, dtype)


def _planned(x_hwc, key, intensity, members, reference_size):
  """(degraded x, stage-local indices, intensities): the pipeline of one float image. Under jit
  and without vmap each `lax.switch` runs only the drawn branch."""
  idx, intens = _draw(key, intensity, members)
  x = x_hwc.astype(jnp.float32)
  for s, (m, k_apply) in enumerate(zip(members, stage_keys(key))):
    branches = [functools.partial(d.fn, reference_size=reference_size) for d in m]
    x = jax.lax.switch(idx[s], branches, x, k_apply, intens[s])
  return x, idx, intens


@functools.lru_cache(maxsize=64)
def _pipeline_program(table_values: tuple[Degradation, ...], reference_size: int | None,
                      intensity_kind: str, out_dtype: np.dtype, batch: str) -> Callable:
  """jit(images, keys, intensity) -> (images in out_dtype, indices, intensities).

  intensity_kind: 'drawn' (per stage from the key; the argument is ignored), 'fixed' (one
  scalar) or 'per_image' (B values). batch: '' (one image) or 'map' (a loop over the batch:
  each image runs its own four degradations, where vmap would run all 16 branches for all).
  """
  members = _stage_members({d.name: d for d in table_values})

  def one(image, key, intensity):  # pixels converted per image (see corruptions._program)
    x = jax.lax.optimization_barrier(pixels.to_float(image))
    x, idx, intens = _planned(x, key, None if intensity_kind == "drawn" else intensity, members,
                              reference_size)
    return ops.from_float(jax.lax.optimization_barrier(x), out_dtype), idx, intens

  def program(images, keys, intensity):
    if batch != "map":
      return one(images, keys, intensity)
    if intensity_kind == "per_image":
      return jax.lax.map(lambda a: one(*a), (images, keys, intensity))
    return jax.lax.map(lambda a: one(a[0], a[1], intensity), (images, keys))

  return jax.jit(program)


def _plan_list(members, idx, intens) -> list[PlanStep]:
  return [(stage, m[int(j)].name, float(v)) for stage, m, j, v in zip(STAGES, members, idx, intens)]


def _intensity_kind(intensity) -> str:
  if intensity is None:
    return "drawn"
  return "per_image" if np.ndim(intensity) == 1 else "fixed"


def apply_pipeline(image, key, intensity=None, *, reference_size: int | None = REFERENCE_SIZE,
                   return_plan: bool = False, table: Mapping[str, Degradation] = DEGRADATIONS):
  """Four-stage Robust-R1 pipeline on one uint8 or float [0, 1] H x W x 3 image.

  One degradation per stage (drawn by weight), intensity `intensity` for all stages or, when
  None, drawn uniformly in [0, 1] per stage. Returns the degraded image in the input dtype, and
  with return_plan=True also the list of (stage, name, intensity) applied.

  One jitted program (plan, the four drawn degradations, the pixel conversions) per image
  shape: a record costs one dispatch. A numpy image runs on the host CPU. Equal to `pipeline`
  for the same key; under jit or vmap (traced inputs) it is `pipeline`. A table holding
  host-side degradations runs the plan step by step instead.
  """
  _common.check_image(image, "robust_r1 pipeline")
  if intensity is not None:
    _common.check_intensity(intensity, "robust_r1 pipeline")
  dtype = jnp.asarray(image).dtype
  if any(isinstance(v, jax.core.Tracer) for v in (image, key, intensity)):
    if return_plan:
      raise ValueError("apply_pipeline(return_plan=True) needs concrete inputs, not traced ones; "
                       "use plan_arrays under jit")
    out = pipeline(ops.to_float(image), key, intensity, reference_size=reference_size, table=table)
    return ops.from_float(out, dtype)
  if any(d.host_side for d in table.values()):
    plan = sample_plan(key, intensity, table=table)
    x = ops.to_float(image)
    for k_apply, (_, name, value) in zip(stage_keys(key), plan):
      step_intensity = value if intensity is None else intensity
      x = _run(table[name], x, k_apply, step_intensity, reference_size)
    out = ops.from_float(x, dtype)
    return (out, plan) if return_plan else out
  program = _pipeline_program(tuple(table.values()), reference_size,
                              _intensity_kind(intensity), np.dtype(dtype), "")
  args = (image, key, np.float32(0.0 if intensity is None else intensity))
  device = placement.of(image)
  with placement.running_on(device):
    out, idx, intens = program(*(args if device is None else jax.device_put(args, device)))
  if isinstance(image, np.ndarray):
    out = np.asarray(out)
  if not return_plan:
    return out
  idx, intens = jax.device_get((idx, intens))
  return out, _plan_list(_stage_members(table), idx, intens)


def apply_pipeline_batch(images_bhwc, keys_b, intensity=None, *, batch: str = "map",
                         reference_size: int | None = REFERENCE_SIZE, return_plans: bool = False,
                         table: Mapping[str, Degradation] = DEGRADATIONS):
  """`apply_pipeline` over a batch (B x H x W x 3, one key per image); `intensity` None, one
  value, or B values. Returns the images (and with return_plans, one plan per image).

  Every image costs its own four degradations, however the batch's plans differ:
    'map'   one program looping over the images (the default; the fastest form on a CPU);
    'vmap'  the plans are drawn first, then per stage the images are grouped by their drawn
            degradation and each group runs vmapped (for accelerators, where a loop of small
            kernels would leave the chip idle). A vmapped `pipeline` would instead run all 16
            degradations on every image (its `lax.switch` becomes a select).
  """
  if np.ndim(images_bhwc) != 4:
    raise ValueError(f"images shape {np.shape(images_bhwc)} is not B x H x W x 3")
  _common.check_image(images_bhwc[0], "robust_r1 pipeline")
  n = int(np.shape(images_bhwc)[0])
  if intensity is not None:
    for value in np.atleast_1d(np.asarray(intensity, np.float64)):
      _common.check_intensity(float(value), "robust_r1 pipeline")
    if np.ndim(intensity) == 1 and len(intensity) != n:
      raise ValueError(f"{len(intensity)} intensities for a batch of {n} images")
  if any(d.host_side for d in table.values()):
    levels = list(intensity) if np.ndim(intensity) == 1 else [intensity] * n
    results = [apply_pipeline(images_bhwc[i], keys_b[i], levels[i], reference_size=
                              reference_size, return_plan=True, table=table) for i in range(n)]
    out = np.stack([np.asarray(o) for o, _ in results])
    if not isinstance(images_bhwc, np.ndarray):
      out = jnp.asarray(out)
    return (out, [p for _, p in results]) if return_plans else out
  dtype = np.dtype(images_bhwc.dtype)
  kind = _intensity_kind(intensity)
  level = np.asarray(0.0 if intensity is None else intensity, np.float32)
  device = placement.of(images_bhwc)
  args = (images_bhwc, keys_b, level)
  args = args if device is None else jax.device_put(args, device)
  members = _stage_members(table)
  if batch not in ("map", "vmap"):
    raise ValueError(f"batch={batch!r} is not 'map' or 'vmap'")
  with placement.running_on(device):
    if batch == "map":
      program = _pipeline_program(tuple(table.values()), reference_size, kind, dtype, "map")
      out, idx, intens = program(*args)
    else:
      out, idx, intens = _grouped(*args, kind, members, reference_size, dtype)
  if isinstance(images_bhwc, np.ndarray):
    out = np.asarray(out)
  if not return_plans:
    return out
  idx, intens = jax.device_get((idx, intens))
  return out, [_plan_list(members, idx[i], intens[i]) for i in range(n)]


@functools.lru_cache(maxsize=16)
def _batch_plan_drawer(table_values: tuple[Degradation, ...], kind: str) -> Callable:
  members = _stage_members({d.name: d for d in table_values})
  if kind == "drawn":
    return jax.jit(jax.vmap(lambda key, _: _draw(key, None, members), in_axes=(0, None)))
  axis = 0 if kind == "per_image" else None
  return jax.jit(jax.vmap(lambda key, i: _draw(key, i, members), in_axes=(0, axis)))


@functools.lru_cache(maxsize=256)
def _group_program(fn: Callable, reference_size: int | None, first: bool, last: bool,
                   out_dtype: np.dtype) -> Callable:
  """jit(vmap(degradation)) over a group, converting pixels on the way in (first stage) and out
  (last stage)."""
  one = functools.partial(fn, reference_size=reference_size)

  def program(x, keys, intens):
    y = jax.vmap(one)(pixels.to_float(x) if first else x, keys, intens)
    return ops.from_float(y, out_dtype) if last else y

  return jax.jit(program)


def _bucket(n: int) -> int:
  """Group sizes are padded to powers of two: a few compilations serve every group size."""
  return 1 << max(0, n - 1).bit_length()


def _grouped(images, keys, level, kind, members, reference_size, out_dtype):
  """The 'vmap' form of apply_pipeline_batch: plans first, then stage by stage one vmapped call
  per drawn degradation over the images that drew it."""
  table_values = tuple(d for m in members for d in m)
  idx, intens = _batch_plan_drawer(table_values, kind)(keys, level)
  idx_host = np.asarray(jax.device_get(idx))
  stage_k = jax.vmap(stage_keys)(keys)  # (B, stages)
  x = images
  for s, m in enumerate(members):
    first, last = s == 0, s == len(members) - 1
    parts = []
    for j, deg in enumerate(m):
      chosen = np.flatnonzero(idx_host[:, s] == j)
      if not chosen.size:
        continue
      padded = np.resize(chosen, _bucket(chosen.size))  # repeats members: same work, no new size
      program = _group_program(deg.fn, reference_size, first, last, out_dtype)
      y = program(x[padded], stage_k[padded, s], intens[padded, s])
      parts.append((chosen, y[:chosen.size]))
    order = np.argsort(np.concatenate([c for c, _ in parts]))
    x = jnp.concatenate([y for _, y in parts])[order]
  return x, idx, intens


def pipeline(x_hwc, key, intensity=None, *, reference_size: int | None = REFERENCE_SIZE,
             table: Mapping[str, Degradation] = DEGRADATIONS) -> jax.Array:
  """The four-stage pipeline as one pure JAX function of a float [0, 1] image (jit + vmap).

  Same draws and result as `apply_pipeline` for the same key. Every degradation of `table`
  must be JAX (host_side=False). Under vmap each stage's `lax.switch` runs every branch for
  every image; `apply_pipeline_batch` runs only the drawn ones.
  """
  host = sorted(d.name for d in table.values() if d.host_side)
  if host:
    raise ValueError(f"pipeline runs inside jit; host-side degradations {host} need "
                     "apply_pipeline")
  return _planned(x_hwc, key, intensity, _stage_members(table), reference_size)[0]
