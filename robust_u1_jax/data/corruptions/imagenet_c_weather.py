"""ImageNet-C weather corruptions (snow, frost, fog, spatter) in JAX, procedurally.

Same contract as `imagenet_c_noise_blur`: float32 [0, 1] H x W x 3 image, a jax.random key and a
severity 1..5 (Python int or traced) in; a float32 [0, 1] image of the same shape out; jit- and
vmap-able, one compilation for all severities.
Severity tables are the published ImageNet-C / `imagecorruptions` values.

Size: snow, frost and spatter build their layer at the reference resolution (the image resized so
its short side is reference_size = 224, where the published parameters hold) and resize the
finished layer to H x W with Pillow-style antialiased bilinear resampling. Fog's plasma fractal
is generated on the next power of two of max(H, W) as in the reference, which already makes it
relative to the image. reference_size=None builds every layer at the image's own size.

Departures from the reference, all because its inputs or tools cannot be used here:
  * frost: ImageNet-C blends random crops of six frost photographs that cannot be shipped. Six
    procedural frost textures (`frost_texture`: a plasma-fractal haze plus crystalline needles,
    sparse seeds drawn out along a few random directions, tinted blue-white) are made once per
    layer size and cropped at random instead. The published blend weights are kept; the
    texture's look differs from the photographs.
  * spatter (water): OpenCV's Canny, distance transform and histogram equalisation are replaced
    by JAX equivalents: the liquid mask's boundary as the edge map (the liquid layer is 0 or
    >= the threshold, so Canny's edges are that boundary), a 3 x 3 chamfer distance truncated at
    20 px, and a 256-bin equalisation with OpenCV's look-up rule.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import pixels
from robust_u1_jax.data.corruptions import ops
from robust_u1_jax.data.corruptions import resample
from robust_u1_jax.data.corruptions.imagenet_c_noise_blur import pick

# loc, scale, zoom, threshold, blur radius, blur sigma, image blend
SNOW = ((0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))
FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # image weight, frost weight
FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # fog strength, wibble decay
# loc, scale, blur sigma, threshold, intensity (water) or mud blur sigma, 0 water / 1 mud
SPATTER = ((0.65, 0.3, 4, 0.69, 0.6, 0),
           (0.65, 0.3, 3, 0.68, 0.6, 0),
           (0.65, 0.3, 2, 0.68, 0.5, 0),
           (0.65, 0.3, 1, 0.65, 1.5, 1),
           (0.67, 0.4, 1, 0.65, 1.5, 1))
WATER_RGB = (175 / 255.0, 238 / 255.0, 238 / 255.0)  # pale turquoise
MUD_RGB = (63 / 255.0, 42 / 255.0, 20 / 255.0)
FROST_TINT = (0.86, 0.93, 1.0)


def _layer_shape(h: int, w: int, reference_size) -> tuple[int, int]:
  s = ops.size_scale(h, w, reference_size)
  return max(8, int(round(h / s))), max(8, int(round(w / s)))


def _to_image_size(layer, h: int, w: int):
  if layer.shape[:2] == (h, w):
    return layer
  return resample.resize(layer, h, w, "bilinear")


def plasma_fractal(key, mapsize: int, wibble_decay) -> jax.Array:
  """Diamond-square height map, mapsize x mapsize (a power of two), normalised to [0, 1].

  The reference's recurrence: level by level (step = mapsize, mapsize / 2, ..., 2) the square
  centres, then the diamond centres, get the mean of their four neighbours at distance step / 2
  (wrapping around) plus noise wibble * U(-wibble, wibble); wibble starts at 100 and is divided
  by `wibble_decay` per level. Here every level works on the full map with masks, so the levels
  are one `fori_loop` (compiles once, any mapsize); `wibble_decay` may be traced. Every cell is
  set at exactly one level, so one uniform per cell, drawn once, serves all levels.
  """
  if mapsize < 2 or mapsize & (mapsize - 1):
    raise ValueError(f"plasma_fractal mapsize {mapsize} is not a power of two >= 2")
  levels = mapsize.bit_length() - 1
  idx = jnp.arange(mapsize)
  noise = ops.uniform(key, (mapsize, mapsize), minval=-1.0, maxval=1.0)

  def level(k, m):
    step = jnp.right_shift(mapsize, k)
    half = step // 2
    wibble = 100.0 / jnp.asarray(wibble_decay, jnp.float32) ** k.astype(jnp.float32)
    u = noise * wibble * wibble
    on_half = (idx % step) == half
    on_grid = (idx % step) == 0
    shift = lambda a, dy, dx: jnp.roll(a, (dy, dx), axis=(0, 1))
    squares = (shift(m, half, half) + shift(m, half, -half) + shift(m, -half, half)
               + shift(m, -half, -half)) / 4.0 + u
    m = jnp.where(on_half[:, None] & on_half[None, :], squares, m)
    diamonds = (shift(m, half, 0) + shift(m, -half, 0) + shift(m, 0, half)
                + shift(m, 0, -half)) / 4.0 + u
    is_diamond = (on_grid[:, None] & on_half[None, :]) | (on_half[:, None] & on_grid[None, :])
    return jnp.where(is_diamond, diamonds, m)

  m = jax.lax.fori_loop(0, levels, level, jnp.zeros((mapsize, mapsize), jnp.float32))
  m = m - jnp.min(m)
  return m / jnp.maximum(jnp.max(m), 1e-12)


def _next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 2 ** (n - 1).bit_length()


# -------------------------------------------------------------------------------------- fog

def fog(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  del reference_size  # the fractal spans the image whatever its size
  strength, decay = pick(FOG, severity, "fog")
  h, w = x_hwc.shape[:2]
  size = max(_next_power_of_2(max(h, w)), 2)
  fractal = plasma_fractal(key, size, decay)[:h, :w, None]
  max_val = jnp.max(x_hwc)
  return ops.clip01((x_hwc + strength * fractal) * max_val / (max_val + strength))


# ------------------------------------------------------------------------------------- snow

def snow(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Zoomed, thresholded gaussian flakes, motion-blurred at a random angle in [-135, -45)."""
  h, w = x_hwc.shape[:2]
  hr, wr = _layer_shape(h, w, reference_size)
  # Zoom sampling grids are integer-sensitive, so they are tabulated per severity on the host.
  table = [(*row[:2], *resample.center_zoom_params(hr, row[2]),
            *resample.center_zoom_params(wr, row[2]), *row[3:]) for row in SNOW]
  loc, scale, top_y, step_y, top_x, step_x, threshold, radius, sigma, blend = pick(
      table, severity, "snow")
  k_flakes, k_angle = jax.random.split(key)
  layer = loc + scale * ops.normal(k_flakes, (hr, wr))
  layer = resample.center_zoom_with(layer, (top_y, step_y), (top_x, step_x))
  layer = ops.clip01(jnp.where(layer < threshold, 0.0, layer))
  angle = jax.random.uniform(k_angle, (), minval=-135.0, maxval=-45.0)
  max_radius = max(row[4] for row in SNOW)
  layer = ops.motion_blur(layer, max_radius, sigma, angle, active_radius=radius)
  layer = _to_image_size(ops.quantize_uint8(layer), h, w)[..., None]
  gray = ops.rgb_to_gray(x_hwc)[..., None]
  x = blend * x_hwc + (1.0 - blend) * jnp.maximum(x_hwc, gray * 1.5 + 0.5)
  return ops.clip01(x + layer + layer[::-1, ::-1])


# ------------------------------------------------------------------------------------ frost

def frost_texture(key, height: int, width: int) -> jax.Array:
  """Procedural frost (H x W x 3, [0, 1]): haze plus ice needles, in place of frost photographs.

  Haze: a plasma fractal (decay 1.6), squared so rime gathers in patches. Needles: sparse seeds
  (denser where the haze is thick) in 12 groups, each group drawn out along its own random
  direction by a two-sided line filter with linearly fading taps, half the groups long and
  sparse, half short and dense, combined by max like crystals growing along a few axes; a small
  blur softens them. Tinted slightly blue.
  """
  k_haze, k_seed, k_angle, k_len = jax.random.split(key, 4)
  size = max(_next_power_of_2(max(height, width)), 2)
  fractal = plasma_fractal(k_haze, size, 1.6)[:height, :width]
  haze = fractal ** 2
  groups = 12
  reach = max(4, round(0.09 * min(height, width)))  # longest needle half-length, px
  long_group = jnp.arange(groups) < groups // 2
  density = jnp.where(long_group, 0.0015, 0.008)[:, None, None]
  u_seed = jax.random.uniform(k_seed, (2, groups, height, width))
  # Crystals cluster where the rime is thick, leaving clearer patches elsewhere.
  seeds = (u_seed[0] < density * 2.5 * fractal) * (0.4 + 0.6 * u_seed[1])
  angles = jax.random.uniform(k_angle, (groups,), minval=0.0, maxval=180.0)
  lengths = jax.random.uniform(k_len, (groups,), minval=0.4, maxval=1.0) * jnp.where(
      long_group, reach, reach / 3.0)
  steps = jnp.arange(-reach, reach + 1, dtype=jnp.float32)

  def streak(seeds_hw, angle, length):
    t = jnp.deg2rad(angle)
    dy = jnp.round(steps * jnp.sin(t)).astype(jnp.int32)
    dx = jnp.round(steps * jnp.cos(t)).astype(jnp.int32)
    taps = jnp.clip(1.0 - jnp.abs(steps) / length, 0.0, 1.0)
    return ops.line_filter(seeds_hw, dy, dx, taps)

  needles = jnp.max(jax.vmap(streak)(seeds, angles, lengths), axis=0)
  needles = ops.gaussian_blur(needles, 0.5, mode="wrap")
  texture = ops.clip01(0.1 + 0.7 * haze + 1.1 * needles)
  return texture[..., None] * jnp.asarray(FROST_TINT, jnp.float32)


FROST_PICTURES = 6  # as the reference's six frost photographs
FROST_MARGIN = 0.5  # each picture is this much larger than the layer per side: room to crop


@functools.lru_cache(maxsize=16)
def frost_pictures(height: int, width: int) -> np.ndarray:
  """(FROST_PICTURES, H', W', 3) uint8: fixed procedural frost textures, a little larger than
  height x width, made once per layer size (a constant of every program that uses them)."""
  ph, pw = (int(round(n * (1.0 + FROST_MARGIN))) for n in (height, width))
  make = jax.jit(lambda key: pixels.to_uint8(frost_texture(key, ph, pw)))
  # Concrete even when first asked for while a corruption is being traced.
  with jax.ensure_compile_time_eval():
    return np.stack([np.asarray(make(jax.random.key(1000 + i))) for i in range(FROST_PICTURES)])


def frost(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """c_img * image + c_frost * frost: like the reference, which blends a random crop of one of
  six frost photographs, the frost is a random crop of one of six stored pictures
  (`frost_pictures`: procedural textures, see the module docstring), so a corruption costs a
  crop, not a texture synthesis."""
  c_img, c_frost = pick(FROST, severity, "frost")
  h, w = x_hwc.shape[:2]
  hr, wr = _layer_shape(h, w, reference_size)
  pictures = jnp.asarray(frost_pictures(hr, wr))
  u = jax.random.uniform(key, (3,))
  which = jnp.minimum((u[0] * FROST_PICTURES).astype(jnp.int32), FROST_PICTURES - 1)
  top = (u[1] * (pictures.shape[1] - hr + 1)).astype(jnp.int32)
  left = (u[2] * (pictures.shape[2] - wr + 1)).astype(jnp.int32)
  crop = jax.lax.dynamic_slice(pictures, (which, top, left, 0), (1, hr, wr, 3))[0]
  texture = _to_image_size(pixels.to_float(crop), h, w)
  return ops.clip01(c_img * x_hwc + c_frost * texture)


# ---------------------------------------------------------------------------------- spatter

def _chamfer_distance(edges_hw, limit: float) -> jax.Array:
  """Distance (3 x 3 chamfer: 1 and sqrt 2) to the nearest edge pixel, truncated at `limit`."""
  big = jnp.float32(limit + 10.0)
  d = jnp.where(edges_hw, 0.0, big)
  offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]

  def relax(_, d):
    p = jnp.pad(d, 1, constant_values=big)
    h, w = d.shape
    for dy, dx in offsets:
      d = jnp.minimum(d, p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] + math.hypot(dy, dx))
    return d

  d = jax.lax.fori_loop(0, int(math.ceil(limit)) + 1, relax, d)
  return jnp.minimum(d, limit)


def _equalize_hist_uint8(levels_hw) -> jax.Array:
  """cv2.equalizeHist on integer levels 0..255 (float array holding integers)."""
  idx = levels_hw.astype(jnp.int32).reshape(-1)
  hist = jnp.bincount(idx, length=256).astype(jnp.float32)
  total = jnp.float32(idx.size)
  first = jnp.argmax(hist > 0)
  cdf = jnp.cumsum(hist)
  denom = total - hist[first]
  lut = jnp.clip(jnp.round((cdf - hist[first]) * 255.0 / jnp.maximum(denom, 1.0)), 0.0, 255.0)
  lut = jnp.where(jnp.arange(256) <= first, 0.0, lut)
  return jnp.where(denom > 0, lut[idx].reshape(levels_hw.shape), levels_hw)


def _water_mask(liquid_hw, threshold: float, intensity: float) -> jax.Array:
  wet = liquid_hw >= threshold
  # Edge map: wet pixels with a dry 4-neighbour (where Canny finds the puddles' outlines).
  dry = ~jnp.pad(wet, 1, mode="edge")
  dry_nbr = dry[:-2, 1:-1] | dry[2:, 1:-1] | dry[1:-1, :-2] | dry[1:-1, 2:]
  edges = wet & dry_nbr
  dist = _chamfer_distance(edges, 20.0)
  dist = jnp.floor(ops.box_blur(dist, 3))
  dist = _equalize_hist_uint8(dist)
  emboss = jnp.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], jnp.float32)
  dist = jnp.clip(jnp.round(ops.conv2d(dist, emboss, mode="mirror")), 0.0, 255.0)
  dist = ops.box_blur(dist, 3)
  m = liquid_hw * dist
  return m / jnp.maximum(jnp.max(m), 1e-12) * intensity


def spatter(x_hwc, key, severity, *, reference_size=ops.REFERENCE_SIZE):
  """Water drops (severities 1-3, turquoise highlights) or mud (4-5, brown occlusion).

  Both layers are computed and the severity's one is selected, so the severity may be traced.
  """
  loc, scale, sigma, threshold, strength, is_mud = pick(SPATTER, severity, "spatter")
  h, w = x_hwc.shape[:2]
  hr, wr = _layer_shape(h, w, reference_size)
  liquid = loc + scale * ops.normal(key, (hr, wr))
  radius = ops.gaussian_radius(max(row[2] for row in SPATTER))
  liquid = ops.gaussian_blur(liquid, sigma, mode="nearest", radius=radius)
  liquid = jnp.where(liquid < threshold, 0.0, liquid)
  water = _to_image_size(_water_mask(liquid, threshold, strength), h, w)[..., None]
  mud_radius = ops.gaussian_radius(max(row[4] for row in SPATTER if row[5]))
  mud = ops.gaussian_blur((liquid > threshold).astype(jnp.float32), strength, mode="nearest",
                          radius=mud_radius)
  mud = _to_image_size(jnp.where(mud < 0.8, 0.0, mud), h, w)[..., None]
  wet = x_hwc + water * jnp.asarray(WATER_RGB, jnp.float32)
  muddy = x_hwc * (1.0 - mud) + mud * jnp.asarray(MUD_RGB, jnp.float32)
  return ops.clip01(jnp.where(is_mud > 0, muddy, wet))


WEATHER = {"snow": snow, "frost": frost, "fog": fog, "spatter": spatter}
