"""The pixel-range pair (robust_u1_jax/pixels.py) and uint8 images all the way to the model: the
conversions equal the formulas they replace, and uint8 ViT patches give the model the values the
float patches gave it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_u1_jax import pixels
from robust_u1_jax.data import sequence as seq
from robust_u1_jax.models import bagel

LEVELS = np.arange(256, dtype=np.uint8).reshape(16, 16)
CFG = bagel.BagelConfig.tiny()
MK = seq.Markers(3, 4)


class PixelsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_to_float_is_the_old_formulas(self):
    x = jnp.asarray(LEVELS)
    unit = self.variant(pixels.to_float)(x)
    model = self.variant(lambda a: pixels.to_float(a, model_range=True))(x)
    chex.assert_type([unit, model], jnp.float32)
    # Bit for bit what jitted code computed before (corruptions, the VAE's input range).
    old_unit = self.variant(lambda a: a.astype(jnp.float32) / 255.0)(x)
    old_model = self.variant(lambda a: (a.astype(jnp.float32) / 255.0) * 2.0 - 1.0)(x)
    np.testing.assert_array_equal(unit, old_unit)
    np.testing.assert_array_equal(model, old_model)
    # XLA divides by 255 as a multiplication by 1/255, so the ViT input, which numpy made before
    # (u / 127.5 - 1), may differ from it by one float32 rounding step of the quotient, no more.
    np.testing.assert_allclose(model, LEVELS.astype(np.float32) / 127.5 - 1.0, rtol=0,
                               atol=np.finfo(np.float32).eps)
    np.testing.assert_array_equal(pixels.to_float(LEVELS, model_range=True),
                                  LEVELS.astype(np.float32) / 127.5 - 1.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_round_trips(self):
    x = jnp.asarray(LEVELS)
    back = self.variant(lambda a: pixels.to_uint8(pixels.to_float(a)))(x)
    signed = self.variant(lambda a: pixels.to_uint8(pixels.to_float(a, model_range=True),
                                                    model_range=True))(x)
    np.testing.assert_array_equal(back, LEVELS)
    np.testing.assert_array_equal(signed, LEVELS)


def test_to_uint8_clips_and_rounds_to_nearest():
  x = np.array([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 127.5 / 255, 1.0, 3.0], np.float32)
  np.testing.assert_array_equal(pixels.to_uint8(x), [0, 0, 0, 1, 128, 255, 255])
  np.testing.assert_array_equal(pixels.to_uint8(np.float32([-1.0, 0.0, 1.0]), model_range=True),
                                [0, 128, 255])


def test_array_kinds_and_dtypes():
  assert isinstance(pixels.to_float(LEVELS), np.ndarray)  # host code stays on the host
  assert isinstance(pixels.to_float(jnp.asarray(LEVELS)), jax.Array)
  assert pixels.to_uint8(np.zeros(3, np.float64)).dtype == np.uint8
  floats = np.linspace(0, 1, 5, dtype=np.float64)
  np.testing.assert_array_equal(pixels.to_float(floats), floats.astype(np.float32))
  with pytest.raises(ValueError, match="uint8 or float"):
    pixels.to_float(LEVELS.astype(np.int32))


def test_vit_rows_ship_uint8_and_the_model_sees_the_old_values(random_bagel):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
  blocks = [seq.Text([5, 6]), seq.Vit(seq.vit_input(image)), seq.Text([7])]
  old = [seq.Text([5, 6]), seq.Vit(image.astype(np.float32) / 127.5 - 1.0), seq.Text([7])]
  kw = dict(seq_len=16, max_vit=8, max_latent=0)
  rows = seq.build_rows([[blocks]], CFG, MK, **kw)
  rows_old = seq.build_rows([[old]], CFG, MK, **kw)
  assert rows.vit_patches.dtype == np.uint8 and rows_old.vit_patches.dtype == np.float32
  assert rows.vit_patches.nbytes * 4 == rows_old.vit_patches.nbytes
  real = rows.vit_segment_ids > 0
  np.testing.assert_array_equal(pixels.to_float(rows.vit_patches, model_range=True)[real],
                                rows_old.vit_patches[real])  # numpy: the same division
  model = random_bagel(CFG, seed=1)
  embed = jax.jit(lambda r: model.embed_sequence(r, None, None))
  # The same inputs up to the one-ulp rounding of the conversion (test above).
  np.testing.assert_allclose(embed(jax.tree.map(jnp.asarray, rows)),
                             embed(jax.tree.map(jnp.asarray, rows_old)), rtol=1e-5, atol=1e-5)
  # A batch mixing a float image with uint8 ones goes as floats, each in [-1, 1].
  mixed = seq.build_rows([[blocks], [old]], CFG, MK, **kw)
  assert mixed.vit_patches.dtype == np.float32
  np.testing.assert_allclose(mixed.vit_patches[0], mixed.vit_patches[1], atol=1e-6)


def test_vit_input_refuses_floats():
  with pytest.raises(TypeError, match="uint8"):
    seq.vit_input(np.zeros((14, 14, 3), np.float32))
