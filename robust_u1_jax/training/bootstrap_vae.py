"""Bootstrap, part 1: the Bagel's VAE trained as an autoencoder on the world's clean images.

BAGEL starts from FLUX's trained VAE and never trains it; the built-in world has no such VAE, so
this stage makes one with the same model code: L1 + L2 reconstruction of the decoded posterior
SAMPLE (so the decoder tolerates the latents BAGEL's posterior draws feed it) plus a small KL
term that keeps the posterior a proper Gaussian. Only `vae.*` trains; every later stage keeps it
frozen, as BAGEL keeps FLUX's.

The reconstruction is contrast-weighted: a pixel weighs 1 + contrast_weight x its distance from
its image's mean colour. The world's objects, saturated colours on muted backgrounds, are a few
percent of the pixels but all that its questions ask about; unweighted, a small autoencoder
spends its first thousands of steps on background texture and turns red and yellow objects into
the same orange blob (measured over two CPU minutes each: 24.7 dB and wrong hues unweighted,
26 dB and the right hues at weight 16).

FLUX normalises its latents with a scale and shift measured on its data; the saved model gets
its own the same way (`fit_latent_norm`): on validation images the posterior samples, the
latents BAGEL feeds its model (vae_posterior='sample'), are shifted and scaled to zero mean and
unit variance, the scale of the flow-matching noise.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import pixels
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.inference import images as images_lib
from robust_u1_jax.models import vae as vae_lib
from robust_u1_jax.training import run_setup
from robust_u1_jax.training.stage_spec import StageSpec
from robust_u1_jax.training.state import loss_step, merge_model

VAE_PARAMS = (r"^vae\.",)
GRID_IMAGES = 8  # validation images shown in the original | reconstruction grid
DATA_STAGE = "sft"  # with data.corruption='none': clean images, nothing else the step reads


def contrast_weights(x_bhwc: jax.Array, contrast_weight: float) -> jax.Array:
  """(B, H, W, 1) pixel weights 1 + contrast_weight x mean over channels of |x - the image's mean
  colour|, scaled to mean 1 over the batch (the loss keeps its scale whatever the weight)."""
  distance = jnp.abs(x_bhwc - jnp.mean(x_bhwc, axis=(1, 2), keepdims=True))
  w = 1.0 + contrast_weight * jnp.mean(distance, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(w / jnp.mean(w))


def autoencoder_loss(vae: vae_lib.AutoEncoder, images_bhwc: jax.Array, key: jax.Array, *,
                     l1_weight: float, l2_weight: float, kl_weight: float,
                     contrast_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Contrast-weighted reconstruction of the decoded posterior sample + KL(q(z|x) || N(0, 1)),
  both means per element."""
  x = images_lib.to_model_range(images_bhwc)
  mean, logvar = vae.latent_dist(x)
  logvar = jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0)  # as AutoEncoder.encode clamps
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
  error = vae.decoder(z) - x
  w = contrast_weights(x, contrast_weight)
  l1, l2 = jnp.mean(w * jnp.abs(error)), jnp.mean(w * error ** 2)
  kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
  loss = l1_weight * l1 + l2_weight * l2 + kl_weight * kl
  return loss, {"l1_loss": l1, "l2_loss": l2, "kl": kl,
                "posterior_std": jnp.mean(jnp.exp(0.5 * logvar))}


def make_step(graphdef: nnx.GraphDef, tx, *, ema_decay: float, weights: dict[str, float]):
  """step(state, images (B, H, W, 3) uint8) -> (state, metrics)."""

  def loss_fn(params, frozen, images, key):
    return autoencoder_loss(merge_model(graphdef, params, frozen).vae, images, key, **weights)

  return loss_step(loss_fn, tx, ema_decay)


def reconstruct(vae: vae_lib.AutoEncoder, images_bhwc: jax.Array, key: jax.Array | None = None
                ) -> jax.Array:
  """Images in [0, 1] decoded from the posterior mean (key None) or a posterior sample."""
  x = images_lib.to_model_range(images_bhwc)
  mean, logvar = vae.latent_dist(x)
  z = mean
  if key is not None:
    std = jnp.exp(0.5 * jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0))
    z = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
  return jnp.clip((vae.decoder(z) + 1.0) / 2.0, 0.0, 1.0)


def psnr(reconstructed: jax.Array, images_bhwc: jax.Array) -> jax.Array:
  """Per-image PSNR in dB of [0, 1] reconstructions against uint8 (or [0, 1]) originals."""
  reference = pixels.to_float(images_bhwc)
  mse = jnp.mean((reconstructed.astype(jnp.float32) - reference) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def reconstruction_psnr(vae: vae_lib.AutoEncoder, images_bhwc) -> float:
  """Mean PSNR of posterior-mean reconstructions (for comparing VAEs, e.g. against untrained)."""
  images = jnp.asarray(images_bhwc)
  return float(jnp.mean(psnr(reconstruct(vae, images), images)))


def validation_images(config, tokenizer) -> np.ndarray:
  """The first eval_data.batch_size clean validation images (one batch of the eval pipeline)."""
  data = pipeline_lib.make_pipeline(config.eval_data, seed=config.seed, tokenizer=tokenizer,
                                    stage=DATA_STAGE)
  images = next(data)["clean"]
  data.close()
  return images


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(graphdef, params, frozen, images, key):
  vae = nnx.merge(graphdef, params, frozen).vae
  from_mean, from_sample = reconstruct(vae, images), reconstruct(vae, images, key)
  mean, logvar = vae.latent_dist(images_lib.to_model_range(images))
  return (from_mean, from_sample, psnr(from_mean, images), psnr(from_sample, images),
          jnp.std(mean), jnp.mean(jnp.exp(0.5 * logvar)))


def make_eval(ctx) -> Callable:
  """evaluate(graphdef, state) -> ({image, decoded mean, decoded sample} columns, metrics):
  PSNR on eval_data.batch_size validation images, the same ones at every evaluation."""
  c = ctx.config
  images = validation_images(c, ctx.tokenizer)
  key = jax.random.PRNGKey(c.seed)

  def evaluate(graphdef, state):
    params = state.ema if state.ema is not None else state.params
    from_mean, from_sample, psnr_mean, psnr_sample, latent_std, posterior_std = jax.device_get(
        _evaluate(graphdef, params, state.frozen, jnp.asarray(images), key))
    n = min(GRID_IMAGES, len(images))
    columns = {"image": list(images[:n]), "decoded mean": list(from_mean[:n]),
               "decoded sample": list(from_sample[:n])}
    return columns, {"eval_psnr": float(np.mean(psnr_mean)),
                     "eval_psnr_sample": float(np.mean(psnr_sample)),
                     "eval_latent_std": float(latent_std),
                     "eval_posterior_std": float(posterior_std)}

  return evaluate


def fit_latent_norm(vae: vae_lib.AutoEncoder, images_bhwc: np.ndarray, key: jax.Array
                    ) -> vae_lib.VAEConfig:
  """The VAE config with FLUX's `shift_factor` / `scale_factor` measured on these images: the
  normalised posterior samples have zero mean and unit standard deviation over all elements."""

  def sample(v, x):
    mean, logvar = v.latent_dist(images_lib.to_model_range(x))
    std = jnp.exp(0.5 * jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0))
    return mean + std * jax.random.normal(key, mean.shape, jnp.float32)

  z = np.asarray(jax.device_get(nnx.jit(sample)(vae, jnp.asarray(images_bhwc))), np.float64)
  shift, std = float(z.mean()), float(z.std())
  return dataclasses.replace(vae.config, shift_factor=shift, scale_factor=1.0 / max(std, 1e-6))


def make_save(ctx) -> Callable:
  """save(workdir, graphdef, state, config): the trainer's model directory, with the VAE's
  latent normalisation fitted on the validation images first."""
  def save(workdir, graphdef, state, config):
    params = state.ema if state.ema is not None else state.params
    model = merge_model(graphdef, params, state.frozen)
    vae_config = fit_latent_norm(model.vae, validation_images(config, ctx.tokenizer),
                                 jax.random.PRNGKey(config.seed))
    print(f"VAE latent normalisation: shift_factor={vae_config.shift_factor:.4f}, "
          f"scale_factor={vae_config.scale_factor:.4f}", flush=True)
    # Static attributes: only this instance's config changes, which is what save_orbax writes.
    model.config = dataclasses.replace(model.config, vae=vae_config)
    model.vae.config = vae_config
    run_setup.write_model(model, workdir, config, recovers=False)  # an autoencoder: no recovery

  return save


def build(ctx):
  """The autoencoder stage for `trainer.train`."""
  c = ctx.config
  a = c.autoencoder
  weights = {"l1_weight": a.l1_weight, "l2_weight": a.l2_weight, "kl_weight": a.kl_weight,
             "contrast_weight": a.contrast_weight}

  def host_inputs(batch, rng):
    del rng  # the posterior noise comes from the train state's key
    return batch["clean"]

  return StageSpec(
      trainable=VAE_PARAMS, host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, tx, ema_decay=c.optimizer.ema_decay,
                                               weights=weights),
      samples_per_step=c.data.batch_size, evaluate=make_eval(ctx), save=make_save(ctx),
      data_stage=DATA_STAGE)
