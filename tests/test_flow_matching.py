"""The SFT objective (training/flow_matching.py, training/sft.py): the noisy block's target is the
clean image and its condition the corrupted one; the loss is the velocity error against
d x_t / dt = eps - x0 on x_t = (1 - t) x0 + t eps, so a model that knows x0 scores 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax.data import sequence, shapes
from robust_u1_jax.inference import context as context_lib
from robust_u1_jax.models import bagel
from robust_u1_jax.training import flow_matching, sft


@pytest.fixture(scope="module")
def model():
  return bagel.Bagel(bagel.BagelConfig.tiny(), rngs=nnx.Rngs(0))


def _sft_batch(n=2):
  world = shapes.ShapesWorld("train")
  clean = np.stack([world[i]["image"] for i in range(n)])
  corrupted = np.stack([world[n + i]["image"] for i in range(n)])  # other scenes: told apart
  return {"clean": clean, "corrupted": corrupted,
          "instruction_ids": np.tile(np.arange(3, 9), (n, 1)),
          "instruction_lengths": np.full(n, 6)}


def _sft_inputs(model, batch):
  inputs, images = sft.sft_rows(batch, model.config, sequence.Markers(1, 2),
                                np.random.default_rng(0), (0.0, 0.0, 0.0))
  return jax.tree.map(jnp.asarray, inputs), jnp.asarray(images)


def test_the_noisy_block_is_the_clean_image_conditioned_on_the_corrupted_one(model):
  batch = _sft_batch()
  inputs, images = _sft_inputs(model, batch)
  x0 = context_lib.gather_latents(context_lib.encode_images(model, images), inputs)
  noisy = np.asarray(flow_matching.noisy_token_mask(inputs))
  real = np.asarray(jnp.take_along_axis(inputs.token_kind, inputs.latent_seq_index, axis=1)
                    == bagel.LATENT)
  encode = lambda name: np.asarray(context_lib.encode_images(model, batch[name][:, None]))
  clean, corrupted = encode("clean"), encode("corrupted")
  # Encoded in batches of another size: equal to rounding (1e-6 measured); the two scenes' latents
  # differ by about 1.
  for b in range(len(images)):
    np.testing.assert_allclose(np.asarray(x0[b])[noisy[b]], clean[b], atol=1e-5)
    np.testing.assert_allclose(np.asarray(x0[b])[real[b] & ~noisy[b]], corrupted[b], atol=1e-5)


class _KnowsX0:
  """The tiny Bagel, but its velocity at the noisy tokens is (x_t - x0) / t (exact when x_t lies
  on the straight path from x0 at t = 0), or `sign` times it."""

  def __init__(self, model, x0, sign=1.0):
    self.model, self.x0, self.sign = model, x0, sign

  def __getattr__(self, name):
    return getattr(self.model, name)

  def __call__(self, inputs, x_t, t_bn):
    return self.sign * (x_t - self.x0) / jnp.where(t_bn > 0, t_bn, 1.0)[..., None]

  def velocity(self, hidden, latent_seq_index):
    return hidden


def test_a_model_that_knows_the_clean_latents_scores_zero(model):
  inputs, images = _sft_inputs(model, _sft_batch())
  # The posterior mean, so the test's x0 is the loss's.
  x0 = context_lib.gather_latents(context_lib.encode_images(model, images), inputs)
  loss = lambda m: flow_matching.flow_matching_loss(m, inputs, images, jax.random.PRNGKey(0),
                                                    3.0, posterior="mean")
  exact, metrics = loss(_KnowsX0(model, x0))
  assert 0.0 < float(metrics["t_mean"]) < 1.0
  assert float(exact) < 1e-8, float(exact)
  # The opposite velocity errs by 2 (eps - x0): about 4 (1 + var(x0)) per element.
  assert float(loss(_KnowsX0(model, x0, sign=-1.0))[0]) > 1.0
