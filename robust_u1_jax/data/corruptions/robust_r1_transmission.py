"""Robust-R1 transmission-stage degradations: jpeg_compression, block_exchange, mean_shift,
scan_lines. All pure JAX (jit + vmap, traced intensity); contract in `robust_r1_common`.

Parameterisations (s = size scale of `robust_r1_common.scale`):
  jpeg_compression  JPEG round trip (`jpeg.jpeg_compress`, 4:2:0) at quality
                    max(5, int(100 - 95 I)); I = 0 is quality 100, close to but not exactly x.
  block_exchange    square blocks of min(32, 5 + 30 I) s px (>= 2 px); a fraction 0.3 I^2 of
                    them (at least one pair when I > 0) swapped in disjoint random pairs.
  mean_shift        mean-shift filtering (the reference's cv2.pyrMeanShiftFiltering): 5 mode
                    seeking steps in RGB with spatial radius 40 I s px (5 x 5 taps spread over
                    the window) and colour radius 40 I / 255; the window does not drift.
  scan_lines        a dark band every 20 / (I + 0.1) s rows (>= 2), max(5, 7 I) s rows wide
                    (>= 1, anti-aliased), darkened to 1% (ramped in over I in [0, 0.1]).
"""

import math

import jax
import jax.numpy as jnp

from robust_u1_jax.data.corruptions import jpeg, ops
from robust_u1_jax.data.corruptions import robust_r1_common as common

REFERENCE_SIZE = common.REFERENCE_SIZE

MIN_BLOCK = 2  # px
MEAN_SHIFT_TAPS = 5  # per axis
MEAN_SHIFT_STEPS = 5  # cv2's default termination (at most 5 iterations)
# Up to this many pixels the taps are stacked (25 copies of the image: 20 MB at 256 x 256).
MEAN_SHIFT_STACKED_PIXELS = 256 * 256


def jpeg_quality(intensity) -> jax.Array:
  """max(5, int(100 - 95 I)) as the reference computes it (the epsilon absorbs float32 error)."""
  i = jnp.asarray(intensity, jnp.float32)
  return jnp.maximum(5.0, jnp.floor(100.0 - 95.0 * i + 1e-4))


def jpeg_compression(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  del key, reference_size
  return jpeg.jpeg_compress(x_hwc, jpeg_quality(intensity))


def block_exchange(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  """Block size and count are traced: blocks are indexed on a grid of the largest possible count
  and a random ranking of the valid blocks pairs rank 2j with rank 2j + 1."""
  i = jnp.asarray(intensity, jnp.float32)
  h, w = x_hwc.shape[:2]
  s = common.scale(x_hwc, reference_size)
  block = jnp.maximum(MIN_BLOCK, jnp.round(jnp.minimum(32.0, 5.0 + 30.0 * i) * s)).astype(jnp.int32)
  rows, cols = h // block, w // block
  n_blocks = rows * cols
  n_max = (h // MIN_BLOCK) * (w // MIN_BLOCK)
  n_pairs = jnp.where(i > 0, jnp.maximum(1.0, jnp.ceil(0.3 * i * i * n_blocks / 2.0)), 0.0)
  n_pairs = jnp.minimum(n_pairs, n_blocks // 2).astype(jnp.int32)
  ids = jnp.arange(n_max)
  score = jnp.where(ids < n_blocks, jax.random.uniform(key, (n_max,)), 2.0)
  order = jnp.argsort(score)  # order[rank] = block id
  rank = jnp.zeros((n_max,), jnp.int32).at[order].set(jnp.arange(n_max, dtype=jnp.int32))
  partner = jnp.where(rank < 2 * n_pairs, order[rank ^ 1], ids)
  yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  by, bx = yy // block, xx // block
  inside = (by < rows) & (bx < cols)
  src = partner[jnp.where(inside, by * cols + bx, 0)]
  src_y = jnp.where(inside, (src // cols) * block + yy % block, yy)
  src_x = jnp.where(inside, (src % cols) * block + xx % block, xx)
  return x_hwc[src_y, src_x]


def mean_shift(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  del key
  i = jnp.asarray(intensity, jnp.float32)
  s = common.scale(x_hwc, reference_size)
  spatial = 40.0 * s * i
  colour2 = (40.0 * i / 255.0) ** 2
  half = MEAN_SHIFT_TAPS // 2
  grid = jnp.arange(-half, half + 1, dtype=jnp.float32) * (spatial / max(half, 1))
  dy = jnp.round(jnp.repeat(grid, MEAN_SHIFT_TAPS)).astype(jnp.int32)
  dx = jnp.round(jnp.tile(grid, MEAN_SHIFT_TAPS)).astype(jnp.int32)
  h, w, c = x_hwc.shape
  # Channel planes (C, H, W): the colour distance sums across channels, which XLA vectorises
  # across the pixels of a plane but not across the 3-wide minor axis of H x W x C.
  planes = jnp.moveaxis(x_hwc, -1, 0)
  # Pad once (edge replication) by the largest window and cut each neighbour out with a dynamic
  # slice, once (the window does not drift).
  pad = int(math.ceil(40.0 * s))
  padded = jnp.pad(planes, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
  neighbours = [jax.lax.dynamic_slice(padded, (0, pad + dy[t], pad + dx[t]), (c, h, w))
                for t in range(MEAN_SHIFT_TAPS ** 2)]

  if h * w <= MEAN_SHIFT_STACKED_PIXELS:
    # Taps on the minor axis: a step is reductions along contiguous memory, which XLA
    # vectorises (2x faster than the unrolled sum below), at 25 copies of the image.
    stack = jnp.stack(neighbours, axis=-1)  # (C, H, W, taps)

    def step(mode, _):
      diff = stack - mode[..., None]
      inside = sum(diff[k] ** 2 for k in range(c)) <= colour2 + 1e-12
      acc = jnp.sum(jnp.where(inside[None], stack, 0.0), axis=-1)
      total = jnp.sum(inside, axis=-1).astype(jnp.float32)
      # An empty colour window (possible once the mode has moved) keeps the current mode.
      return jnp.where(total > 0, acc / jnp.maximum(total, 1.0), mode), None
  else:
    # Big images: the taps unrolled into one fused pass per step, no copies.
    def step(mode, _):
      acc = jnp.zeros_like(mode)
      total = jnp.zeros_like(mode[0])
      for nb in neighbours:
        diff = nb - mode
        inside = (sum(diff[k] ** 2 for k in range(c)) <= colour2 + 1e-12).astype(jnp.float32)
        acc, total = acc + inside * nb, total + inside
      return jnp.where(total > 0, acc / jnp.maximum(total, 1.0), mode), None

  mode, _ = jax.lax.scan(step, planes, None, length=MEAN_SHIFT_STEPS)
  return ops.clip01(jnp.moveaxis(mode, 0, -1))


def scan_lines(x_hwc, key, intensity, *, reference_size=REFERENCE_SIZE):
  del key
  i = jnp.asarray(intensity, jnp.float32)
  h = x_hwc.shape[0]
  s = common.scale(x_hwc, reference_size)
  period = jnp.maximum(2.0, 20.0 / (i + 0.1) * s)
  width = jnp.clip(jnp.maximum(5.0, 7.0 * i) * s, 1.0, period - 1.0)
  y = jnp.arange(h, dtype=jnp.float32)
  phase = jnp.mod(y, period)
  # Fraction of row [y, y + 1) inside the band starting at or before y, plus the next band.
  cover = jnp.clip(width - phase, 0.0, 1.0) + jnp.clip(phase + 1.0 - period, 0.0, 1.0)
  darkness = 0.99 * common.ramp(i, 0.0, 0.1) * jnp.clip(cover, 0.0, 1.0)
  return ops.clip01(x_hwc * (1.0 - darkness)[:, None, None])


TRANSMISSION = {
    "jpeg_compression": jpeg_compression,
    "block_exchange": block_exchange,
    "mean_shift": mean_shift,
    "scan_lines": scan_lines,
}
