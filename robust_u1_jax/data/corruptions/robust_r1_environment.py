"""Robust-R1 environment-stage degradations: dark_illumination, atmospheric_turbulence,
gaussian_noise, color_diffusion. All pure JAX (jit + vmap, traced intensity); contract in
`robust_r1_common`.

Parameterisations (s = size scale of `robust_r1_common.scale`):
  dark_illumination       x * (1 - I^2) (the reference formula).
  atmospheric_turbulence  bilinear warp by a smooth random displacement field (bicubic upsampled
                          noise on a 32 s px lattice) of RMS amplitude 6 I s px, then a
                          gaussian blur of sigma 1.5 I s px.
  gaussian_noise          x + N(0, (75 I / 255)^2), independent per value (the reference formula).
  color_diffusion         chroma bleeding: YCbCr chroma blurred with sigma 24 I s px, luma mixed
                          with 0.5 I of itself blurred at sigma 4 I s px.
"""

import math

import jax
import jax.numpy as jnp

from robust_u1_jax.data.corruptions import ops
from robust_u1_jax.data.corruptions import resample
from robust_u1_jax.data.corruptions import robust_r1_common as common

REFERENCE_SIZE = common.REFERENCE_SIZE

TURBULENCE_CELL = 32.0  # px at the reference size: correlation length of the displacement
# RMS displacement, px at the reference size, times I; small against the cell so the warp
# wobbles without folding.
TURBULENCE_AMPLITUDE = 6.0
TURBULENCE_BLUR = 1.5  # px sigma at the reference size, times I
NOISE_SIGMA = 75.0 / 255.0  # times I
CHROMA_SIGMA = 24.0  # px at the reference size, times I
LUMA_SIGMA = 4.0  # px at the reference size, times I


def dark_illumination(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  del key, reference_size
  i = jnp.asarray(intensity, jnp.float32)
  return ops.clip01(x_hwc * (1.0 - i * i))


def atmospheric_turbulence(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  i = jnp.asarray(intensity, jnp.float32)
  h, w = x_hwc.shape[:2]
  s = common.scale(x_hwc, reference_size)
  cell = max(TURBULENCE_CELL * s, 4.0)
  lattice = jax.random.normal(key, (math.ceil(h / cell) + 1, math.ceil(w / cell) + 1, 2))
  field = resample.resize(lattice, h, w, "bicubic")
  field = field / jnp.sqrt(jnp.mean(field ** 2, axis=(0, 1), keepdims=True) + 1e-12)
  field = field * (TURBULENCE_AMPLITUDE * s * i)
  yy, xx = common.pixel_grid(h, w)
  warped = resample.warp(x_hwc, yy + field[..., 0], xx + field[..., 1], order=1, mode="reflect")
  return ops.clip01(common.blur(warped, TURBULENCE_BLUR * s * i, TURBULENCE_BLUR * s))


def gaussian_noise(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  del reference_size
  i = jnp.asarray(intensity, jnp.float32)
  return ops.clip01(x_hwc + NOISE_SIGMA * i * ops.normal(key, x_hwc.shape))


def color_diffusion(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  del key
  i = jnp.asarray(intensity, jnp.float32)
  s = common.scale(x_hwc, reference_size)
  ycc = ops.rgb_to_ycbcr(x_hwc)
  chroma = common.blur(ycc[..., 1:], CHROMA_SIGMA * s * i, CHROMA_SIGMA * s)
  luma = ycc[..., :1]
  luma = (1.0 - 0.5 * i) * luma + 0.5 * i * common.blur(luma, LUMA_SIGMA * s * i, LUMA_SIGMA * s)
  return ops.clip01(ops.ycbcr_to_rgb(jnp.concatenate([luma, chroma], axis=-1)))


ENVIRONMENT = {
    "dark_illumination": dark_illumination,
    "atmospheric_turbulence": atmospheric_turbulence,
    "gaussian_noise": gaussian_noise,
    "color_diffusion": color_diffusion,
}
