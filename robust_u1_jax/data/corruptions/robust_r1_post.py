"""Robust-R1 post-processing-stage degradations: sharpness_change, graffiti, watermark_damage.
All pure JAX (jit + vmap, traced intensity); contract in `robust_r1_common`. The only host-side
step is rasterising graffiti's words, once, with PIL (`overlays.text_atlas`): a constant, so no
degradation here needs to run outside jit.

Parameterisations (s = size scale of `robust_r1_common.scale`, L = short side in px):
  sharpness_change  a key-drawn direction (even odds): unsharp mask x + 4 I (x - blur(x)) with
                    blur sigma max(1, 2 s) px, or a gaussian blur of sigma 6 I s px.
  graffiti          10 I random-coloured curved strokes (quadratic Beziers between random
                    points, (2 + 6 I u) s px thick, u ~ U[0, 1]); above I = 0.55 (ramped in over
                    0.05) a red word (X, FAKE, COPY, ...) 110 I s px tall (<= L / 2), tilted
                    +-15 degrees, as the reference's cv2.putText.
  watermark_damage  1 + 15 I rectangles of (20-80) x (50-200) s px are "repaired" by
                    normalised-convolution inpainting (the reference uses cv2 Telea inpainting)
                    and mixed in with weight I; above I = 0.5 their edges are darkened to 80%.
"""

import jax
import jax.numpy as jnp

from robust_u1_jax.data.corruptions import ops
from robust_u1_jax.data.corruptions import overlays
from robust_u1_jax.data.corruptions import resample
from robust_u1_jax.data.corruptions import robust_r1_common as common

REFERENCE_SIZE = common.REFERENCE_SIZE

GRAFFITI_WORDS = ("X", "FAKE", "COPY", "VOID", "COPYRIGHT", "42", "77", "100")
GRAFFITI_STROKES = 10
GRAFFITI_CURVE_POINTS = 9
WATERMARK_RECTS = 16
INPAINT_SIGMA = 8.0  # px at the reference size: the fine normalised-convolution scale
INPAINT_COARSE_SIDE = 16  # short side of the coarse fallback grid


def sharpness_change(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  i = jnp.asarray(intensity, jnp.float32)
  s = common.scale(x_hwc, reference_size)
  sigma_unsharp = max(1.0, 2.0 * s)
  sharpened = x_hwc + 4.0 * i * (x_hwc - common.blur(x_hwc, sigma_unsharp, sigma_unsharp))
  sigma_blur = 6.0 * s
  blurred = common.blur(x_hwc, sigma_blur * i, sigma_blur)
  return ops.clip01(jnp.where(common.uniforms(key, 1)[0] < 0.5, sharpened, blurred))


def _bezier(p0, p1, p2, n: int) -> jax.Array:
  t = jnp.linspace(0.0, 1.0, n)[:, None]
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def graffiti(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  i = jnp.asarray(intensity, jnp.float32)
  h, w = x_hwc.shape[:2]
  s = common.scale(x_hwc, reference_size)
  side = float(common.short_side(x_hwc))
  yy, xx = common.pixel_grid(h, w)
  n = GRAFFITI_STROKES
  u = common.uniforms(key, 10 * n + 4)
  size = jnp.array([h - 1, w - 1], jnp.float32)
  strokes = u[:10 * n].reshape(n, 10)
  ends = strokes[:, 0:4].reshape(n, 2, 2) * size
  bend = 0.15 * side * common.to_normal(strokes[:, 4:6])
  thick = jnp.maximum(1.0, (2.0 + 6.0 * i * strokes[:, 6]) * s)
  colours = strokes[:, 7:10]
  alpha = common.fade_in_count(GRAFFITI_STROKES * i, GRAFFITI_STROKES)

  def draw(img, stroke):
    end, b, t, colour, a = stroke
    curve = _bezier(end[0], 0.5 * (end[0] + end[1]) + b, end[1], GRAFFITI_CURVE_POINTS)
    cover = (a * overlays.polyline_coverage(yy, xx, curve, t))[..., None]
    return img * (1.0 - cover) + colour * cover, None

  out, _ = jax.lax.scan(draw, x_hwc, (ends, bend, thick, colours, alpha))
  atlas, widths = overlays.text_atlas(GRAFFITI_WORDS)
  word = jnp.minimum(jnp.floor(u[10 * n] * len(GRAFFITI_WORDS)), len(GRAFFITI_WORDS) - 1)
  word = word.astype(jnp.int32)
  centre = (0.2 + 0.6 * u[10 * n + 1:10 * n + 3]) * size
  angle = -15.0 + 30.0 * u[10 * n + 3]
  text_height = jnp.minimum(110.0 * s * i, side / 2.0)
  text = overlays.stamp_text(atlas, widths, word, (h, w), centre, text_height, angle)
  cover = (common.ramp(i, 0.55, 0.05) * text)[..., None]
  return ops.clip01(out * (1.0 - cover) + jnp.array([1.0, 0.0, 0.0]) * cover)


def _inpaint(x_hwc, known_hw1, sigma: float) -> jax.Array:
  """Fills unknown pixels by normalised convolution: a local gaussian average of the known ones,
  falling back to a coarse-grid average (and the global mean) where none are near."""
  h, w = x_hwc.shape[:2]
  num = common.blur(x_hwc * known_hw1, sigma, sigma)
  den = common.blur(known_hw1, sigma, sigma)
  fine = num / jnp.maximum(den, 1e-6)
  f = max(1, min(h, w) // INPAINT_COARSE_SIDE)
  ch, cw = max(1, h // f), max(1, w // f)
  c_num = resample.resize(x_hwc * known_hw1, ch, cw, "box")
  c_den = resample.resize(known_hw1, ch, cw, "box")
  global_mean = jnp.sum(x_hwc * known_hw1, axis=(0, 1)) / jnp.maximum(jnp.sum(known_hw1), 1e-6)
  c_val = jnp.where(c_den > 1e-3, c_num / jnp.maximum(c_den, 1e-3), global_mean)
  coarse = resample.resize(c_val, h, w, "bilinear")
  mix = jnp.clip(den / 0.3, 0.0, 1.0)
  return mix * fine + (1.0 - mix) * coarse


def watermark_damage(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  i = jnp.asarray(intensity, jnp.float32)
  h, w = x_hwc.shape[:2]
  s = common.scale(x_hwc, reference_size)
  yy, xx = common.pixel_grid(h, w)
  u = common.uniforms(key, 4 * WATERMARK_RECTS).reshape(WATERMARK_RECTS, 4)
  sizes = u[:, 0:2] * jnp.array([60.0, 150.0])
  sizes = (sizes + jnp.array([20.0, 50.0])) * s
  sizes = jnp.minimum(sizes, jnp.array([h, w], jnp.float32) * 0.6)
  corners = u[:, 2:4] * (jnp.array([h, w]) - sizes)
  alpha = common.fade_in_count(1.0 + 15.0 * i, WATERMARK_RECTS)
  rects = jax.vmap(lambda c, sz: overlays.rect_coverage(yy, xx, c, sz))(corners, sizes)
  mask = (1.0 - jnp.prod(1.0 - alpha[:, None, None] * rects, axis=0))[..., None]
  filled = _inpaint(x_hwc, 1.0 - mask, max(2.0, INPAINT_SIGMA * s))
  repaired = mask * filled + (1.0 - mask) * x_hwc
  out = (1.0 - i) * x_hwc + i * repaired
  # Outline: where the mask changes between 4-neighbours (the reference's Canny of the mask).
  m = mask[..., 0]
  pad = jnp.pad(m, 1, mode="edge")
  edge = jnp.max(jnp.stack([jnp.abs(m - pad[:-2, 1:-1]), jnp.abs(m - pad[2:, 1:-1]),
                            jnp.abs(m - pad[1:-1, :-2]), jnp.abs(m - pad[1:-1, 2:])]), axis=0)
  darken = 0.2 * common.ramp(i, 0.5, 0.05) * jnp.clip(edge, 0.0, 1.0)
  return ops.clip01(out * (1.0 - darken)[..., None])


POST_PROCESSING = {
    "sharpness_change": sharpness_change,
    "graffiti": graffiti,
    "watermark_damage": watermark_damage,
}
