"""Image primitives shared by the corruption families (ImageNet-C, Robust-R1).

Everything here is a pure JAX function on one H x W x C image (`x_hwc`, float32 in [0, 1] unless
stated), so callers can `jax.jit` it and `jax.vmap` it over a batch. Parameters that set array
shapes (kernel radii, output sizes) must be Python numbers; parameters that only enter arithmetic
(a gaussian sigma with an explicit radius, a motion-blur angle, a zoom centre) may be traced.

Boundary modes use scipy.ndimage names throughout: 'reflect' (d c b a | a b c d | d c b a),
'mirror' (d c b | a b c d | c b a, OpenCV's BORDER_REFLECT_101), 'nearest' (edge replication),
'wrap' and 'constant' (zeros).

Warps, ImageNet-C's centre zoom and Pillow's resizing are in `resample.py`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import pixels

# ImageNet-C parameters were tuned for 224 x 224 crops; size-dependent parameters scale with
# min(H, W) / REFERENCE_SIZE (see `size_scale`).
REFERENCE_SIZE = 224

# scipy.ndimage's boundary modes -> numpy's pad modes; resample.py takes the same modes.
PAD_MODES = {"reflect": "symmetric", "mirror": "reflect", "nearest": "edge", "wrap": "wrap",
             "constant": "constant"}
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------- dtypes

def to_float(image) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] image -> float32 [0, 1] (floats are not clipped)."""
  return pixels.to_float(jnp.asarray(image))


def from_float(x: jax.Array, dtype) -> jax.Array:
  """float [0, 1] -> `dtype`: uint8 rounds to the nearest level, floats are clipped to [0, 1]."""
  if jnp.dtype(dtype) == jnp.uint8:
    return pixels.to_uint8(jnp.asarray(x))
  return clip01(x).astype(dtype)


def clip01(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 1.0)


def quantize_uint8(x: jax.Array) -> jax.Array:
  """Rounds a float [0, 1] image to the 256 levels an 8-bit image can hold (stays float)."""
  return pixels.to_float(pixels.to_uint8(x))


# ------------------------------------------------------------------------------ random draws
# JAX's partitionable threefry (the default) costs more per number the higher the rank of the
# drawn shape (2.5x for H x W x 3 against the same count drawn flat, on a CPU), so image-sized
# draws are made flat and reshaped.

def normal(key, shape) -> jax.Array:
  return jax.random.normal(key, (math.prod(shape),)).reshape(shape)


def uniform(key, shape, minval=0.0, maxval=1.0) -> jax.Array:
  return jax.random.uniform(key, (math.prod(shape),), minval=minval, maxval=maxval).reshape(shape)


def bits16(key, shape) -> jax.Array:
  """Random 16-bit words (as int32), two from every 32-bit draw: half the random-number work
  where 16 bits of resolution are plenty (per-pixel coin flips)."""
  n = math.prod(shape)
  words = jax.random.bits(key, ((n + 1) // 2,), jnp.uint32)
  halves = jnp.concatenate([words >> 16, words & 0xFFFF])[:n]
  return halves.astype(jnp.int32).reshape(shape)


def by_level(severity, branches, *args):
  """branches[severity - 1](*args): a Python call for a concrete severity (the branch's constants
  then fold into the program), `lax.switch` for a traced one (only the chosen branch runs,
  except under vmap with one severity per image)."""
  if isinstance(severity, (int, np.integer)) and not isinstance(severity, bool):
    return branches[min(max(int(severity), 1), len(branches)) - 1](*args)
  index = jnp.clip(jnp.asarray(severity, jnp.int32) - 1, 0, len(branches) - 1)
  return jax.lax.switch(index, branches, *args)


def size_scale(height: int, width: int, reference_size: int | None = REFERENCE_SIZE) -> float:
  """Factor by which a pixel-size parameter tuned at `reference_size` scales to this image.

  min(H, W) / reference_size: ImageNet crops are taken at the short side, so a 448 x 600 image
  needs twice the blur radius of a 224 x 224 crop to look the same. None disables scaling (1.0).
  """
  if reference_size is None:
    return 1.0
  return min(height, width) / float(reference_size)


# ------------------------------------------------------------------------------ convolution

def pad(x_hwc: jax.Array, pad_y: int | tuple[int, int], pad_x: int | tuple[int, int],
        mode: str = "reflect") -> jax.Array:
  """Pads the two spatial axes with a scipy.ndimage boundary mode."""
  if mode not in PAD_MODES:
    raise ValueError(f"boundary mode {mode!r} is not one of {sorted(PAD_MODES)}")
  py = (pad_y, pad_y) if isinstance(pad_y, int) else tuple(pad_y)
  px = (pad_x, pad_x) if isinstance(pad_x, int) else tuple(pad_x)
  widths = (py, px) + ((0, 0),) * (x_hwc.ndim - 2)
  np_mode = PAD_MODES[mode]
  # numpy's 'reflect'/'symmetric' need the pad to be smaller than the axis; tile for big pads.
  too_big = max(py) >= x_hwc.shape[0] or max(px) >= x_hwc.shape[1]
  if np_mode in ("reflect", "symmetric") and too_big:
    return _pad_by_index(x_hwc, py, px, mode)
  return jnp.pad(x_hwc, widths, mode=np_mode)


def _reflect_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
  if mode == "reflect":
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i < n, i, period - 1 - i)
  period = max(2 * n - 2, 1)  # mirror
  i = np.mod(i, period)
  return np.where(i < n, i, period - i)


def _pad_by_index(x_hwc, py, px, mode):
  iy = _reflect_index(np.arange(-py[0], x_hwc.shape[0] + py[1]), x_hwc.shape[0], mode)
  ix = _reflect_index(np.arange(-px[0], x_hwc.shape[1] + px[1]), x_hwc.shape[1], mode)
  return x_hwc[iy][:, ix]


def conv2d(x_hwc: jax.Array, kernel_kk, mode: str = "reflect") -> jax.Array:
  """Same-size depthwise correlation of every channel with one 2-D kernel (cv2.filter2D's sense).

  The kernel centre is (kh // 2, kw // 2); the image is padded with `mode`, so the output keeps
  H x W. Kernel values may be traced; its shape must be static.
  """
  kernel_kk = jnp.asarray(kernel_kk, jnp.float32)
  kh, kw = kernel_kk.shape
  squeeze = x_hwc.ndim == 2
  if squeeze:
    x_hwc = x_hwc[..., None]
  c = x_hwc.shape[-1]
  xp = pad(x_hwc, (kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2), mode)
  if min(kh, kw) == 1 and max(kh, kw) <= 129 or kh * kw <= 9:
    # Line and tiny kernels: a fused sum of shifted slices runs ~30x faster on CPU than XLA's
    # grouped convolution and compiles quickly.
    h, w = x_hwc.shape[:2]
    y = sum(kernel_kk[i, j] * xp[i:i + h, j:j + w].astype(jnp.float32)
            for i in range(kh) for j in range(kw))
    return y[..., 0] if squeeze else y
  kernel_hwio = jnp.broadcast_to(kernel_kk[:, :, None, None], (kh, kw, 1, c))
  y = jax.lax.conv_general_dilated(
      xp[None].astype(jnp.float32), kernel_hwio, window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c, precision=_HIGHEST)[0]
  return y[..., 0] if squeeze else y


def conv2d_fft(x_hwc: jax.Array, kernels_nkk: np.ndarray, index=0,
               mode: str = "reflect") -> jax.Array:
  """`conv2d(x, kernels_nkk[index], mode)` computed through FFTs, for big 2-D kernels.

  A direct K x K correlation costs K^2 multiply-adds per value (XLA's CPU grouped convolution
  makes that slower still); the FFT's cost does not grow with K. `kernels_nkk` (N, K, K) is a
  static numpy stack, transformed once when the program is traced; `index` may be traced (one
  program serves every kernel of the stack). Same result as conv2d up to float32 rounding.
  """
  kernels = np.asarray(kernels_nkk, np.float64)
  _, kh, kw = kernels.shape
  h, w = x_hwc.shape[:2]
  xp = pad(jnp.asarray(x_hwc, jnp.float32), (kh // 2, kh - 1 - kh // 2),
           (kw // 2, kw - 1 - kw // 2), mode)
  ph, pw = xp.shape[:2]  # h + kh - 1: the circular correlation below never wraps around
  spectra = np.conj(np.fft.rfft2(kernels, s=(ph, pw))).astype(np.complex64)
  spectrum = jnp.asarray(spectra)[jnp.clip(jnp.asarray(index, jnp.int32), 0, len(spectra) - 1)]
  rest = (None,) * (xp.ndim - 2)
  xf = jnp.fft.rfft2(xp, axes=(0, 1))
  # out[n] = sum_m k[m] xp[n + m]: the product with the kernel's conjugate spectrum.
  y = jnp.fft.irfft2(xf * spectrum[(...,) + rest], s=(ph, pw), axes=(0, 1))
  return y[:h, :w]


def separable_conv(x_hwc: jax.Array, kernel_y, kernel_x, mode: str = "reflect") -> jax.Array:
  """Correlation with the outer product kernel_y (rows) x kernel_x (columns), done as two passes."""
  ky = jnp.asarray(kernel_y, jnp.float32)
  kx = jnp.asarray(kernel_x, jnp.float32)
  x_hwc = conv2d(x_hwc, ky[:, None], mode)
  return conv2d(x_hwc, kx[None, :], mode)


def gaussian_kernel1d(sigma, radius: int | None = None, truncate: float = 4.0) -> jax.Array:
  """Normalised gaussian taps at offsets -radius..radius, equal to scipy.ndimage's kernel.

  scipy keeps int(truncate * sigma + 0.5) taps each side. With `radius=None`, sigma must be a
  Python number and that is the radius. With an explicit (static) radius, sigma may be traced:
  taps beyond scipy's radius are zeroed, so a radius sized for the largest sigma in use gives
  scipy's result for every smaller one.
  """
  if radius is None:
    radius = int(truncate * float(sigma) + 0.5)
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6)
  taps = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  taps = jnp.where(jnp.abs(offsets) <= jnp.floor(truncate * sigma + 0.5), taps, 0.0)
  return taps / jnp.sum(taps)


def gaussian_radius(sigma_max: float, truncate: float = 4.0) -> int:
  """The static radius that covers every sigma <= sigma_max (scipy's rule)."""
  return int(truncate * float(sigma_max) + 0.5)


def gaussian_blur(x_hwc: jax.Array, sigma, *, mode: str = "reflect", truncate: float = 4.0,
                  radius: int | None = None) -> jax.Array:
  """Per-channel gaussian filter, equal to scipy.ndimage.gaussian_filter(sigma=(s, s, 0)).

  skimage.filters.gaussian (used by the ImageNet-C reference) is the same with mode='nearest'.
  """
  if radius is None and float(sigma) <= 0.0:
    return x_hwc
  k = gaussian_kernel1d(sigma, radius, truncate)
  return separable_conv(x_hwc, k, k, mode)


def box_blur(x_hwc: jax.Array, size: int, mode: str = "mirror") -> jax.Array:
  """size x size mean filter (cv2.blur's default border is 'mirror')."""
  k = jnp.full((size,), 1.0 / size, jnp.float32)
  return separable_conv(x_hwc, k, k, mode)


def disk_kernel(radius: float, alias_blur: float = 0.1, supersample: int = 8) -> np.ndarray:
  """Normalised defocus disk of (possibly fractional) `radius`, softened by a gaussian.

  Each tap is the fraction of its pixel covered by the disk (supersample^2 subsamples), not a
  0/1 test of the pixel centre, so radii scaled to small images (e.g. 3 * 64/224) still blur.
  The footprint is at least 17 x 17 like the ImageNet-C reference; `alias_blur` is the sigma of
  the anti-aliasing gaussian (3 x 3 up to radius 8, 5 x 5 above, as in the reference).
  """
  half = max(8, int(math.ceil(radius)))
  sub = (np.arange(supersample) + 0.5) / supersample - 0.5
  centres = np.arange(-half, half + 1, dtype=np.float64)
  fine = (centres[:, None] + sub[None, :]).reshape(-1)
  inside = (fine[:, None] ** 2 + fine[None, :] ** 2) <= radius ** 2
  n = 2 * half + 1
  disk = inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))
  if disk.sum() == 0:
    disk[half, half] = 1.0
  disk /= disk.sum()
  if alias_blur > 0:
    ksize = 3 if radius <= 8 else 5
    r = ksize // 2
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / alias_blur) ** 2)
    g /= g.sum()
    padded = np.pad(disk, r)  # the disk is zero at its border, so zero padding is exact enough
    disk = sum(g[i] * g[j] * padded[i:i + n, j:j + n] for i in range(ksize) for j in range(ksize))
  return (disk / disk.sum()).astype(np.float32)


# ------------------------------------------------------------------------------ motion blur

def motion_offsets(radius: int, sigma, angle_deg, active_radius=None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Taps of a one-sided gaussian line kernel (ImageNet-C / ImageMagick motion blur).

  Returns integer offsets (dy, dx) and weights, each of length 2 * radius + 1: tap i samples the
  pixel i steps along the direction (sin a, cos a), rounded to the grid, with weight
  exp(-i^2 / (2 sigma^2)) normalised. `radius` is static; `sigma`, `angle_deg` and
  `active_radius` (<= radius: only taps i <= 2 * active_radius count, so one static size serves
  several radii) may be traced.
  """
  width = 2 * radius + 1
  i = jnp.arange(width, dtype=jnp.float32)
  theta = jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32))
  # ceil(v - 0.5) is the reference's rounding (ties go down).
  dy = jnp.ceil(i * jnp.sin(theta) - 0.5).astype(jnp.int32)
  dx = jnp.ceil(i * jnp.cos(theta) - 0.5).astype(jnp.int32)
  w = jnp.exp(-(i ** 2) / (2.0 * jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6) ** 2))
  if active_radius is not None:
    w = jnp.where(i <= 2 * jnp.asarray(active_radius, jnp.float32), w, 0.0)
  return dy, dx, w / jnp.sum(w)


def sample_shifted(x_hwc: jax.Array, dy, dx) -> jax.Array:
  """out[y, x] = x_hwc[clip(y + dy), clip(x + dx)]: an integer shift with edge replication."""
  x_hwc = jnp.asarray(x_hwc)
  h, w = x_hwc.shape[:2]
  iy = jnp.clip(jnp.arange(h) + dy, 0, h - 1)
  ix = jnp.clip(jnp.arange(w) + dx, 0, w - 1)
  return x_hwc[iy][:, ix]


MAX_UNROLLED_TAPS = 128


def line_filter(x_hwc: jax.Array, dy: jax.Array, dx: jax.Array, weights: jax.Array,
                max_shift: int | None = None) -> jax.Array:
  """sum_i weights[i] * sample_shifted(x, dy[i], dx[i]) for traced offsets (a sparse conv).

  With a static bound `max_shift` >= every |dy|, |dx|, the image is edge-padded once and each
  tap is a dynamic slice of it, unrolled: XLA fuses all taps into one pass over the image
  (several times faster on CPU than a loop of gathers). Without it, or with more than
  MAX_UNROLLED_TAPS taps (the program would grow too large to compile quickly), taps run in a
  loop.
  """
  x_hwc = jnp.asarray(x_hwc, jnp.float32)
  if max_shift is not None and int(weights.shape[0]) <= MAX_UNROLLED_TAPS:
    h, w = x_hwc.shape[:2]
    p = int(max_shift)
    rest = x_hwc.shape[2:]
    padded = jnp.pad(x_hwc, ((p, p), (p, p)) + ((0, 0),) * len(rest), mode="edge")
    zeros = (0,) * len(rest)
    out = 0.0
    for i in range(int(weights.shape[0])):
      tap = jax.lax.dynamic_slice(padded, (p + dy[i], p + dx[i]) + zeros, (h, w) + rest)
      out = out + weights[i] * tap
    return out

  def body(acc, tap):
    ty, tx, tw = tap
    return acc + tw * sample_shifted(x_hwc, ty, tx), None

  out, _ = jax.lax.scan(body, jnp.zeros_like(x_hwc, jnp.float32), (dy, dx, weights))
  return out


def motion_blur(x_hwc: jax.Array, radius: int, sigma, angle_deg, active_radius=None) -> jax.Array:
  """Linear motion blur: the line kernel of `motion_offsets` applied with edge replication."""
  # Tap i lies i pixels along the direction, i <= 2 * radius.
  return line_filter(x_hwc, *motion_offsets(radius, sigma, angle_deg, active_radius),
                     max_shift=2 * radius)


def motion_blur_kernel(radius: int, sigma, angle_deg) -> jax.Array:
  """The same line kernel as a dense (4r+1) x (4r+1) correlation kernel for `conv2d`."""
  dy, dx, w = motion_offsets(radius, sigma, angle_deg)
  size = 4 * radius + 1
  c = 2 * radius
  return jnp.zeros((size, size), jnp.float32).at[c + dy, c + dx].add(w)


# ------------------------------------------------------------------------------ colour

def rgb_to_gray(x_hwc: jax.Array) -> jax.Array:
  """ITU-R 601 luma (PIL 'L', cv2 RGB2GRAY): H x W x 3 -> H x W."""
  return x_hwc[..., 0] * 0.299 + x_hwc[..., 1] * 0.587 + x_hwc[..., 2] * 0.114


def rgb_to_hsv(x_hwc: jax.Array) -> jax.Array:
  """RGB [0, 1] -> HSV with hue in [0, 1), as skimage.color.rgb2hsv."""
  r, g, b = x_hwc[..., 0], x_hwc[..., 1], x_hwc[..., 2]
  v = jnp.max(x_hwc, axis=-1)
  delta = v - jnp.min(x_hwc, axis=-1)
  safe_v = jnp.where(v > 0, v, 1.0)
  s = jnp.where(v > 0, delta / safe_v, 0.0)
  safe_d = jnp.where(delta > 0, delta, 1.0)
  h = jnp.where(r == v, (g - b) / safe_d, 0.0)
  h = jnp.where(g == v, 2.0 + (b - r) / safe_d, h)
  h = jnp.where(b == v, 4.0 + (r - g) / safe_d, h)
  h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
  return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv_hwc: jax.Array) -> jax.Array:
  """HSV (hue in [0, 1)) -> RGB, as skimage.color.hsv2rgb."""
  h, s, v = hsv_hwc[..., 0], hsv_hwc[..., 1], hsv_hwc[..., 2]
  h6 = jnp.mod(h, 1.0) * 6.0
  i = jnp.floor(h6)
  f = h6 - i
  p = v * (1.0 - s)
  q = v * (1.0 - f * s)
  t = v * (1.0 - (1.0 - f) * s)
  i = i.astype(jnp.int32) % 6
  r = jnp.choose(i, [v, q, p, p, t, v], mode="clip")
  g = jnp.choose(i, [t, v, v, q, p, p], mode="clip")
  b = jnp.choose(i, [p, p, t, v, v, q], mode="clip")
  return jnp.stack([r, g, b], axis=-1)


def rgb_to_ycbcr(x_hwc: jax.Array) -> jax.Array:
  """JFIF full-range YCbCr, all in [0, 1] (chroma centred at 0.5) from RGB [0, 1]."""
  r, g, b = x_hwc[..., 0], x_hwc[..., 1], x_hwc[..., 2]
  y = 0.299 * r + 0.587 * g + 0.114 * b
  cb = -0.168735892 * r - 0.331264108 * g + 0.5 * b + 0.5
  cr = 0.5 * r - 0.418687589 * g - 0.081312411 * b + 0.5
  return jnp.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb(ycc_hwc: jax.Array) -> jax.Array:
  """Inverse of `rgb_to_ycbcr` (not clipped)."""
  y, cb, cr = ycc_hwc[..., 0], ycc_hwc[..., 1] - 0.5, ycc_hwc[..., 2] - 0.5
  r = y + 1.402 * cr
  g = y - 0.344136286 * cb - 0.714136286 * cr
  b = y + 1.772 * cb
  return jnp.stack([r, g, b], axis=-1)
