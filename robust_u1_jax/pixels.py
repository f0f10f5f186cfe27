"""The one pair of pixel-range conversions: 8-bit images <-> float images.

Images travel as uint8 everywhere on the data side (records, batches, packed rows, ViT patches:
a quarter of float32's bytes); they become float only where arithmetic needs them (inside the
jitted corruptions, inside the model). Every such crossing goes through these two functions, so
the rounding rule is written once:

  to_float(u8)                      uint8 [0, 255] -> float32 [0, 1]      (u8 / 255)
  to_float(u8, model_range=True)    uint8 [0, 255] -> float32 [-1, 1]     (the VAE's and ViT's
                                                                           input: BAGEL's mean
                                                                           0.5, std 0.5)
  to_uint8(x)                       float [0, 1]  -> uint8, clipped, rounded to nearest (half to
                                                      even), as a PNG on disk holds it
  to_uint8(x, model_range=True)     float [-1, 1] -> uint8, the same

Float input to `to_float` is taken to be in [0, 1] already (cast to float32, not clipped), so a
function can accept either kind. numpy in gives numpy out (host code stays off the accelerator);
anything else (jax arrays, tracers) goes through jax.numpy. See docs/design.md#the-data-path.
"""

import jax.numpy as jnp
import numpy as np


def _xp(images):
  return np if isinstance(images, (np.ndarray, np.generic)) else jnp


def to_float(images, *, model_range: bool = False):
  """uint8 [0, 255] (or float [0, 1]) -> float32 [0, 1], or [-1, 1] with model_range."""
  xp = _xp(images)
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8:
    x = images.astype(xp.float32) / xp.float32(255.0)
  elif np.issubdtype(dtype, np.floating):
    x = images.astype(xp.float32)
  else:
    raise ValueError(f"image dtype {dtype} is not supported: use uint8 or float in [0, 1]")
  # x / 127.5 - 1 and (x / 255) * 2 - 1 are the same float32 numbers (scaling by 2 is exact).
  return x * xp.float32(2.0) - xp.float32(1.0) if model_range else x


def to_uint8(x, *, model_range: bool = False):
  """float [0, 1] (or [-1, 1] with model_range) -> uint8: clipped, rounded to the nearest level."""
  xp = _xp(x)
  if model_range:
    x = (x + xp.float32(1.0)) * xp.float32(0.5)
  return xp.round(xp.clip(x, 0.0, 1.0) * xp.float32(255.0)).astype(xp.uint8)
