"""Corruption registry: one entry point for ImageNet-C and Robust-R1 corruptions.

  corrupt(image, name, key, *, severity=None, intensity=None) -> image
  corrupt_batch(images_bhwc, name, keys_b, *, severity=None, intensity=None, batch=None)
      -> images_bhwc
  list_corruptions() -> [(qualified_name, family), ...]
  is_host_side(name, *, severity=None, intensity=None) -> bool
  data_device() -> the host CPU device data-side corruption runs on

Names are qualified ("imagenet_c/fog", "robust_r1/lens_flare") or short ("fog"). A short name
resolves by which level is given: `severity` (int 1..5) selects ImageNet-C, `intensity` (float in
[0, 1]) selects Robust-R1 (gaussian_noise, motion_blur and jpeg_compression exist in both).
"robust_r1_pipeline" applies the four-stage Robust-R1 pipeline (intensity optional: drawn from
the key when omitted). At intensity 1 its environment stage's dark_illumination (drawn one time in
four) multiplies by 1 - I^2 = 0, the reference formula: a black image; the evaluation's 100 % is
intensity 0.9. Families: "imagenet_c/{noise,blur,weather,digital}" and
"robust_r1/<stage>".

Images are H x W x 3, uint8 [0, 255] or float [0, 1], numpy or jax; the result has the input's
dtype, shape and array kind (numpy in, numpy out). Same image, name, level and key give the same
result, and a uint8 image gives exactly the result of its float image as `ops.to_float` makes it,
rounded (a float image made otherwise, numpy's u8 / 255, is one ulp off at half the levels, which
pixelate's rounding can turn into one level in a few % of the pixels).

Where it runs: a numpy image (the data path's) is corrupted on the host CPU (`data_device`),
whatever the default backend and outside any mesh the caller has set (`placement`), so a TPU host
never sends records to the chip and back; a jax array is corrupted on the device holding it. Each
call is one jitted program, pixel conversions (`robust_u1_jax.pixels`) included: uint8 goes in and
comes out. A single image's program takes its level as a traced argument (one compilation per name
and image shape serves every level); `corrupt_batch` binds one severity for the whole batch into
its program (constant kernel sizes and tables run faster) and loops over the images inside it
('map', on a CPU: each image runs only its own branches), or vectorises them ('vmap', on
accelerators). Host-side corruptions (`is_host_side`) run in Python.
"""

from collections.abc import Callable
import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import pixels
from robust_u1_jax.data.corruptions import imagenet_c
from robust_u1_jax.data.corruptions import ops
from robust_u1_jax.data.corruptions import placement
from robust_u1_jax.data.corruptions.placement import data_device  # noqa: F401 (the package's API)

PIPELINE = "robust_r1_pipeline"
SEVERITIES = imagenet_c.SEVERITIES


@dataclasses.dataclass(frozen=True)
class Corruption:
  """One registered corruption. `fn(x_hwc_float01, key, level) -> x_hwc_float01`."""
  name: str  # qualified, e.g. "imagenet_c/fog"
  family: str  # e.g. "imagenet_c/weather", "robust_r1/capture"
  level: str  # "severity" (int 1..5) or "intensity" (float in [0, 1])
  fn: Callable
  host_side: bool = False
  # The level enters the jitted program as a traced argument (one compilation for all levels)
  # rather than as a compile-time constant.
  traced_level: bool = False


def _imagenet_c_entries() -> dict[str, Corruption]:
  return {f"imagenet_c/{name}": Corruption(f"imagenet_c/{name}", f"imagenet_c/{c.group}",
                                           "severity", c.fn, traced_level=True)
          for name, c in imagenet_c.CORRUPTIONS.items()}


def _robust_r1():
  # Imported on first use: robust_r1 builds on this package's ops and jpeg modules.
  return importlib.import_module("robust_u1_jax.data.corruptions.robust_r1")


def _robust_r1_entries() -> dict[str, Corruption]:
  # Robust-R1 degradations take a traced intensity unless they are host-side.
  return {f"robust_r1/{name}": Corruption(f"robust_r1/{name}", f"robust_r1/{d.stage}",
                                          "intensity", d.fn, d.host_side,
                                          traced_level=not d.host_side)
          for name, d in _robust_r1().DEGRADATIONS.items()}


@functools.cache
def registry() -> dict[str, Corruption]:
  """Every single corruption by qualified name (the pipeline is not one of them)."""
  return {**_imagenet_c_entries(), **_robust_r1_entries()}


def list_corruptions() -> list[tuple[str, str]]:
  """(qualified_name, family) of every single corruption, ImageNet-C first."""
  return [(c.name, c.family) for c in registry().values()]


def expand_types(types, family: str) -> list[str]:
  """Qualified names of a config's `<family>_types`: ('all',) for every corruption of the family,
  else each name, short ('fog') or qualified ('imagenet_c/fog')."""
  if list(types) == ["all"]:
    return [name for name, _ in list_corruptions() if name.startswith(family + "/")]
  return [t if "/" in t else f"{family}/{t}" for t in types]


def _valid_names() -> str:
  qualified = list(registry())
  short = sorted({q.split("/", 1)[1] for q in qualified})
  return ", ".join(qualified + [PIPELINE]) + "; short names: " + ", ".join(short)


class LevelError(ValueError):
  """A severity or intensity the corruption does not take; its parts for a caller's own words
  (`corrupt` names its flag)."""

  def __init__(self, level: str, value, name: str, allowed: str):
    super().__init__(f"{level} {value!r} for {name} is invalid: allowed {allowed}")
    self.level, self.value, self.name, self.allowed = level, value, name, allowed


def _check_severity(name: str, severity) -> int:
  if (isinstance(severity, bool) or not isinstance(severity, (int, np.integer))
      or int(severity) not in SEVERITIES):
    raise LevelError("severity", severity, name, "1, 2, 3, 4, 5")
  return int(severity)


def _check_intensity(name: str, intensity) -> float:
  try:
    value = float(intensity)
  except (TypeError, ValueError):
    value = float("nan")
  if isinstance(intensity, bool) or not 0.0 <= value <= 1.0:
    raise LevelError("intensity", intensity, name, "a float in [0, 1]")
  return value


def resolve(name: str, *, severity=None, intensity=None) -> tuple[str, int | float | None]:
  """(qualified name or PIPELINE, validated level) for a name and the level given.

  Raises ValueError naming the valid names or the allowed levels.
  """
  if not isinstance(name, str):
    raise ValueError(f"corruption name {name!r} is not a string: valid names are {_valid_names()}")
  if name == PIPELINE:
    if severity is not None:
      raise ValueError(f"{PIPELINE} takes an intensity in [0, 1] (or none), not a severity")
    return PIPELINE, None if intensity is None else _check_intensity(name, intensity)
  reg = registry()
  if severity is not None and intensity is not None:
    raise ValueError(f"give either severity (ImageNet-C, 1..5) or intensity (Robust-R1, [0, 1]) "
                     f"for {name}, not both")
  if "/" in name:
    if name not in reg:
      raise ValueError(f"unknown corruption {name!r}: valid names are {_valid_names()}")
    qualified = name
  else:
    candidates = [q for q in reg if q.split("/", 1)[1] == name]
    if not candidates:
      raise ValueError(f"unknown corruption {name!r}: valid names are {_valid_names()}")
    wanted = "severity" if severity is not None else "intensity" if intensity is not None else None
    matching = [q for q in candidates if reg[q].level == wanted]
    if not matching:
      needs = " or ".join(f"{reg[q].level} (for {q})" for q in candidates)
      given = f", not {wanted}" if wanted else ""
      raise ValueError(f"corruption {name!r} needs {needs}{given}")
    qualified = matching[0]
  entry = reg[qualified]
  if entry.level == "severity":
    if intensity is not None or severity is None:
      raise ValueError(f"{qualified} takes severity=1..5, not intensity")
    return qualified, _check_severity(qualified, severity)
  if severity is not None or intensity is None:
    raise ValueError(f"{qualified} takes intensity= a float in [0, 1], not severity")
  return qualified, _check_intensity(qualified, intensity)


def is_host_side(name: str, *, severity=None, intensity=None) -> bool:
  """Whether the corruption runs in Python/numpy on the host (not jit/vmap-able).

  A short name given without a level counts as host-side if any family's variant is.
  """
  if name == PIPELINE:
    return bool(getattr(_robust_r1(), "PIPELINE_HOST_SIDE", False))
  reg = registry()
  if name in reg:
    return reg[name].host_side
  if "/" not in name and severity is None and intensity is None:
    candidates = [c for q, c in reg.items() if q.split("/", 1)[1] == name]
    if not candidates:
      raise ValueError(f"unknown corruption {name!r}: valid names are {_valid_names()}")
    return any(c.host_side for c in candidates)
  qualified, _ = resolve(name, severity=severity, intensity=intensity)
  return reg[qualified].host_side


def _check_image(image) -> tuple[tuple[int, ...], np.dtype]:
  if not hasattr(image, "dtype"):  # a PIL image, a nested list: no pixel type to keep
    raise ValueError(f"image of type {type(image).__name__}: give an H x W x 3 array (uint8, or "
                     "float in [0, 1]), e.g. np.asarray(pil_image.convert('RGB'))")
  shape = tuple(np.shape(image))
  if len(shape) != 3 or shape[-1] != 3:
    raise ValueError(f"image shape {shape} is not H x W x 3")
  if 0 in shape:
    raise ValueError(f"image shape {shape} is empty")
  dtype = np.dtype(image.dtype)
  if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
    raise ValueError(f"image dtype {dtype} is not supported: use uint8 or float in [0, 1]")
  return shape, dtype


def _check_float_range(images) -> None:
  """A float image on the 0..255 scale would be clipped to white without a word (a float just
  past 1 from a resampling is not one). Host (numpy) images only: a device array's check would
  wait for the device."""
  if (isinstance(images, np.ndarray) and images.dtype != np.uint8 and images.size
      and images.max() > 1.01):
    raise ValueError(f"a float image takes values in [0, 1], got values up to {images.max():g} "
                     "(a 0..255 image: give it as uint8)")


def _put(args, device):
  return args if device is None else jax.device_put(args, device)


def _host_fn(qualified: str, level) -> Callable:
  """fn(x_float, key) of a host-side corruption, level bound."""
  entry = registry()[qualified]
  return lambda x, key: jnp.asarray(entry.fn(np.asarray(x, np.float32), key, level), jnp.float32)


def _level_array(qualified: str, level) -> np.ndarray:
  dtype = np.int32 if registry()[qualified].level == "severity" else np.float32
  return np.asarray(level, dtype)


def _traced(qualified: str) -> bool:
  return registry()[qualified].traced_level


@functools.lru_cache(maxsize=512)
def _program(qualified: str, level, out_dtype: np.dtype, batch: str) -> Callable:
  """jit(images, keys, levels) -> images in `out_dtype`: the pixel conversions run inside the
  program, not as separate dispatches around it. `level` is None for traced-level corruptions
  (passed at call time; a scalar, or with batch one per image), else a bound constant.

  batch: '' (one image), 'map' (a loop over the batch: each image runs only its own branches
  and its own kernel sizes; the fastest form on a CPU) or 'vmap' (one vectorised program, for
  accelerators, where a loop of small kernels would leave the chip idle).
  """
  fn = registry()[qualified].fn
  one = (lambda x, key, lv: fn(x, key, lv)) if level is None else (
      lambda x, key, lv: fn(x, key, level))

  def convert(image, key, lv):  # per image: float copies of the whole batch cost 2x on a CPU
    # The barriers keep the conversions out of the corruption's fusions, so a uint8 image gets
    # exactly the float image's result, rounded (fused, XLA may round differently in between).
    x = jax.lax.optimization_barrier(pixels.to_float(image))
    return ops.from_float(jax.lax.optimization_barrier(one(x, key, lv)), out_dtype)

  def program(images, keys, levels):
    if batch == "map":
      if jnp.ndim(levels) == 1:
        return jax.lax.map(lambda a: convert(*a), (images, keys, levels))
      return jax.lax.map(lambda a: convert(a[0], a[1], levels), (images, keys))
    if batch == "vmap":
      return jax.vmap(convert, in_axes=(0, 0, 0 if jnp.ndim(levels) == 1 else None))(
          images, keys, levels)
    return convert(images, keys, levels)

  return jax.jit(program)


def _restore(out, like):
  return np.asarray(out) if isinstance(like, np.ndarray) else out


def _in_float32(images) -> bool:
  """Whether a numpy float image of another width (float64, numpy's default) is corrupted in JAX's
  float32 and given back in its own dtype (JAX would truncate it with a warning, and keep it)."""
  return (isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating)
          and images.dtype != np.float32)


def corrupt(image, name: str, key, *, severity=None, intensity=None):
  """Corrupts one H x W x 3 image (uint8 or float [0, 1]); returns the same dtype, shape, kind.

  A numpy image is corrupted on the host CPU (`data_device`), whatever the default backend: data
  preparation must not send every record to the accelerator and back. A jax array is corrupted
  on the device that holds it.
  """
  if _in_float32(image):
    return corrupt(image.astype(np.float32), name, key, severity=severity,
                   intensity=intensity).astype(image.dtype)
  with placement.running_on(placement.of(image)):
    return _corrupt(image, name, key, severity, intensity)


def _corrupt(image, name, key, severity, intensity):
  qualified, level = resolve(name, severity=severity, intensity=intensity)
  _, dtype = _check_image(image)
  _check_float_range(image)
  device = placement.of(image)
  if qualified == PIPELINE:
    out = _robust_r1().apply_pipeline(image, key, level)
  elif is_host_side(qualified):
    out = ops.from_float(_host_fn(qualified, level)(ops.to_float(image), key), dtype)
  else:
    traced = _traced(qualified)
    program = _program(qualified, None if traced else level, dtype, "")
    out = program(*_put((image, key, _level_array(qualified, level) if traced else 0), device))
  return _restore(out, image)


def _keys_per_image(keys_b, count: int):
  """`keys_b` as one array of `count` keys (a list of keys is stacked); one key is refused."""
  if not isinstance(keys_b, (list, tuple)):
    typed = jax.dtypes.issubdtype(keys_b.dtype, jax.dtypes.prng_key)
    if np.ndim(keys_b) == (0 if typed else 1):  # a raw key is 2 words
      raise ValueError(f"corrupt_batch: one key for a batch of {count} images; give one key per "
                       f"image (jax.random.split(key, {count}))")
  if len(keys_b) != count:
    raise ValueError(f"{len(keys_b)} keys for a batch of {count} images: need one key per image")
  return jnp.stack(keys_b) if isinstance(keys_b, (list, tuple)) else keys_b


def corrupt_batch(images_bhwc, name: str, keys_b, *, severity=None, intensity=None,
                  batch: str | None = None):
  """`corrupt` over a batch (B x H x W x 3) with one key per image (keys_b: B keys).

  JAX corruptions run as one jitted program over the batch; `batch` picks its form ('map': a
  loop over the images, 'vmap': vectorised; default 'map' on a CPU, 'vmap' on an accelerator).
  The Robust-R1 pipeline runs each image's four drawn degradations only (`robust_r1.
  apply_pipeline_batch`); host-side corruptions loop in Python. `severity` or `intensity` may
  also be a length-B sequence (one level per image).
  """
  if isinstance(images_bhwc, (list, tuple)):
    raise ValueError(f"corrupt_batch: images are a {type(images_bhwc).__name__}; give one array "
                     "B x H x W x 3 (np.stack(images)), or corrupt each with `corrupt`")
  if _in_float32(images_bhwc):
    return corrupt_batch(images_bhwc.astype(np.float32), name, keys_b, severity=severity,
                         intensity=intensity, batch=batch).astype(images_bhwc.dtype)
  with placement.running_on(placement.of(images_bhwc)):
    return _corrupt_batch(images_bhwc, name, keys_b, severity, intensity, batch)


def _corrupt_batch(images_bhwc, name, keys_b, severity, intensity, batch):
  shape = tuple(np.shape(images_bhwc))
  if len(shape) != 4:
    raise ValueError(f"images shape {shape} is not B x H x W x 3")
  keys_b = _keys_per_image(keys_b, shape[0])
  per_image = np.ndim(severity) == 1 or np.ndim(intensity) == 1
  if per_image:
    given = severity if np.ndim(severity) == 1 else intensity
    if len(given) != shape[0]:
      raise ValueError(f"{len(given)} levels for a batch of {shape[0]} images: need one per image")
    if np.ndim(severity) == 1:
      levels = [resolve(name, severity=s, intensity=intensity) for s in list(severity)]
    else:
      levels = [resolve(name, severity=severity, intensity=i) for i in list(intensity)]
    qualified = levels[0][0]
    level = [lv for _, lv in levels]
    if not (qualified == PIPELINE or _traced(qualified) or is_host_side(qualified)):
      raise ValueError(f"{qualified} takes one level per batch, not one per image")
  else:
    qualified, level = resolve(name, severity=severity, intensity=intensity)
  _check_image(images_bhwc[0])
  _check_float_range(images_bhwc)
  dtype = np.dtype(images_bhwc.dtype)
  device = placement.of(images_bhwc)
  if batch is None:
    platform = device.platform if device is not None else next(
        iter(images_bhwc.devices())).platform
    batch = "map" if platform == "cpu" else "vmap"
  if batch not in ("map", "vmap"):
    raise ValueError(f"batch={batch!r} is not 'map' or 'vmap'")
  if qualified == PIPELINE:
    out = _robust_r1().apply_pipeline_batch(images_bhwc, keys_b, level, batch=batch)
  elif is_host_side(qualified):
    per_level = level if per_image else [level] * shape[0]
    x = ops.to_float(images_bhwc)
    out = ops.from_float(jnp.stack([_host_fn(qualified, lv)(x[i], keys_b[i])
                                    for i, lv in enumerate(per_level)]), dtype)
  else:
    # One severity for the whole batch is bound into the program (one compilation per severity
    # used): its kernel sizes and tables become constants, which runs up to twice as fast as
    # choosing them at run time. Intensities (continuous) and per-image levels stay traced.
    traced = _traced(qualified) and (per_image or registry()[qualified].level != "severity")
    program = _program(qualified, None if traced else level, dtype, batch)
    levels = _level_array(qualified, level) if traced else 0
    out = program(*_put((images_bhwc, keys_b, levels), device))
  return _restore(out, images_bhwc)
