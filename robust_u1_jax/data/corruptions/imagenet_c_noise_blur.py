"""ImageNet-C noise and blur corruptions (Hendrycks & Dietterich, 2019) in JAX.

Every function maps a float32 [0, 1] H x W x 3 image, a jax.random key and a severity 1..5 to a
float32 [0, 1] image of the same shape; all are jit- and vmap-able and deterministic per key. The
severity may be a Python int or a traced int32 scalar: parameters are looked up in the published
ImageNet-C / `imagecorruptions` tables inside the program, and array sizes that depend on the
severity are either sized for severity 5 with the excess masked out, or chosen per severity by a
`lax.switch` (`ops.by_level`: gaussian blur's kernel radius), so one compilation serves all five
severities (and a batch may mix them). A Python int severity folds into the program as constants.

Size: the published values were tuned on 224 x 224 crops. Pixel-size parameters (blur sigmas and
radii, glass-blur displacement) are multiplied by s = min(H, W) / reference_size
(`ops.size_scale`, reference 224; pass reference_size=None for the raw published values). Integer
radii are rounded and kept >= 1 so every severity still changes a small image. Per-pixel noise and
the relative zoom factors of zoom blur need no scaling.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from robust_u1_jax.data.corruptions import ops
from robust_u1_jax.data.corruptions import resample

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
  return ops.clip01(x_hwc + std * ops.normal(key, x_hwc.shape))


def shot_noise(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Poisson photon noise: Poisson(x * c) / c, x taken at its 8-bit level (as the reference's
  uint8 images are), so the count is drawn by a binary search of that level's Poisson CDF."""
  del reference_size
  check_severity(severity, "shot_noise")
  index = jnp.clip(jnp.asarray(severity, jnp.int32) - 1, 0, len(SHOT_NOISE) - 1)
  c = jnp.asarray(SHOT_NOISE, jnp.float32)[index]
  level = jnp.round(ops.clip01(x_hwc) * 255.0).astype(jnp.int32)
  cdf = jnp.asarray(_shot_noise_cdfs()).reshape(-1)
  u = ops.uniform(key, x_hwc.shape)
  row = (index * 256 + level) * _CDF_TERMS
  # count = #{k : CDF[k] < u}, found in log2(_CDF_TERMS) gathers per value.
  count = jnp.zeros(x_hwc.shape, jnp.int32)
  step = _CDF_TERMS // 2
  while step >= 1:
    count = jnp.where(cdf[row + count + step - 1] < u, count + step, count)
    step //= 2
  return ops.clip01(count.astype(jnp.float32) / c)


_CDF_TERMS = 256  # > c + 10 sqrt(c) + 10 for every severity: the tail beyond is below float32


@functools.cache
def _shot_noise_cdfs() -> np.ndarray:
  """(5, 256, _CDF_TERMS) float32: Poisson CDF at k = 0.. for rate level / 255 * c, per severity
  and 8-bit level; 1 past the last term, so a search never runs off the end."""
  k = np.arange(_CDF_TERMS, dtype=np.float64)
  lam = np.arange(256, dtype=np.float64)[None, :, None] / 255.0 * np.asarray(
      SHOT_NOISE, np.float64)[:, None, None]
  log_pmf = k * np.log(np.maximum(lam, 1e-300)) - lam - scipy.special.gammaln(k + 1.0)
  pmf = np.where(lam > 0, np.exp(log_pmf), (k == 0).astype(np.float64))
  cdf = np.minimum(np.cumsum(pmf, axis=-1), 1.0)
  cdf[..., -1] = 1.0
  return cdf.astype(np.float32)


def poisson(key, lam, lam_max) -> jax.Array:
  """Poisson(lam) samples (float32) by inverting the CDF, for rates 0 <= lam <= lam_max.

  lam_max + 10 sqrt(lam_max) + 10 CDF terms (beyond which the tail mass is below float32
  resolution; lam_max may be traced) replace jax.random.poisson's rejection loops, which take
  seconds to compile; this is one small loop.
  """
  lam_max = jnp.asarray(lam_max, jnp.float32)
  n_terms = jnp.ceil(lam_max + 10.0 * jnp.sqrt(lam_max) + 10.0).astype(jnp.int32)
  u = ops.uniform(key, lam.shape)

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
  # One 16-bit random word per value serves both choices (random bits are the expensive part):
  # 15 bits for the hit (amount resolved to 1 / 32768), the lowest for salt or pepper.
  word = ops.bits16(key, x_hwc.shape)
  u_hit = (word >> 1).astype(jnp.float32) * (1.0 / 32768.0)
  salt = (word & 1).astype(jnp.float32)
  return ops.clip01(jnp.where(u_hit < amount, salt, x_hwc))


def speckle_noise(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  del reference_size
  std = pick(SPECKLE_NOISE, severity, "speckle_noise")
  return ops.clip01(x_hwc + x_hwc * std * ops.normal(key, x_hwc.shape))


# ------------------------------------------------------------------------------------- blur

def gaussian_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """skimage.filters.gaussian (edge-replicated borders) with sigma scaled to the image size.

  One branch per severity, each with scipy's own kernel radius for its sigma: the taps of
  severity 5 would cost severity 1 six times its work. (Under vmap with one severity per image
  every branch runs; the batch entry points loop over the images instead, see corruptions.)
  """
  del key
  check_severity(severity, "gaussian_blur")
  scale = _scale(x_hwc, reference_size)
  branches = [functools.partial(ops.gaussian_blur, sigma=sigma * scale, mode="nearest")
              for sigma in GAUSSIAN_BLUR]
  return ops.clip01(ops.by_level(severity, branches, x_hwc))


GLASS_SHUFFLE_SPREAD = 2.25  # sort-key spread per unit of delta: see `glass_blur`
GLASS_MIN_SCALE = 0.5  # the shuffle's size scale never drops below this (see `glass_blur`)


def local_shuffle(x_hwc, u_2hw, spread) -> jax.Array:
  """An exact random permutation of the pixels that moves each a few pixels: pixels are
  re-ordered along every row by the sort keys column + spread * U[0, 1), then along every column
  by row + spread * U[0, 1). A pixel moves by about spread * (u - 1/2) per axis, and only past
  the neighbours whose keys it crosses, so nothing is copied twice or lost. `spread` may be
  traced; below 1 nothing moves."""
  h, w = x_hwc.shape[:2]
  cols = jnp.argsort(jnp.arange(w, dtype=jnp.float32)[None, :] + spread * u_2hw[0], axis=1)
  x_hwc = jnp.take_along_axis(x_hwc, cols[..., None], axis=1)
  rows = jnp.argsort(jnp.arange(h, dtype=jnp.float32)[:, None] + spread * u_2hw[1], axis=0)
  return jnp.take_along_axis(x_hwc, rows[..., None], axis=0)


def glass_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Frosted glass: gaussian blur, 8-bit truncation, local pixel shuffles, gaussian blur.

  The reference (Hendrycks & Dietterich's corruptions.py; `imagecorruptions`) walks the interior
  pixels one after another and "swaps" each with a random neighbour at an integer offset in
  [-delta, delta) per axis; the walk is sequential (later steps move already-moved pixels).
  (Written with numpy views, its tuple swap in fact copies the neighbour into the pixel.) Here
  each iteration is one exact permutation of the pixels (`local_shuffle`), jit- and vmap-able:
  whole pixels move by whole pixels, which leaves the jittery, frosted texture that resampling
  at continuous offsets would smooth away. Its spread, GLASS_SHUFFLE_SPREAD * delta *
  max(s, GLASS_MIN_SCALE), matches the reference loop's high-frequency energy after the final
  blur at every severity (within 8% at 224 px; tests/test_corruptions_imagenet_c.py transcribes
  the loop).
  """
  scale = _scale(x_hwc, reference_size)
  # A permutation cannot move a pixel by less than one: below half the reference size the
  # shuffle stops shrinking with the image (every severity still shuffles, in order).
  reach = max(scale, GLASS_MIN_SCALE)
  table = [(sig * scale, GLASS_SHUFFLE_SPREAD * d * reach, it) for sig, d, it in GLASS_BLUR]
  sigma, spread, iterations = pick(table, severity, "glass_blur")
  radius = ops.gaussian_radius(max(t[0] for t in table))
  max_iterations = max(t[2] for t in table)
  blur = lambda x: ops.gaussian_blur(x, sigma, mode="nearest", radius=radius)
  x = jnp.floor(ops.clip01(blur(x_hwc)) * 255.0) / 255.0
  u = ops.uniform(key, (max_iterations, 2) + x_hwc.shape[:2])
  # A traced trip count: a severity with fewer iterations sorts fewer times.
  x = jax.lax.fori_loop(0, iterations.astype(jnp.int32),
                        lambda i, x: local_shuffle(x, u[i], spread), x)
  return ops.clip01(blur(x))


def defocus_kernels(height: int, width: int, reference_size=ops.REFERENCE_SIZE) -> np.ndarray:
  """(5, K, K) disk kernels of the five severities for an image size, zero-padded to one K."""
  scale = ops.size_scale(height, width, reference_size)
  kernels = [ops.disk_kernel(r * scale, a * scale) for r, a in DEFOCUS_BLUR]
  k = max(kern.shape[0] for kern in kernels)
  return np.stack([np.pad(kern, (k - kern.shape[0]) // 2) for kern in kernels])


def defocus_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Convolution with an anti-aliased disk (`ops.disk_kernel`), OpenCV's mirrored borders
  (through FFTs: the disks are up to 21 x 21 taps at 224 px)."""
  del key
  check_severity(severity, "defocus_blur")
  kernels = defocus_kernels(x_hwc.shape[0], x_hwc.shape[1], reference_size)
  index = jnp.clip(jnp.asarray(severity, jnp.int32) - 1, 0, len(kernels) - 1)
  return ops.clip01(ops.conv2d_fft(x_hwc, kernels, index, mode="mirror"))


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
      table[s, i] = (*resample.center_zoom_params(h, f), *resample.center_zoom_params(w, f), 1.0)
  return table


def zoom_blur(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Mean of the image and its centre zooms by each factor (relative, so no size scaling)."""
  del key, reference_size
  table = pick(_zoom_tables(x_hwc.shape[0], x_hwc.shape[1]), severity, "zoom_blur")

  def add_zoom(acc, row):
    zoomed = resample.center_zoom_with(x_hwc, (row[0], row[1]), (row[2], row[3]))
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
