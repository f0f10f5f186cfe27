"""Conventions shared by the Robust-R1 degradations (size scaling, intensity checks, pixel grid).

Every Robust-R1 degradation is `fn(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE)`:
a float32 [0, 1] H x W x 3 image, a jax.random key and an intensity I in [0, 1] that may be a
traced scalar (so one compiled function serves every intensity and `jax.vmap` can batch images
with different intensities). Only the image shape and `reference_size` are static.

Pixel-size parameters are the Robust-R1 reference values (tuned on photographs of roughly
512 px short side) multiplied by `scale(...) = max(min(H, W) / reference_size, MIN_SCALE)`: the
floor keeps every degradation visible on small training images (64 px gets the 128 px values).
"""

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax.data.corruptions import ops

REFERENCE_SIZE = 512
MIN_SCALE = 0.25
MIN_SIDE = 32


def scale(x_hwc, reference_size: int | None = REFERENCE_SIZE) -> float:
  """Static factor from reference-size pixel parameters to this image (see module docstring)."""
  if reference_size is None:
    return 1.0
  return max(ops.size_scale(x_hwc.shape[0], x_hwc.shape[1], reference_size), MIN_SCALE)


def short_side(x_hwc) -> int:
  return min(x_hwc.shape[0], x_hwc.shape[1])


def pixel_grid(height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Float row and column coordinates of every pixel centre, each H x W."""
  return jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                      indexing="ij")


def ramp(value, start: float, width: float) -> jax.Array:
  """0 below `start`, 1 above `start + width`, linear between: a continuous on-switch in I."""
  return jnp.clip((jnp.asarray(value, jnp.float32) - start) / width, 0.0, 1.0)


def fade_in_count(count, n_max: int) -> jax.Array:
  """Per-item opacity for a continuous item count: items 0..floor(count)-1 fully on, the next
  one partly. Keeps outputs continuous and monotone in I where a count grows with I."""
  return jnp.clip(jnp.asarray(count, jnp.float32) - jnp.arange(n_max, dtype=jnp.float32), 0.0, 1.0)


def blur_matrix(n: int, taps, radius: int) -> jax.Array:
  """(n, n) matrix applying the 1-D correlation `taps` (offsets -radius..radius) along an axis
  of length n with scipy 'reflect' borders (d c b a | a b c d | d c b a). Taps may be traced."""
  out_idx = np.arange(n)[:, None]
  src = out_idx + np.arange(-radius, radius + 1)[None, :]
  src = np.mod(src, 2 * n)
  src = np.where(src < n, src, 2 * n - 1 - src)
  rows = np.broadcast_to(out_idx, src.shape)
  taps = jnp.broadcast_to(jnp.asarray(taps, jnp.float32)[None, :], src.shape)
  return jnp.zeros((n, n), jnp.float32).at[rows, src].add(taps)


def blur(x_hwc, sigma, max_sigma: float) -> jax.Array:
  """Gaussian blur (reflect borders, 3 sigma support) with a possibly traced sigma <= max_sigma;
  the static `max_sigma` fixes the kernel footprint, so one compilation serves every I.

  Applied as two dense banded-matrix products rather than `ops.separable_conv`: XLA's CPU
  depthwise convolution slows linearly with the radius (7 s for radius 60 on 512 x 768 against
  0.12 s here), while a matmul costs the same for every radius and is fast on every backend.
  Same result as ops.gaussian_blur(x, sigma, radius=..., truncate=3.0, mode='reflect').
  """
  radius = ops.gaussian_radius(max_sigma, truncate=3.0)
  taps = ops.gaussian_kernel1d(sigma, radius, truncate=3.0)
  h, w = x_hwc.shape[:2]
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,hw...->ow...", blur_matrix(h, taps, radius), x_hwc, precision=hi)
  return jnp.einsum("pw,ow...->op...", blur_matrix(w, taps, radius), y, precision=hi)


def uniforms(key, n: int) -> jax.Array:
  """n U[0, 1) draws from one call: each jax.random call adds its own threefry kernel to the
  compiled program, so a degradation draws all its parameters at once and slices them."""
  return jax.random.uniform(key, (n,))


def to_normal(u: jax.Array) -> jax.Array:
  """Standard normals from uniforms by the inverse CDF (avoids a second random call)."""
  return jax.scipy.special.ndtri(jnp.clip(u, 1e-6, 1.0 - 1e-6))


def check_image(image, what: str) -> None:
  """Raises a ValueError naming `what` unless `image` is H x W x 3 with H, W >= MIN_SIDE."""
  shape = tuple(np.shape(image))
  if len(shape) != 3 or shape[-1] != 3 or min(shape[:2]) < MIN_SIDE:
    raise ValueError(f"{what}: image must be H x W x 3 with H, W >= {MIN_SIDE}, got shape {shape}")


def check_intensity(intensity, what: str) -> None:
  """Raises a ValueError naming `what` for a concrete intensity outside [0, 1] (traced: none)."""
  if isinstance(intensity, jax.core.Tracer):
    return
  value = np.asarray(intensity)
  valid = value.shape == () and np.issubdtype(value.dtype, np.number)
  if not valid or not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{what}: intensity must be a scalar in [0, 1], got {intensity!r}")
