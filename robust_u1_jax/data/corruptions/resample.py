"""Resampling of images by the corruption families: warps, ImageNet-C's centre zoom, resizing.

Like `ops.py` (whose boundary-mode names these functions take), everything is a pure JAX function
on one H x W x C image, float32 in [0, 1], that callers can jit and vmap; output sizes are Python
numbers, sample positions may be traced.

Resizing reproduces Pillow's separable resampling (the same support, centre and normalisation
rules, computed here as static matrices), so box / bilinear / bicubic / nearest results match
`PIL.Image.resize` up to Pillow's 8-bit rounding.

Apart from `ops.py` because sampling an image at moved or rescaled positions is its own family
of primitives, used by the corruptions that move or rescale pixels (zoom blur, snow, pixelate,
elastic and atmospheric warps, text overlays, inpainting) and not by the filters and colour maps.
"""

from collections.abc import Callable
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax.data.corruptions import ops

_HIGHEST = jax.lax.Precision.HIGHEST


def _fold_index(i: jax.Array, n: int, mode: str) -> tuple[jax.Array, jax.Array]:
  """Maps integer sample indices outside 0..n-1 back inside; also returns a validity mask."""
  if mode == "nearest":
    return jnp.clip(i, 0, n - 1), jnp.ones(i.shape, bool)
  if mode == "wrap":
    return jnp.mod(i, n), jnp.ones(i.shape, bool)
  if mode == "constant":
    return jnp.clip(i, 0, n - 1), (i >= 0) & (i <= n - 1)
  if mode == "reflect":
    i = jnp.mod(i, 2 * n)
    return jnp.where(i < n, i, 2 * n - 1 - i), jnp.ones(i.shape, bool)
  if mode == "mirror":
    period = max(2 * n - 2, 1)
    i = jnp.mod(i, period)
    return jnp.where(i < n, i, period - i), jnp.ones(i.shape, bool)
  raise ValueError(f"boundary mode {mode!r} is not one of {sorted(ops.PAD_MODES)}")


def warp(x_hwc: jax.Array, coords_y: jax.Array, coords_x: jax.Array, *, order: int = 1,
         mode: str = "reflect", cval: float = 0.0) -> jax.Array:
  """Samples every channel at (coords_y, coords_x) (any equal shapes), like map_coordinates.

  order 0 (nearest) or 1 (bilinear); the boundary modes follow jax.scipy.ndimage.map_coordinates
  ('constant' is scipy's 'grid-constant'). Written as four gathers over all channels at once,
  which compiles much faster than map_coordinates per channel.
  """
  if order not in (0, 1):
    raise ValueError(f"warp order {order} is not 0 or 1")
  h, w = x_hwc.shape[:2]
  x = jnp.asarray(x_hwc, jnp.float32)
  cy = jnp.asarray(coords_y, jnp.float32)
  cx = jnp.asarray(coords_x, jnp.float32)
  if order == 0:
    # Nearest sample, ties rounded up.
    iy, vy = _fold_index(jnp.floor(cy + 0.5).astype(jnp.int32), h, mode)
    ix, vx = _fold_index(jnp.floor(cx + 0.5).astype(jnp.int32), w, mode)
    v = (vy & vx)
    out = x[iy, ix]
    return jnp.where(v.reshape(v.shape + (1,) * (x.ndim - 2)), out, cval)
  y0 = jnp.floor(cy)
  x0 = jnp.floor(cx)
  fy = cy - y0
  fx = cx - x0
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  out = 0.0
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    iy, vy = _fold_index(y0 + dy, h, mode)
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      ix, vx = _fold_index(x0 + dx, w, mode)
      weight = wy * wx
      sample = x[iy, ix]
      if mode == "constant":
        sample = jnp.where((vy & vx).reshape(weight.shape + (1,) * (x.ndim - 2)), sample, cval)
      out = out + weight.reshape(weight.shape + (1,) * (x.ndim - 2)) * sample
  return out


def affine_warp(x_hwc: jax.Array, matrix_2x2, offset_2, *,
                output_shape: tuple[int, int] | None = None, order: int = 1,
                mode: str = "reflect", cval: float = 0.0) -> jax.Array:
  """scipy.ndimage.affine_transform: output (y, x) samples the input at matrix @ (y, x) + offset."""
  h, w = output_shape or x_hwc.shape[:2]
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  m = jnp.asarray(matrix_2x2, jnp.float32)
  o = jnp.asarray(offset_2, jnp.float32)
  cy = m[0, 0] * yy + m[0, 1] * xx + o[0]
  cx = m[1, 0] * yy + m[1, 1] * xx + o[1]
  return warp(x_hwc, cy, cx, order=order, mode=mode, cval=cval)


def center_zoom_params(n: int, factor: float) -> tuple[float, float]:
  """(first sample position, step) of ImageNet-C's clipped zoom along an axis of n samples.

  The reference crops the centre ceil(n / f) samples, zooms them with scipy.ndimage.zoom(order=1)
  (corner-aligned grid, round(crop * f) outputs) and keeps the first n; output i therefore samples
  the input at top + i * step. Computed on the host in float64 so the integer crop matches.
  """
  crop = int(math.ceil(n / float(factor)))
  top = (n - crop) // 2
  out_len = max(int(round(crop * factor)), 1)
  step = (crop - 1) / (out_len - 1) if out_len > 1 else 0.0
  return float(top), float(step)


def _interp_axis(x: jax.Array, axis: int, top, step) -> jax.Array:
  n = x.shape[axis]
  pos = jnp.clip(top + jnp.arange(n, dtype=jnp.float32) * step, 0.0, n - 1.0)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, n - 1)
  shape = [1] * x.ndim
  shape[axis] = n
  frac = (pos - lo).reshape(shape)
  return jnp.take(x, lo, axis=axis) * (1.0 - frac) + jnp.take(x, hi, axis=axis) * frac


def center_zoom_with(x_hwc: jax.Array, params_y, params_x) -> jax.Array:
  """Bilinear centre zoom given (top, step) per axis (from `center_zoom_params`; may be traced)."""
  x = _interp_axis(x_hwc.astype(jnp.float32), 0, *params_y)
  return _interp_axis(x, 1, *params_x)


def center_zoom(x_hwc: jax.Array, factor: float) -> jax.Array:
  """ImageNet-C's clipped zoom: crop the centre ceil(H / f) x ceil(W / f), zoom it by f, keep H x W.

  Bilinear like scipy.ndimage.zoom(order=1) on the crop; `factor` is a static number >= 1.
  """
  return center_zoom_with(x_hwc, center_zoom_params(x_hwc.shape[0], factor),
                          center_zoom_params(x_hwc.shape[1], factor))


def _apply_axis_matrices(x_hwc: jax.Array, my: jax.Array, mx: jax.Array) -> jax.Array:
  x = x_hwc.astype(jnp.float32)
  if x.ndim == 2:
    return jnp.einsum("oh,hw,pw->op", my, x, mx, precision=_HIGHEST)
  return jnp.einsum("oh,hwc,pw->opc", my, x, mx, precision=_HIGHEST)


def _pil_filter(name: str) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
  if name == "box":
    return (lambda t: ((t > -0.5) & (t <= 0.5)).astype(np.float64)), 0.5
  if name == "bilinear":
    return (lambda t: np.maximum(1.0 - np.abs(t), 0.0)), 1.0
  if name == "bicubic":
    a = -0.5

    def cubic(t):
      t = np.abs(t)
      return np.where(t < 1.0, ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0,
                      np.where(t < 2.0, (((t - 5.0) * t + 8.0) * t - 4.0) * a, 0.0))

    return cubic, 2.0
  raise ValueError(
      f"resize method {name!r} is not one of ['bicubic', 'bilinear', 'box', 'nearest']")


@functools.lru_cache(maxsize=256)
def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """(out_size, in_size) matrix M with resized = M @ signal, as Pillow resamples one axis."""
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  if method == "nearest":
    # Pillow's NEAREST (ImagingScaleAffine) steps a double by `scale` from 0.5 * scale and
    # truncates; the repeated addition's rounding decides ties, so repeat it exactly.
    src = np.empty(out_size, int)
    pos = 0.5 * scale
    for i in range(out_size):
      src[i] = min(int(pos), in_size - 1)
      pos += scale
    m[np.arange(out_size), src] = 1.0
    return m.astype(np.float32)
  fn, support = _pil_filter(method)
  filterscale = max(scale, 1.0)
  support *= filterscale
  for i in range(out_size):
    centre = (i + 0.5) * scale
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), in_size)
    taps = fn((np.arange(lo, hi) - centre + 0.5) / filterscale)
    if taps.sum() != 0:
      taps = taps / taps.sum()
    m[i, lo:hi] = taps
  return m.astype(np.float32)


def resize(x_hwc: jax.Array, height: int, width: int, method: str = "bilinear") -> jax.Array:
  """Resizes to height x width like PIL.Image.resize (box, bilinear, bicubic or nearest)."""
  my = jnp.asarray(resize_matrix(x_hwc.shape[0], height, method))
  mx = jnp.asarray(resize_matrix(x_hwc.shape[1], width, method))
  return _apply_axis_matrices(x_hwc, my, mx)
