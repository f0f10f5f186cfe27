"""Overlays drawn onto images: text stamps, thick strokes, soft blobs and rectangles.

Text needs glyphs, which only a font rasteriser provides, so the word masks are rendered once on
the host with PIL (ImageDraw and PIL's default font) and cached; they depend on nothing but the
word list, never on a key or an image. Everything that depends on the key (which word, where,
how large, how rotated, what colour) happens in JAX by warping that constant atlas, so the
degradations that use it stay jit- and vmap-able. The shape rasterisers are pure JAX and
anti-aliased (coverage falls off over one pixel), so outputs change continuously with sizes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from robust_u1_jax.data.corruptions import resample

ATLAS_FONT_SIZE = 48  # px; stamps are resampled from this, so it bounds the sharpness of big text


@functools.lru_cache(maxsize=8)
def text_atlas(words: tuple[str, ...],
               font_size: int = ATLAS_FONT_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Host-side (PIL): white-on-black masks of `words`, stacked as (n, h, w) float32 in [0, 1].

  Each word is drawn at the left of its row, vertically centred on its ink; returns the masks and
  each word's ink width in atlas pixels. PIL's default font is FreeType-scalable in Pillow >= 10.1;
  an older Pillow's fixed bitmap font is drawn small and upscaled instead.
  """
  if not words:
    raise ValueError("text_atlas needs at least one word")
  try:
    font = ImageFont.load_default(size=font_size)
    upscale = 1
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font
    font = ImageFont.load_default()
    upscale = max(1, font_size // 11)
  boxes = [ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), w, font=font) for w in words]
  pad = 2
  height = max(b[3] - b[1] for b in boxes) + 2 * pad
  width = max(b[2] - b[0] for b in boxes) + 2 * pad
  masks, widths = [], []
  for word, (x0, y0, x1, y1) in zip(words, boxes):
    img = Image.new("L", (width, height), 0)
    top = pad + (height - 2 * pad - (y1 - y0)) // 2
    ImageDraw.Draw(img).text((pad - x0, top - y0), word, fill=255, font=font)
    masks.append(np.asarray(img, np.float32) / 255.0)
    widths.append(x1 - x0 + 2 * pad)
  atlas = np.stack(masks)
  if upscale > 1:
    atlas = np.repeat(np.repeat(atlas, upscale, axis=1), upscale, axis=2)
  return atlas, np.asarray(widths, np.float32) * upscale


def stamp_text(atlas_nhw, widths_n, index, out_hw: tuple[int, int], centre_yx, text_height,
               angle_deg=0.0) -> jax.Array:
  """H x W coverage of word `index` of the atlas, `text_height` px tall, rotated, centred at
  `centre_yx`. Everything but the atlas and `out_hw` may be traced."""
  atlas = jnp.asarray(atlas_nhw, jnp.float32)
  h_t = atlas.shape[1]
  mask = atlas[index]
  word_w = jnp.asarray(widths_n, jnp.float32)[index]
  zoom = h_t / jnp.maximum(jnp.asarray(text_height, jnp.float32), 1e-3)  # atlas px per image px
  t = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
  c, s = jnp.cos(t), jnp.sin(t)
  yy, xx = jnp.meshgrid(jnp.arange(out_hw[0], dtype=jnp.float32),
                        jnp.arange(out_hw[1], dtype=jnp.float32), indexing="ij")
  dy, dx = yy - centre_yx[0], xx - centre_yx[1]
  # Rotate image offsets into the text frame, then scale to atlas pixels.
  ty = (c * dy + s * dx) * zoom + (h_t - 1) / 2.0
  tx = (-s * dy + c * dx) * zoom + (word_w - 1) / 2.0
  return resample.warp(mask, ty, tx, order=1, mode="constant", cval=0.0)


def segment_coverage(yy, xx, p0_yx, p1_yx, thickness) -> jax.Array:
  """Anti-aliased coverage in [0, 1] of a round-capped segment of `thickness` px (traced ok)."""
  p0 = jnp.asarray(p0_yx, jnp.float32)
  p1 = jnp.asarray(p1_yx, jnp.float32)
  d = p1 - p0
  length2 = jnp.maximum(jnp.sum(d * d), 1e-6)
  t = jnp.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / length2, 0.0, 1.0)
  dist = jnp.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))
  return jnp.clip(thickness / 2.0 - dist + 0.5, 0.0, 1.0)


def polyline_coverage(yy, xx, points_k2, thickness) -> jax.Array:
  """Coverage of a thick polyline through K points (union = max over its K-1 segments)."""
  cover = jax.vmap(lambda a, b: segment_coverage(yy, xx, a, b, thickness))(points_k2[:-1],
                                                                            points_k2[1:])
  return jnp.max(cover, axis=0)


def gaussian_blob(yy, xx, centre_yx, sigma_yx, angle_rad=0.0) -> jax.Array:
  """exp(-r^2 / 2) for an (optionally rotated) elliptical gaussian with axis sigmas sigma_yx."""
  t = jnp.asarray(angle_rad, jnp.float32)
  c, s = jnp.cos(t), jnp.sin(t)
  dy, dx = yy - centre_yx[0], xx - centre_yx[1]
  u = (c * dy + s * dx) / jnp.maximum(sigma_yx[0], 1e-3)
  v = (-s * dy + c * dx) / jnp.maximum(sigma_yx[1], 1e-3)
  return jnp.exp(-0.5 * (u * u + v * v))


def soft_disc(yy, xx, centre_yx, radius, softness=1.0) -> jax.Array:
  """Coverage of a disc whose edge falls from 1 to 0 over `softness` px."""
  dist = jnp.hypot(yy - centre_yx[0], xx - centre_yx[1])
  return jnp.clip((radius - dist) / jnp.maximum(softness, 1e-3) + 0.5, 0.0, 1.0)


def rect_coverage(yy, xx, top_left_yx, size_hw) -> jax.Array:
  """Anti-aliased coverage of an axis-aligned rectangle; pixel (y, x) covers [y, y+1) x [x, x+1)."""
  def axis(coord, lo, extent):
    return jnp.clip(jnp.minimum(coord + 1.0, lo + extent) - jnp.maximum(coord, lo), 0.0, 1.0)

  return axis(yy, top_left_yx[0], size_hw[0]) * axis(xx, top_left_yx[1], size_hw[1])
