"""`python -m robust_u1_jax.bench corrupt`: each corruption in JAX against a host reference.

For every ImageNet-C corruption, a batch of 32 images of 224 x 224 (uint8 in, uint8 out) at
severity 3 is corrupted by `corruptions.corrupt_batch` (jitted, on the data device: the host
CPU) and by a host reference of the same operation written with NumPy / SciPy / scikit-image /
PIL, as Hendrycks & Dietterich's corruptions.py does it (OpenCV and ImageMagick steps replaced
by their SciPy equivalents; frost reads a stored frost picture and crops it, as the reference
reads its photographs). The two sides are timed alternately in one process (`alternate`), and
each row prints the median of the per-round ratios JAX time / host time with its quartiles.
Goals on a CPU: the median corruption at least as fast as its reference (ratio <= 1), none
slower than half its speed (ratio <= 2).

A last row compares the Robust-R1 pipeline over the batch (`apply_pipeline_batch`: every image
runs only its four drawn degradations) with the same images corrupted one at a time.

The glass-blur reference is the reference's Python loop, about a second per image: it is timed
on GLASS_HOST_IMAGES images and scaled to the batch (marked in the table).
"""

from __future__ import annotations

import functools
import io
import math

import jax
import numpy as np
from PIL import Image
from scipy import ndimage
import skimage.color
import skimage.exposure
import skimage.feature
import skimage.util

from robust_u1_jax import pixels
from robust_u1_jax.benchmarks import Ratio, alternate, goal, table, usable_cpus
from robust_u1_jax.data import corruptions
from robust_u1_jax.data.corruptions import imagenet_c
from robust_u1_jax.data.corruptions import imagenet_c_digital as digital
from robust_u1_jax.data.corruptions import imagenet_c_noise_blur as noise_blur
from robust_u1_jax.data.corruptions import imagenet_c_weather as weather
from robust_u1_jax.data.corruptions import ops

BATCH, SIZE, SEVERITY = 32, 224, 3
GOAL_MEDIAN, GOAL_WORST = 1.0, 2.0
GLASS_HOST_IMAGES = 2


# ---------------------------------------------------------------------- host references
# Each takes the uint8 batch and a numpy Generator and returns the uint8 batch, one image at a
# time as the reference does; c is the severity's row of the published table.

def _per_image(fn):
  @functools.wraps(fn)
  def run(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([pixels.to_uint8(np.asarray(fn(pixels.to_float(im), rng), np.float32))
                     for im in images])
  return run


def _c(table):
  return table[SEVERITY - 1]


@_per_image
def _gaussian_noise(x, rng):
  return x + rng.normal(size=x.shape, scale=_c(noise_blur.GAUSSIAN_NOISE))


@_per_image
def _shot_noise(x, rng):
  c = _c(noise_blur.SHOT_NOISE)
  return rng.poisson(x * c) / c


@_per_image
def _impulse_noise(x, rng):
  return skimage.util.random_noise(x, mode="s&p", amount=_c(noise_blur.IMPULSE_NOISE), rng=rng)


@_per_image
def _speckle_noise(x, rng):
  return x + x * rng.normal(size=x.shape, scale=_c(noise_blur.SPECKLE_NOISE))


@_per_image
def _gaussian_blur(x, rng):
  del rng  # skimage.filters.gaussian is this scipy call
  sigma = _c(noise_blur.GAUSSIAN_BLUR)
  return ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest")


def glass_reference(x: np.ndarray, rng: np.random.Generator, sigma: float, delta: int,
                    iterations: int) -> np.ndarray:
  """The reference's glass blur on one float image: its loop as written (numpy views make its
  tuple "swap" a copy of the neighbour)."""
  x = np.uint8(ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest") * 255)
  h, w = x.shape[:2]
  for _ in range(iterations):
    for r in range(h - delta, delta, -1):
      for c in range(w - delta, delta, -1):
        dx, dy = rng.integers(-delta, delta, size=(2,))
        rp, cp = r + dy, c + dx
        x[r, c], x[rp, cp] = x[rp, cp], x[r, c]
  return ndimage.gaussian_filter(x / 255.0, (sigma, sigma, 0), mode="nearest")


@_per_image
def _glass_blur(x, rng):
  return glass_reference(x, rng, *_c(noise_blur.GLASS_BLUR))


@_per_image
def _defocus_blur(x, rng):
  del rng
  radius, alias = _c(noise_blur.DEFOCUS_BLUR)
  kernel = ops.disk_kernel(radius, alias)  # cv2.filter2D per channel, mirrored borders
  return np.stack([ndimage.correlate(x[..., c], kernel, mode="mirror") for c in range(3)], -1)


def _line_kernel_sum(x, radius, sigma, angle):
  """ImageMagick's motion blur as the reference calls it: a one-sided gaussian line of taps."""
  width = 2 * radius + 1
  k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  h, w = x.shape[:2]
  out = np.zeros_like(x)
  for i in range(width):
    dy = math.ceil(i * math.sin(math.radians(angle)) - 0.5)
    dx = math.ceil(i * math.cos(math.radians(angle)) - 0.5)
    out += k[i] * x[np.clip(np.arange(h) + dy, 0, h - 1)][:, np.clip(np.arange(w) + dx, 0, w - 1)]
  return out


@_per_image
def _motion_blur(x, rng):
  radius, sigma = _c(noise_blur.MOTION_BLUR)
  return _line_kernel_sum(x, radius, sigma, rng.uniform(-45, 45))


def _clipped_zoom(x, factor):
  h = x.shape[0]
  ch = math.ceil(h / factor)
  top = (h - ch) // 2
  zoomed = ndimage.zoom(x[top:top + ch, top:top + ch], (factor, factor) + (1,) * (x.ndim - 2),
                        order=1)
  trim = (zoomed.shape[0] - h) // 2
  return zoomed[trim:trim + h, trim:trim + h]


@_per_image
def _zoom_blur(x, rng):
  del rng
  out = np.zeros_like(x)
  factors = noise_blur.zoom_factors(SEVERITY)
  for f in factors:
    out += _clipped_zoom(x, f)
  return (x + out) / (len(factors) + 1)


@_per_image
def _snow(x, rng):
  loc, scale, zoom, threshold, radius, sigma, blend = _c(weather.SNOW)
  layer = rng.normal(size=x.shape[:2], loc=loc, scale=scale)
  layer = _clipped_zoom(layer[..., None], zoom)
  layer[layer < threshold] = 0
  layer = np.clip(layer, 0, 1)
  layer = _line_kernel_sum(layer, radius, sigma, rng.uniform(-135, -45))
  layer = np.round(layer * 255) / 255  # the reference round-trips the layer through a PNG
  gray = skimage.color.rgb2gray(x)[..., None]
  x = blend * x + (1 - blend) * np.maximum(x, gray * 1.5 + 0.5)
  return x + layer + np.rot90(layer, k=2)


@functools.cache
def _frost_picture() -> bytes:
  """A stored frost picture (JPEG, 512 x 512) standing in for the reference's photographs;
  made once from the procedural texture."""
  texture = jax.jit(weather.frost_texture, static_argnums=(1, 2))(jax.random.key(0), 512, 512)
  buf = io.BytesIO()
  Image.fromarray(pixels.to_uint8(np.asarray(texture))).save(buf, "JPEG", quality=90)
  return buf.getvalue()


@_per_image
def _frost(x, rng):
  c_img, c_frost = _c(weather.FROST)
  with Image.open(io.BytesIO(_frost_picture())) as im:  # the reference reads a file each call
    frost = np.asarray(im.convert("RGB"))
  top, left = rng.integers(0, frost.shape[0] - SIZE), rng.integers(0, frost.shape[1] - SIZE)
  return c_img * x + c_frost * pixels.to_float(frost[top:top + SIZE, left:left + SIZE])


def plasma_fractal(rng: np.random.Generator, mapsize: int = 256, wibbledecay: float = 3.0):
  """The reference's diamond-square height map, as written there."""
  maparray = np.empty((mapsize, mapsize), dtype=np.float64)
  maparray[0, 0] = 0
  stepsize = mapsize
  wibble = 100.0

  def wibbledmean(array):
    return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

  def fillsquares():
    cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
    squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
    squareaccum += np.roll(squareaccum, shift=-1, axis=1)
    maparray[stepsize // 2:mapsize:stepsize,
             stepsize // 2:mapsize:stepsize] = wibbledmean(squareaccum)

  def filldiamonds():
    size = maparray.shape[0]
    drgrid = maparray[stepsize // 2:size:stepsize, stepsize // 2:size:stepsize]
    ulgrid = maparray[0:size:stepsize, 0:size:stepsize]
    ldrsum = drgrid + np.roll(drgrid, 1, axis=0)
    lulsum = ulgrid + np.roll(ulgrid, -1, axis=1)
    ltsum = ldrsum + lulsum
    maparray[0:size:stepsize, stepsize // 2:size:stepsize] = wibbledmean(ltsum)
    tdrsum = drgrid + np.roll(drgrid, 1, axis=1)
    tulsum = ulgrid + np.roll(ulgrid, -1, axis=0)
    ttsum = tdrsum + tulsum
    maparray[stepsize // 2:size:stepsize, 0:size:stepsize] = wibbledmean(ttsum)

  while stepsize >= 2:
    fillsquares()
    filldiamonds()
    stepsize //= 2
    wibble /= wibbledecay
  maparray -= maparray.min()
  return maparray / maparray.max()


@_per_image
def _fog(x, rng):
  strength, decay = _c(weather.FOG)
  max_val = x.max()
  fractal = plasma_fractal(rng, 256, decay)[:SIZE, :SIZE][..., None]
  return (x + strength * fractal) * max_val / (max_val + strength)


@_per_image
def _spatter(x, rng):
  """The water branch (severities 1-3) with skimage / SciPy for OpenCV's Canny, distance
  transform, histogram equalisation, emboss filter and box blurs."""
  loc, scale, sigma, threshold, strength, _ = _c(weather.SPATTER)
  liquid = ndimage.gaussian_filter(rng.normal(size=x.shape[:2], loc=loc, scale=scale), sigma,
                                   mode="nearest")
  liquid[liquid < threshold] = 0
  edges = skimage.feature.canny(np.uint8(liquid * 255).astype(float), low_threshold=50,
                                 high_threshold=150)
  dist = np.minimum(ndimage.distance_transform_edt(~edges), 20)
  dist = np.floor(ndimage.uniform_filter(dist, 3, mode="mirror"))
  dist = np.round(skimage.exposure.equalize_hist(dist.astype(np.uint8)) * 255)
  emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float64)
  dist = np.clip(np.round(ndimage.correlate(dist, emboss, mode="mirror")), 0, 255)
  dist = ndimage.uniform_filter(dist, 3, mode="mirror")
  m = liquid * dist
  m = m / max(m.max(), 1e-12) * strength
  return x + m[..., None] * np.asarray(weather.WATER_RGB)


@_per_image
def _brightness(x, rng):
  del rng
  hsv = skimage.color.rgb2hsv(x)
  hsv[..., 2] = np.clip(hsv[..., 2] + _c(digital.BRIGHTNESS), 0, 1)
  return skimage.color.hsv2rgb(hsv)


@_per_image
def _contrast(x, rng):
  del rng
  means = x.mean(axis=(0, 1), keepdims=True)
  return (x - means) * _c(digital.CONTRAST) + means


@_per_image
def _saturate(x, rng):
  del rng
  a, b = _c(digital.SATURATE)
  hsv = skimage.color.rgb2hsv(x)
  hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
  return skimage.color.hsv2rgb(hsv)


@_per_image
def _elastic_transform(x, rng):
  alpha = _c(digital.ELASTIC_ALPHA)
  sigma = digital.ELASTIC_SIGMA_FRACTION * SIZE
  amplitude = digital.ELASTIC_AMPLITUDE_FRACTION * SIZE
  dy, dx = (ndimage.gaussian_filter(rng.uniform(-amplitude, amplitude, x.shape[:2]), sigma,
                                    mode="reflect", truncate=3.0) * alpha for _ in range(2))
  yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
  coords = [yy + dy, xx + dx]
  return np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="reflect")
                   for c in range(3)], -1)


def _pixelate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  del rng
  c = _c(digital.PIXELATE)
  small = (int(SIZE * c), int(SIZE * c))
  return np.stack([np.asarray(Image.fromarray(im).resize(small, Image.BOX).resize(
      (SIZE, SIZE), Image.NEAREST)) for im in images])


def _jpeg_compression(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  del rng
  out = np.empty_like(images)
  for i, im in enumerate(images):
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="JPEG", quality=_c(digital.JPEG_QUALITY))
    with Image.open(buf) as decoded:
      out[i] = np.asarray(decoded.convert("RGB"))
  return out


HOST_REFERENCES = {
    "gaussian_noise": ("numpy", _gaussian_noise),
    "shot_noise": ("numpy poisson", _shot_noise),
    "impulse_noise": ("skimage random_noise", _impulse_noise),
    "speckle_noise": ("numpy", _speckle_noise),
    "defocus_blur": ("scipy correlate", _defocus_blur),
    "glass_blur": ("reference loop", _glass_blur),
    "motion_blur": ("numpy line taps", _motion_blur),
    "zoom_blur": ("scipy zoom", _zoom_blur),
    "gaussian_blur": ("scipy gaussian_filter", _gaussian_blur),
    "snow": ("numpy + scipy", _snow),
    "frost": ("PIL decode + crop", _frost),
    "fog": ("numpy plasma fractal", _fog),
    "spatter": ("skimage + scipy", _spatter),
    "brightness": ("skimage HSV", _brightness),
    "contrast": ("numpy", _contrast),
    "elastic_transform": ("scipy map_coordinates", _elastic_transform),
    "pixelate": ("PIL resize", _pixelate),
    "jpeg_compression": ("PIL JPEG", _jpeg_compression),
    "saturate": ("skimage HSV", _saturate),
}


PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def _images(batch: int, size: int) -> np.ndarray:
  """Random size x size crops of scikit-image's sample photographs (shipped with it, no
  download), each shrunk first so a crop shows a good part of the scene: the host references'
  speed depends on the content (JPEG's entropy coding, for one), so the batch is photographic."""
  import skimage.data  # deferred: reads the bundled files

  rng = np.random.default_rng(0)
  out = np.empty((batch, size, size, 3), np.uint8)
  for i in range(batch):
    photo = Image.fromarray(getattr(skimage.data, PHOTOGRAPHS[i % len(PHOTOGRAPHS)])())
    shrink = rng.uniform(1.0, 2.0) * size / min(photo.size)
    photo = photo.resize((max(size, round(photo.size[0] * shrink)),
                          max(size, round(photo.size[1] * shrink))), Image.BICUBIC)
    top = rng.integers(0, photo.size[1] - size + 1)
    left = rng.integers(0, photo.size[0] - size + 1)
    out[i] = np.asarray(photo.convert("RGB"))[top:top + size, left:left + size]
  return out


def corruption_rows(seconds: float, names=None, *, batch: int = BATCH, size: int = SIZE,
                    min_reps: int = 3) -> list[dict]:
  """One dict per corruption: JAX and host seconds (medians) and their per-round ratio."""
  if size != SIZE:
    raise ValueError(f"the host references are written for {SIZE} x {SIZE}")
  images = _images(batch, size)
  keys = jax.random.split(jax.random.key(0), batch)
  rng = np.random.default_rng(1)
  rows = []
  for name in names or imagenet_c.CORRUPTIONS:
    label, host_fn = HOST_REFERENCES[name]
    scale = 1
    host_images = images
    if name == "glass_blur":
      host_images, scale = images[:GLASS_HOST_IMAGES], batch / GLASS_HOST_IMAGES
      label += f" (timed on {GLASS_HOST_IMAGES} images, x{scale:g})"

    def jax_side(name=name):
      corruptions.corrupt_batch(images, name, keys, severity=SEVERITY)

    def host_side(host_fn=host_fn, host_images=host_images):
      host_fn(host_images, rng)

    timed = alternate({"jax": jax_side, "host": host_side}, seconds, min_reps=min_reps)
    host_times = [t * scale for t in timed.times["host"]]
    ratio = Ratio.of(j / h for j, h in zip(timed.times["jax"], host_times))
    rows.append({"name": name, "reference": label, "jax_s": timed.median("jax"),
                 "host_s": float(np.median(host_times)), "ratio": ratio})
    print(f"  {name}: {ratio.short()}", flush=True)
  return rows


def pipeline_row(seconds: float, *, batch: int = BATCH, size: int = SIZE,
                 min_reps: int = 3) -> dict:
  """The Robust-R1 pipeline over the batch in one call vs one call per image."""
  images = _images(batch, size)
  keys = jax.random.split(jax.random.key(2), batch)
  pipeline = corruptions.PIPELINE

  def batched():
    corruptions.corrupt_batch(images, pipeline, keys)

  def one_by_one():
    for i in range(batch):
      corruptions.corrupt(images[i], pipeline, keys[i])

  timed = alternate({"batch": batched, "single": one_by_one}, seconds, min_reps=min_reps)
  return {"batch_s": timed.median("batch"), "single_s": timed.median("single"),
          "ratio": timed.ratio("batch", "single")}


def run(*, seconds: float = 3.0, names=None) -> dict:
  """Prints the table; `seconds` is the wall time of each alternated measurement."""
  print(f"corrupt benchmark: {BATCH} images of {SIZE} x {SIZE}, severity {SEVERITY}, uint8 in and "
        f"out; JAX on {corruptions.data_device()} (default backend {jax.default_backend()}); "
        f"host CPUs: {usable_cpus()}; {seconds:g} s per alternated measurement", flush=True)
  print("JAX / host per corruption, median [quartiles] of the alternated rounds:", flush=True)
  rows = corruption_rows(seconds, names)
  print(table(("corruption", "host reference", f"JAX ms / {BATCH}", f"host ms / {BATCH}",
               "JAX / host: median [quartiles]"),
              [(r["name"], r["reference"], 1e3 * r["jax_s"], 1e3 * r["host_s"], r["ratio"].short())
               for r in rows]))
  medians = sorted(r["ratio"].median for r in rows)
  overall = float(np.median(medians))
  worst = max(rows, key=lambda r: r["ratio"].median)
  slowest = worst["ratio"].median
  print(f"median corruption: JAX / host = {overall:.2f} "
        f"{goal(overall, GOAL_MEDIAN, at_most=True)}; "
        f"slowest {worst['name']} {slowest:.2f} {goal(slowest, GOAL_WORST, at_most=True)}",
        flush=True)
  pipe = pipeline_row(seconds)
  print(f"robust_r1_pipeline, {BATCH} images of {SIZE} x {SIZE}: one batched call "
        f"{1e3 * pipe['batch_s']:.0f} ms, one call per image {1e3 * pipe['single_s']:.0f} ms; "
        f"batch / one by one = {pipe['ratio']}", flush=True)
  return {"rows": rows, "median_ratio": overall, "worst": (worst["name"], worst["ratio"].median),
          "pipeline": pipe}
