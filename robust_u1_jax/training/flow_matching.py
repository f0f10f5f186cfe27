"""Flow-matching objective of the generation path, stage I
(docs/design.md#flow-matching-and-guidance).

`x_t = (1 - t) x0 + t eps`, target velocity `eps - x0`, MSE of `llm2vae(h)` on the noisy latent
tokens; training t = shift(sigmoid(N(0, 1))). Clean conditioning latents enter with t = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from robust_u1_jax import sampling
from robust_u1_jax.inference import context as context_lib
from robust_u1_jax.models import bagel as bagel_lib

Array = jax.Array


def train_timesteps(key: Array, shape: tuple[int, ...], shift: float) -> Array:
  """Logit-normal t in (0, 1), then the schedule shift."""
  return sampling.shift_timesteps(jax.nn.sigmoid(jax.random.normal(key, shape)), shift)


def noisy_token_mask(inputs: bagel_lib.SequenceInputs) -> Array:
  """(B, Nl) True where a latent token belongs to a noisy (generation target) block."""
  noisy = jnp.take_along_axis(inputs.layout.noisy, inputs.latent_seq_index, axis=1)
  real = jnp.take_along_axis(inputs.token_kind, inputs.latent_seq_index, axis=1) == bagel_lib.LATENT
  return noisy & real


def flow_matching_loss(model: bagel_lib.Bagel, inputs: bagel_lib.SequenceInputs,
                       images_bkhwc: Array, key: Array, shift: float, posterior: str = "sample"
                       ) -> tuple[Array, dict[str, Array]]:
  """Mean squared velocity error over the noisy latent tokens of the batch."""
  t_key, eps_key, vae_key = jax.random.split(key, 3)
  image_tokens = context_lib.encode_images(model, images_bkhwc,
                                           context_lib.posterior_key(posterior, vae_key))
  x0 = context_lib.gather_latents(image_tokens, inputs)
  noisy = noisy_token_mask(inputs)
  # One t per packed sample: the noisy tokens of one target image share it.
  sample_bn = jnp.take_along_axis(inputs.layout.sample_id, inputs.latent_seq_index, axis=1)
  t_bs = train_timesteps(t_key, inputs.layout.sample_id.shape, shift)
  t_bn = jnp.take_along_axis(t_bs, jnp.clip(sample_bn, 0, t_bs.shape[1] - 1), axis=1)
  t_bn = jnp.where(noisy, t_bn, 0.0)
  eps = jax.random.normal(eps_key, x0.shape, x0.dtype)
  x_t = (1.0 - t_bn[..., None]) * x0 + t_bn[..., None] * eps
  hidden = model(inputs, x_t, t_bn)
  v = model.velocity(hidden, inputs.latent_seq_index)
  err = jnp.mean((v - (eps - x0)) ** 2, axis=-1)
  count = jnp.maximum(noisy.sum(), 1)
  loss = jnp.sum(jnp.where(noisy, err, 0.0)) / count
  return loss, {"mse_loss": loss, "t_mean": jnp.sum(jnp.where(noisy, t_bn, 0.0)) / count}
