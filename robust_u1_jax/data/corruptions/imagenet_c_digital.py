"""ImageNet-C digital corruptions (brightness, contrast, elastic, pixelate, JPEG, saturate) in JAX.

Same contract as `imagenet_c_noise_blur`: float32 [0, 1] H x W x 3 image, a jax.random key and a
severity 1..5 (Python int or traced) in; a float32 [0, 1] image of the same shape out; jit- and
vmap-able, one compilation for all severities.
Severity tables are the published ImageNet-C / `imagecorruptions` values.

Size: brightness, contrast and saturate are per pixel; pixelate's factors are fractions of the
image size; JPEG works on 8 x 8 blocks whatever the size (as a real encoder does). Elastic
transform follows `imagecorruptions` (smoothed uniform displacement fields, sigma = 1% and
amplitude 0.5% of the size, times alpha); in that form the displacement in pixels does not grow
with the image, so here the field is built with sigma = 2.24 s, amplitude 1.12 s and multiplied by
alpha * s, with s = min(H, W) / 224: identical to the reference at 224, and the same warp relative
to the image at any other size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax.data.corruptions import jpeg, ops, resample
from robust_u1_jax.data.corruptions.imagenet_c_noise_blur import check_severity, pick

BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # factor on the deviation from the channel mean
SATURATE = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))  # HSV saturation * a + b
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)  # downscale factor
ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)
ELASTIC_SIGMA_FRACTION = 0.01  # of the (reference) size
ELASTIC_AMPLITUDE_FRACTION = 0.005


def brightness(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  del key, reference_size
  c = pick(BRIGHTNESS, severity, "brightness")
  hsv = ops.rgb_to_hsv(x_hwc)
  hsv = hsv.at[..., 2].set(ops.clip01(hsv[..., 2] + c))
  return ops.clip01(ops.hsv_to_rgb(hsv))


def contrast(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  del key, reference_size
  c = pick(CONTRAST, severity, "contrast")
  means = jnp.mean(x_hwc, axis=(0, 1), keepdims=True)
  return ops.clip01((x_hwc - means) * c + means)


def saturate(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  del key, reference_size
  a, b = pick(SATURATE, severity, "saturate")
  hsv = ops.rgb_to_hsv(x_hwc)
  hsv = hsv.at[..., 1].set(ops.clip01(hsv[..., 1] * a + b))
  return ops.clip01(ops.hsv_to_rgb(hsv))


def jpeg_compression(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """PIL-equivalent JPEG round trip (see `jpeg.jpeg_compress`) at the published quality."""
  del key, reference_size
  return jpeg.jpeg_compress(x_hwc, pick(JPEG_QUALITY, severity, "jpeg_compression"))


@functools.lru_cache(maxsize=64)
def pixelate_tables(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per severity, along an axis of n: PIL's BOX downscale to int(n * c) followed by its NEAREST
  upscale, as windows: output pixel o is the mean of input pixels lo[o]..hi[o]-1 ((n,) int32
  each; BOX weights are 0 or 1 at these scales, so a window is contiguous). Read off
  `resample.resize_matrix`, so they are Pillow's rules exactly."""
  tables = []
  for c in PIXELATE:
    m = max(1, int(n * c))
    down = resample.resize_matrix(n, m, "box")
    windows = [np.flatnonzero(row) for row in down]
    for i, taps in enumerate(windows):
      if taps.size == 0 or np.any(np.diff(taps) != 1) or np.ptp(down[i, taps]) > 1e-6:
        raise AssertionError(f"PIL BOX row {i} of {n} -> {m} is not a uniform window")
    src = np.argmax(resample.resize_matrix(m, n, "nearest"), axis=1)
    tables.append((np.asarray([windows[i][0] for i in src], np.int32),
                   np.asarray([windows[i][-1] + 1 for i in src], np.int32)))
  return tables


def _window_means(x: jax.Array, axis: int, lo: np.ndarray, hi: np.ndarray) -> jax.Array:
  """Mean of x over [lo[o], hi[o]) along `axis` for each output o: a few whole-row gathers with
  constant indices, fused, instead of a dense (n x n) resampling matrix."""
  shape = [1] * x.ndim
  shape[axis] = lo.shape[0]
  width = (hi - lo).reshape(shape)
  total = 0.0
  for k in range(int(np.max(hi - lo))):
    row = jnp.take(x, np.minimum(lo + k, hi - 1), axis=axis)
    total = total + (row if np.all(k < width) else jnp.where(k < width, row, 0.0))
  return total / width.astype(np.float32)


def pixelate(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """PIL BOX downscale to int(size * c), then PIL NEAREST back up (`pixelate_tables`), per axis.

  One branch per severity: constant windows let XLA copy rows where traced ones would gather.
  """
  del key, reference_size
  check_severity(severity, "pixelate")
  x = jnp.asarray(x_hwc, jnp.float32)
  tables = [pixelate_tables(x.shape[axis]) for axis in (0, 1)]

  def branch(s, x):
    for axis in (0, 1):
      x = _window_means(x, axis, *tables[axis][s])
    return ops.clip01(x)

  return ops.by_level(severity, [functools.partial(branch, s) for s in range(len(PIXELATE))], x)


def elastic_transform(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Bilinear warp by gaussian-smoothed uniform displacement fields (scipy's 'reflect' borders)."""
  alpha = pick(ELASTIC_ALPHA, severity, "elastic_transform")
  h, w = x_hwc.shape[:2]
  s = ops.size_scale(h, w, reference_size)
  ref = ops.REFERENCE_SIZE if reference_size is not None else min(h, w)
  sigma = ELASTIC_SIGMA_FRACTION * ref * s
  amplitude = ELASTIC_AMPLITUDE_FRACTION * ref * s
  raw = ops.uniform(key, (h, w, 2), minval=-amplitude, maxval=amplitude)
  dyx = ops.gaussian_blur(raw, sigma, mode="reflect", truncate=3.0) * (alpha * s)
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  return ops.clip01(resample.warp(x_hwc, yy + dyx[..., 0], xx + dyx[..., 1], order=1,
                                  mode="reflect"))


DIGITAL = {
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "saturate": saturate,
}
