"""Robust-R1 capture-stage degradations: lens_blur, lens_flare, motion_blur, dirty_lens,
hsv_saturation. All pure JAX (jit + vmap, traced intensity); contract in `robust_r1_common`.

Parameterisations (s = size scale of `robust_r1_common.scale`, L = short side in px):
  lens_blur       gaussian blur sigma 20 I s, mixed as (1 - 0.7 I) x + 0.9 I blur (the reference's
                  slight glow included).
  lens_flare      light source at a random point: radial glow + horizontal streak + 6 tinted
                  ghost discs along the source-centre axis, screen-blended with opacity 0.9 I.
  motion_blur     uniform line kernel of length 30 I s px at a random angle (bilinear taps).
  dirty_lens      up to 48 small + 6 large soft blotches and 4 smudges (count grows with I),
                  each showing a blurred, brownish-grey mix; blotch opacity also grows with I.
  hsv_saturation  HSV saturation multiplied by (1 - I).
"""

import math

import jax
import jax.numpy as jnp

from robust_u1_jax.data.corruptions import ops
from robust_u1_jax.data.corruptions import overlays
from robust_u1_jax.data.corruptions import robust_r1_common as common

REFERENCE_SIZE = common.REFERENCE_SIZE

LENS_BLUR_SIGMA = 20.0  # px at the reference size, times I
MOTION_BLUR_LENGTH = 30.0  # px at the reference size, times I
FLARE_GHOSTS = 6
DIRT_SMALL, DIRT_LARGE, DIRT_SMUDGES = 48, 6, 4


def lens_blur(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  del key
  i = jnp.asarray(intensity, jnp.float32)
  s = common.scale(x_hwc, reference_size)
  blurred = common.blur(x_hwc, LENS_BLUR_SIGMA * s * i, LENS_BLUR_SIGMA * s)
  return ops.clip01((1.0 - 0.7 * i) * x_hwc + 0.9 * i * blurred)


def lens_flare(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  """Sizes are fractions of the short side (a flare is relative to the frame), so no `s`."""
  del reference_size
  i = jnp.asarray(intensity, jnp.float32)
  h, w = x_hwc.shape[:2]
  side = float(common.short_side(x_hwc))
  g = FLARE_GHOSTS
  u = common.uniforms(key, 5 + 5 * g)
  yy, xx = common.pixel_grid(h, w)
  src = (0.1 + 0.8 * u[0:2]) * jnp.array([h - 1, w - 1])
  centre = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0])
  warm = jnp.array([1.0, 0.95, 0.85]) + 0.05 * common.to_normal(u[2:5])
  glow = overlays.gaussian_blob(yy, xx, src, (0.18 * side, 0.18 * side))
  core = overlays.gaussian_blob(yy, xx, src, (0.04 * side, 0.04 * side))
  streak = overlays.gaussian_blob(yy, xx, src, (0.006 * side, 0.6 * side))
  light = (0.7 * glow + core + 0.4 * streak)[..., None] * warm
  # Ghosts are reflections between lens elements: they line up on the axis through the centre.
  t = -1.3 + 2.3 * u[5:5 + g]
  radii = (0.02 + 0.06 * u[5 + g:5 + 2 * g]) * side
  tints = (0.3 + 0.7 * u[5 + 2 * g:].reshape(g, 3)) * 0.35

  def ghost(tk, rk, ck):
    pos = centre + tk * (centre - src)
    return overlays.soft_disc(yy, xx, pos, rk, softness=0.3 * rk)[..., None] * ck

  ghosts = jnp.sum(jax.vmap(ghost)(t, radii, tints), axis=0)
  flare = ops.clip01(light + ghosts)
  # Screen blend: light adds to the scene without passing white.
  return ops.clip01(1.0 - (1.0 - x_hwc) * (1.0 - 0.9 * i * flare))


def motion_blur(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  i = jnp.asarray(intensity, jnp.float32)
  s = common.scale(x_hwc, reference_size)
  n_taps = max(2, math.ceil(MOTION_BLUR_LENGTH * s)) + 1
  length = MOTION_BLUR_LENGTH * s * i
  theta = 2.0 * jnp.pi * common.uniforms(key, 1)[0]
  along = (jnp.arange(n_taps, dtype=jnp.float32) / (n_taps - 1) - 0.5) * length
  fy, fx = along * jnp.sin(theta), along * jnp.cos(theta)
  y0, x0 = jnp.floor(fy), jnp.floor(fx)
  wy, wx = fy - y0, fx - x0
  # Each fractional tap becomes its four bilinear neighbours, so the kernel varies smoothly in I.
  dy = jnp.concatenate([y0, y0 + 1, y0, y0 + 1]).astype(jnp.int32)
  dx = jnp.concatenate([x0, x0, x0 + 1, x0 + 1]).astype(jnp.int32)
  wts = jnp.concatenate([(1 - wy) * (1 - wx), wy * (1 - wx), (1 - wy) * wx, wy * wx]) / n_taps
  # |along| <= length / 2, and a bilinear tap reaches one pixel further.
  max_shift = math.ceil(MOTION_BLUR_LENGTH * s / 2) + 1
  return ops.clip01(ops.line_filter(x_hwc, dy, dx, wts, max_shift=max_shift))


def dirty_lens(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  """Blotch sizes are fractions of the short side (dirt on the lens covers a fixed part of the
  frame): small 0.8-4%, large 4-10%, smudges 15-30% (the reference's 4-20 px, 20-50 px and
  100-300 px at 512 px)."""
  del reference_size
  i = jnp.asarray(intensity, jnp.float32)
  h, w = x_hwc.shape[:2]
  side = float(common.short_side(x_hwc))
  yy, xx = common.pixel_grid(h, w)
  n_blobs = DIRT_SMALL + DIRT_LARGE + DIRT_SMUDGES
  u = common.uniforms(key, 6 * n_blobs + 3)
  params = u[:6 * n_blobs].reshape(n_blobs, 6)

  def layer(p, r_lo, r_hi, o_lo, o_hi, count):
    n = p.shape[0]
    centres = p[:, 0:2] * jnp.array([h - 1, w - 1])
    radii = (r_lo + (r_hi - r_lo) * p[:, 2]) * side
    aspect = 0.5 + 0.5 * p[:, 3]
    angles = jnp.pi * p[:, 4]
    opac = (o_lo + (o_hi - o_lo) * p[:, 5]) * (0.5 + 0.5 * i) * common.fade_in_count(count, n)
    blobs = jax.vmap(lambda c, r, e, a: overlays.gaussian_blob(yy, xx, c, (r, r * e), a))(
        centres, radii, aspect, angles)
    return jnp.prod(1.0 - opac[:, None, None] * blobs, axis=0)  # transmittance of this layer

  n0, n1 = DIRT_SMALL, DIRT_SMALL + DIRT_LARGE
  clear = (layer(params[:n0], 0.008, 0.04, 0.5, 0.9, DIRT_SMALL * i)
           * layer(params[n0:n1], 0.04, 0.1, 0.4, 0.75, DIRT_LARGE * i)
           * layer(params[n1:], 0.15, 0.3, 0.25, 0.45, DIRT_SMUDGES * i))
  density = (1.0 - clear)[..., None]
  sigma = 0.02 * side  # dirt scatters light: what shows through a blotch is blurred
  scattered = common.blur(x_hwc, sigma, sigma)
  dirt = jnp.array([0.36, 0.32, 0.27]) + 0.04 * common.to_normal(u[6 * n_blobs:])
  return ops.clip01((1.0 - density) * x_hwc + density * (0.5 * scattered + 0.5 * dirt))


def hsv_saturation(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  del key, reference_size
  i = jnp.asarray(intensity, jnp.float32)
  hsv = ops.rgb_to_hsv(ops.clip01(x_hwc))
  hsv = hsv.at[..., 1].multiply(1.0 - i)
  return ops.clip01(ops.hsv_to_rgb(hsv))


CAPTURE = {
    "lens_blur": lens_blur,
    "lens_flare": lens_flare,
    "motion_blur": motion_blur,
    "dirty_lens": dirty_lens,
    "hsv_saturation": hsv_saturation,
}
