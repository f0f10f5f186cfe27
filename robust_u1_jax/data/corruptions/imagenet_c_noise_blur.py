"""ImageNet-C noise and blur corruptions (Hendrycks & Dietterich, 2019) in JAX.

Every function maps a float32 [0, 1] H x W x 3 image, a jax.random key and a severity 1..5 to a
float32 [0, 1] image of the same shape; all are jit- and vmap-able and deterministic per key. The
severity may be a Python int or a traced int32 scalar: parameters are looked up in the published
ImageNet-C / `imagecorruptions` tables inside the program, and array sizes that depend on the
severity (kernel radii, numbers of zooms or iterations) are sized for severity 5 with the excess
masked out, so one compilation serves all five severities (and a batch may mix them).

Size: the published values were tuned on 224 x 224 crops. Pixel-size parameters (blur sigmas and
radii, glass-blur displacement) are multiplied by s = min(H, W) / reference_size
(`ops.size_scale`, reference 224; pass reference_size=None for the raw published values). Integer
radii are rounded and kept >= 1 so every severity still changes a small image. Per-pixel noise and
the relative zoom factors of zoom blur need no scaling.
"""

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax.data.corruptions import ops

SEVERITIES = (1, 2, 3, 4, 5)

GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # std
SHOT_NOISE = (60, 25, 12, 5, 3)  # photons per unit intensity
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)  # fraction of values set to 0 or 1
SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)  # multiplicative std
GAUSSIAN_BLUR = (1, 2, 3, 4, 6)  # sigma (px at 224)
GLASS_BLUR = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, delta, iters
DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, alias sigma
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius, sigma
ZOOM_BLUR = (  # (start, stop, step) of the zoom factors averaged
    (1.0, 1.11, 0.01), (1.0, 1.16, 0.01), (1.0, 1.21, 0.02), (1.0, 1.26, 0.02), (1.0, 1.31, 0.03))


def check_severity(severity, name: str) -> None:
  """ValueError naming the corruption when a concrete severity is not 1..5 (traced ones pass)."""
  if isinstance(severity, jax.core.Tracer):
    return
  if (isinstance(severity, bool) or np.ndim(severity) != 0
      or not float(severity).is_integer() or int(severity) not in SEVERITIES):
    raise ValueError(
        f"severity {severity!r} for imagenet_c/{name} is invalid: allowed 1, 2, 3, 4, 5")


def pick(table, severity, name: str) -> jax.Array:
  """table[severity - 1] (each row may be a tuple: columns come back on the last axis)."""
  check_severity(severity, name)
  index = jnp.clip(jnp.asarray(severity, jnp.int32) - 1, 0, len(table) - 1)
  return jnp.asarray(table, jnp.float32)[index]


def _scale(x_hwc, reference_size):
  return ops.size_scale(x_hwc.shape[0], x_hwc.shape[1], reference_size)


def _scaled_int(value: float, scale: float) -> int:
  return max(1, int(round(value * scale)))


# ------------------------------------------------------------------------------------ noise

def gaussian_noise(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  del reference_size
  std = pick(GAUSSIAN_NOISE, severity, "gaussian_noise")
  return ops.clip01(x_hwc + std * jax.random.normal(key, x_hwc.shape))


def shot_noise(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Poisson photon noise: Poisson(x * c) / c."""
  del reference_size
  c = pick(SHOT_NOISE, severity, "shot_noise")
  counts = poisson(key, ops.clip01(x_hwc) * c, c)
  return ops.clip01(counts / c)


def poisson(key, lam, lam_max) -> jax.Array:
  """Poisson(lam) samples (float32) by inverting the CDF, for rates 0 <= lam <= lam_max.

  lam_max + 10 sqrt(lam_max) + 10 CDF terms (beyond which the tail mass is below float32
  resolution; lam_max may be traced) replace jax.random.poisson's rejection loops, which take
  seconds to compile; this is one small loop.
  """
  lam_max = jnp.asarray(lam_max, jnp.float32)
  n_terms = jnp.ceil(lam_max + 10.0 * jnp.sqrt(lam_max) + 10.0).astype(jnp.int32)
  u = jax.random.uniform(key, lam.shape)

  def add_term(k, carry):
    p, cdf, count = carry
    p = p * lam / k
    cdf = cdf + p
    return p, cdf, count + (u > cdf)

  p0 = jnp.exp(-lam)
  _, _, count = jax.lax.fori_loop(1, n_terms + 1, add_term, (p0, p0, (u > p0).astype(jnp.float32)))
  return count


def impulse_noise(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Salt and pepper per channel value (skimage random_noise 's&p', equal salt and pepper)."""
  del reference_size
  amount = pick(IMPULSE_NOISE, severity, "impulse_noise")
  u_hit, u_salt = jax.random.uniform(key, (2,) + x_hwc.shape)
  hit = u_hit < amount
  salt = (u_salt < 0.5).astype(jnp.float32)
  return ops.clip01(jnp.where(hit, salt, x_hwc))


def speckle_noise(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  del reference_size
  std = pick(SPECKLE_NOISE, severity, "speckle_noise")
  return ops.clip01(x_hwc + x_hwc * std * jax.random.normal(key, x_hwc.shape))


# ------------------------------------------------------------------------------------- blur

def gaussian_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """skimage.filters.gaussian (edge-replicated borders) with sigma scaled to the image size."""
  del key
  scale = _scale(x_hwc, reference_size)
  sigma = pick(GAUSSIAN_BLUR, severity, "gaussian_blur") * scale
  radius = ops.gaussian_radius(max(GAUSSIAN_BLUR) * scale)
  return ops.clip01(ops.gaussian_blur(x_hwc, sigma, mode="nearest", radius=radius))


def glass_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Frosted-glass blur: gaussian blur, local pixel shuffles, gaussian blur.

  JAX approximation of the shuffle: the reference swaps every interior pixel, one after another,
  with a random neighbour at an integer offset in [-delta, delta); that loop is sequential (later
  swaps move already-moved pixels). Here each iteration instead resamples every interior pixel
  at an independent random offset, uniform in [-delta * s, delta * s) per axis, bilinearly. That
  is parallel and jit-able and gives the same local disorder, but pixels are resampled rather
  than exactly permuted (a few are copied twice or dropped), and the offsets are continuous so
  the displacement scales with the image instead of stopping at one whole pixel on small
  images. The 8-bit truncation between the first blur and the shuffle is kept.
  """
  scale = _scale(x_hwc, reference_size)
  table = [(sig * scale, d * scale, d, it) for sig, d, it in GLASS_BLUR]
  sigma, reach, delta, iterations = pick(table, severity, "glass_blur")
  radius = ops.gaussian_radius(max(t[0] for t in table))
  max_iterations = max(t[3] for t in table)
  h, w = x_hwc.shape[:2]
  blur = lambda x: ops.gaussian_blur(x, sigma, mode="nearest", radius=radius)
  x = jnp.floor(ops.clip01(blur(x_hwc)) * 255.0) / 255.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  # The reference visits rows/cols delta+1 .. size-delta-1 only (delta in reference pixels).
  margin = jnp.maximum(delta * scale, 1.0)
  interior = (yy > margin) & (yy < h - 1 - margin) & (xx > margin) & (xx < w - 1 - margin)
  offsets = jax.random.uniform(key, (max_iterations, 2, h, w), minval=-1.0, maxval=1.0) * reach
  for i in range(max_iterations):
    src_y = jnp.where(interior, yy + offsets[i, 0], yy)
    src_x = jnp.where(interior, xx + offsets[i, 1], xx)
    x = jnp.where(i < iterations, ops.warp(x, src_y, src_x, order=1, mode="nearest"), x)
  return ops.clip01(blur(x))


def defocus_kernels(height: int, width: int, reference_size=ops.REFERENCE_SIZE) -> np.ndarray:
  """(5, K, K) disk kernels of the five severities for an image size, zero-padded to one K."""
  scale = ops.size_scale(height, width, reference_size)
  kernels = [ops.disk_kernel(r * scale, a * scale) for r, a in DEFOCUS_BLUR]
  k = max(kern.shape[0] for kern in kernels)
  return np.stack([np.pad(kern, (k - kern.shape[0]) // 2) for kern in kernels])


def defocus_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Convolution with an anti-aliased disk (`ops.disk_kernel`), OpenCV's mirrored borders."""
  del key
  check_severity(severity, "defocus_blur")
  kernels = jnp.asarray(defocus_kernels(x_hwc.shape[0], x_hwc.shape[1], reference_size))
  kernel = kernels[jnp.clip(jnp.asarray(severity, jnp.int32) - 1, 0, 4)]
  return ops.clip01(ops.conv2d(x_hwc, kernel, mode="mirror"))


def motion_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """One-sided gaussian line blur at a random angle in [-45, 45) degrees (ImageMagick's)."""
  scale = _scale(x_hwc, reference_size)
  table = [(_scaled_int(r, scale), sig * scale) for r, sig in MOTION_BLUR]
  radius, sigma = pick(table, severity, "motion_blur")
  angle = jax.random.uniform(key, (), minval=-45.0, maxval=45.0)
  max_radius = max(t[0] for t in table)
  return ops.clip01(ops.motion_blur(x_hwc, max_radius, sigma, angle, active_radius=radius))


def zoom_factors(severity: int) -> list[float]:
  start, stop, step = ZOOM_BLUR[severity - 1]
  return [float(f) for f in np.arange(start, stop, step)]  # the reference's exact list


def _zoom_tables(h: int, w: int) -> np.ndarray:
  """(5, F, 5): per severity and zoom (top_y, step_y, top_x, step_x, used), F = most zooms."""
  lists = [zoom_factors(s) for s in SEVERITIES]
  f_max = max(len(f) for f in lists)
  table = np.zeros((len(lists), f_max, 5), np.float32)
  for s, factors in enumerate(lists):
    for i, f in enumerate(factors):
      table[s, i] = (*ops.center_zoom_params(h, f), *ops.center_zoom_params(w, f), 1.0)
  return table


def zoom_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Mean of the image and its centre zooms by each factor (relative, so no size scaling)."""
  del key, reference_size
  table = pick(_zoom_tables(x_hwc.shape[0], x_hwc.shape[1]), severity, "zoom_blur")

  def add_zoom(acc, row):
    zoomed = ops.center_zoom_with(x_hwc, (row[0], row[1]), (row[2], row[3]))
    return acc + row[4] * zoomed, None

  acc, _ = jax.lax.scan(add_zoom, x_hwc.astype(jnp.float32), table)
  return ops.clip01(acc / (jnp.sum(table[:, 4]) + 1.0))


NOISE = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
}
BLUR = {
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "gaussian_blur": gaussian_blur,
}
