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
where they are continuous and identity at I = 0 (gaussian noise sigma 75 I / 255, JPEG quality
max(5, int(100 - 95 I)), dark illumination x (1 - I^2), saturation x (1 - I), ...), otherwise
reworked to be, and pixel sizes scaled to the image (`robust_r1_common`).

All 16 are pure JAX with a traced intensity (`host_side=False`): jit them once per image shape
and vmap them over a batch. `pipeline` is the whole four-stage pipeline as one pure JAX function
(a `lax.switch` per stage; under vmap every branch is computed, so it costs all 16). The host
entry points `degrade`, `sample_plan` and `apply_pipeline` take uint8 or float32 [0, 1]
images, return the same dtype, and would run any `host_side=True` degradation outside jit.
"""

from collections.abc import Callable, Mapping
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax.data.corruptions import ops
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
# For the registry: `apply_pipeline` draws its plan on the host and then runs only the four
# drawn degradations (each jitted on its own), which compiles far less than `pipeline`, whose
# jit holds all 16. Called under a trace it falls back to `pipeline`.
PIPELINE_HOST_SIDE = True


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


def apply_pipeline(image, key, intensity=None, *, reference_size: int | None = REFERENCE_SIZE,
                   return_plan: bool = False, table: Mapping[str, Degradation] = DEGRADATIONS):
  """Four-stage Robust-R1 pipeline on one uint8 or float [0, 1] H x W x 3 image.

  One degradation per stage (drawn by weight), intensity `intensity` for all stages or, when
  None, drawn uniformly in [0, 1] per stage. Returns the degraded image in the input dtype, and
  with return_plan=True also the list of (stage, name, intensity) applied. Equal to `pipeline`
  for the same key (JAX degradations are jitted one by one; host-side ones run in between);
  under jit or vmap (traced inputs) it is `pipeline`.
  """
  _common.check_image(image, "robust_r1 pipeline")
  dtype = jnp.asarray(image).dtype
  if any(isinstance(v, jax.core.Tracer) for v in (image, key, intensity)):
    if return_plan:
      raise ValueError("apply_pipeline(return_plan=True) needs concrete inputs, not traced ones; "
                       "use plan_arrays under jit")
    out = pipeline(ops.to_float(image), key, intensity, reference_size=reference_size, table=table)
    return ops.from_float(out, dtype)
  plan = sample_plan(key, intensity, table=table)
  x = ops.to_float(image)
  for k_apply, (_, name, value) in zip(stage_keys(key), plan):
    step_intensity = value if intensity is None else intensity
    x = _run(table[name], x, k_apply, step_intensity, reference_size)
  out = ops.from_float(x, dtype)
  return (out, plan) if return_plan else out


def pipeline(x_hwc, key, intensity=None, *, reference_size: int | None = REFERENCE_SIZE,
             table: Mapping[str, Degradation] = DEGRADATIONS) -> jax.Array:
  """The four-stage pipeline as one pure JAX function of a float [0, 1] image (jit + vmap).

  Same draws and result as `apply_pipeline` for the same key. Every degradation of `table`
  must be JAX (host_side=False).
  """
  host = sorted(d.name for d in table.values() if d.host_side)
  if host:
    raise ValueError(f"pipeline runs inside jit; host-side degradations {host} need "
                     "apply_pipeline")
  members = _stage_members(table)
  idx, intens = _draw(key, intensity, members)
  x = x_hwc.astype(jnp.float32)
  for s, (m, k_apply) in enumerate(zip(members, stage_keys(key))):
    branches = [functools.partial(d.fn, reference_size=reference_size) for d in m]
    x = jax.lax.switch(idx[s], branches, x, k_apply, intens[s])
  return x
