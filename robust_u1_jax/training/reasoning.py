"""Stage III, joint reasoning: cross-entropy on the answer of
`[corrupted image (VAE + ViT)] [question + options + instruction] [recovered image (VAE + ViT)]
[answer]`, training the understanding side (docs/design.md#reasoning-and-the-answer-format).

The recovered image comes from the current (frozen) recovery path, generated on the fly inside the
step with the same sampler as inference: its pixels are re-encoded by the VAE and patchified for
the ViT in-graph, so the host only ships a placeholder for that image's patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import flops
from robust_u1_jax.data import packing, sequence
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.inference import context as context_lib
from robust_u1_jax.inference import images as images_lib
from robust_u1_jax.inference import recovery as recovery_lib
from robust_u1_jax.models import vit as vit_lib
from robust_u1_jax.models.bagel import BagelConfig, bound_experts
from robust_u1_jax.training import recovery_cache
from robust_u1_jax.training.stage_spec import RunContext, StageSpec
from robust_u1_jax.training.state import TrainState, apply_gradients, merge_model

# Trainable parameters of stage III: the understanding expert, its head and the ViT connector.
UNDERSTANDING_PARAMS = (r"^language_model\.layers\.und\.",
                        r"^language_model\.final_norm\.und\.",
                        r"^language_model\.embed_tokens\.", r"^language_model\.lm_head\.",
                        r"^connector\.")
RECOVERED_SEGMENT = 2  # ViT segment id of the recovered image (the corrupted one is 1)


def reasoning_rows(batch: Mapping[str, Any], config: BagelConfig, markers: sequence.Markers,
                   instruction_ids: Sequence[int],
                   recovered: Sequence[Sequence[np.ndarray]] | None = None):
  """Host side: a pipeline batch, packed or not -> (SequenceInputs, next-token labels (B, T) with
  -1 off the answers, then either

    recovered None (on the fly): (RecoveryInputs for the in-step recovery (unpacked batches of one
      image size), the corrupted images on the batch's canvas (B, 1, H, W, 3), where the rows
      read their latents and the step puts each recovery beside them), or
    recovered[row][sample] uint8 images (precomputed): the VAE image stack (B, 2S, H, W, 3) of
      each sample's corrupted and recovered image.)
  """
  size, strides = sequence.canvas(batch), sequence.strides(config)
  rows, answers = [], []
  for r, samples in enumerate(packing.batch_samples(batch)):
    row, offset = [], 0
    for k, sample in enumerate(samples):
      recovered_vit = None
      if recovered is not None:
        vit_hw = sample.get("corrupted_vit", sample["corrupted"]).shape[:2]
        recovered_vit = np.asarray(images_lib.vit_resize(recovered[r][k], vit_hw))
      blocks = sequence.reasoning_blocks(sample, size, recovered_vit)
      answers.append((r, offset, blocks))
      offset += sequence.lengths(blocks, *strides)[0]
      row.append(blocks)
    rows.append(row)
  seq_len, max_vit, max_latent = sequence.bounds(
      batch, lambda sample: sequence.reasoning_blocks(sample, size), config)
  # Declares each expert's token capacity where the rows' bounds give one (bagel.bound_experts).
  inputs = bound_experts(sequence.build_rows(rows, config, markers, seq_len=seq_len,
                                             max_vit=max_vit, max_latent=max_latent,
                                             images_per_sample=2))
  labels = np.full((len(rows), seq_len), -1, np.int32)
  for r, start, blocks in answers:
    sequence.write_labels(labels[r], start, blocks, config, markers)
  if recovered is None:
    return inputs, labels, (
        recovery_lib.batch_recovery_inputs(batch, config, markers, instruction_ids),
        sequence.image_stack(batch, ("corrupted",)))
  on_canvas = sequence.place_like(batch["corrupted"], recovered)
  return inputs, labels, sequence.image_stack({**batch, "recovered": on_canvas},
                                              ("corrupted", "recovered"))


def with_recovered_patches(inputs, recovered_bhwc: jax.Array, vit_hw: tuple[int, int],
                           patch: int):
  """Writes the recovered image's ViT patches over the placeholder segment; uint8 images through
  the ViT resize every recovered image goes through (`inference.images.vit_resize`)."""
  vit = images_lib.vit_resize(recovered_bhwc, vit_hw)
  patches = vit_lib.images_to_patches(vit, patch)  # uint8, as the rows carry patches
  if inputs.vit_patches.dtype != jnp.uint8:  # rows built from float images
    patches = images_lib.to_model_range(patches)
  segment = inputs.vit_segment_ids == RECOVERED_SEGMENT
  index = jnp.clip(jnp.cumsum(segment, axis=1) - 1, 0, patches.shape[1] - 1)
  gathered = jnp.take_along_axis(patches, index[..., None], axis=1)
  return inputs.replace(vit_patches=jnp.where(segment[..., None], gathered.astype(
      inputs.vit_patches.dtype), inputs.vit_patches))


def answer_loss(model, inputs, labels, images_bkhwc, vae_key=None) -> tuple[jax.Array, dict]:
  """Cross-entropy on the answer labels; images: each sample's corrupted and recovered image
  (uint8), their latents posterior samples under `vae_key` (None: the means)."""
  chex.assert_equal_shape([labels, inputs.token_kind],
                          custom_message="labels: one per token of the rows (B, T)")
  tokens = context_lib.encode_images(model, images_bkhwc, vae_key)
  latents = context_lib.gather_latents(tokens, inputs)
  hidden = model(inputs, latents, jnp.zeros(latents.shape[:2]))
  logits = model.text_logits(hidden)
  mask = labels >= 0
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  count = jnp.maximum(mask.sum(), 1)
  loss = jnp.sum(jnp.where(mask, nll, 0.0)) / count
  accuracy = jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == labels, False)) / count
  return loss, {"ce_loss": loss, "token_accuracy": accuracy}


def make_step(graphdef: nnx.GraphDef, tx, ema_decay: float,
              on_the_fly: tuple[recovery_lib.Sampler, images_lib.ImageRules] | None = None,
              vae_posterior: str = "sample"):
  """step(state, (inputs, labels, recovery or images)) -> (state, metrics).

  `on_the_fly` = (sampler, the data config's resize rules): the step recovers the corrupted
  images itself, as 8-bit images like the cached ones, and gives the recovered one to the ViT at
  the size the pipeline gave the corrupted one, derived from the (static) VAE image size. None:
  the batch carries precomputed recoveries in its image stack.
  """

  def step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
    inputs, labels, third = batch
    rng, key = jax.random.split(state.rng)
    recover_key, vae_key = jax.random.split(key)
    vae_key = context_lib.posterior_key(vae_posterior, vae_key)
    if on_the_fly is None:
      images = third
    else:
      sampler, rules = on_the_fly
      recovery_inputs, corrupted_on_canvas = third
      model = merge_model(graphdef, state.params, state.frozen)
      _, recovered = recovery_lib.recover(model, recovery_inputs, sampler, recover_key)
      recovered = images_lib.quantize(recovered)
      h, w = recovered.shape[1:3]
      vit_hw = rules.vit_size(h, w)
      inputs = with_recovered_patches(inputs, recovered, vit_hw, model.config.vit.patch_size)
      # Top-left on the canvas, as the rows read each image's latents (a non-square image's
      # canvas is larger than it: read at its own size, the rows' latents fell outside it).
      on_canvas = jnp.zeros_like(corrupted_on_canvas[:, 0]).at[:, :h, :w].set(recovered)
      images = jnp.concatenate([corrupted_on_canvas, on_canvas[:, None]], axis=1)

    def loss_fn(params):
      return answer_loss(merge_model(graphdef, params, state.frozen), inputs, labels, images,
                         vae_key)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, opt_metrics = apply_gradients(state.replace(rng=rng), grads, tx, ema_decay)
    return state, {"loss": loss, **metrics, **opt_metrics}

  return step


def build(ctx: RunContext) -> StageSpec:
  """The reasoning stage (stage_spec.py's contract): recoveries on the fly, or read from the cache
  that `python -m robust_u1_jax.recover` wrote (reason.recovered_images)."""

  c = ctx.config
  instruction = tokenizer_lib.encode_text_block(ctx.tokenizer, c.instruction)
  model_config = ctx.model_config
  if c.reason.recovered_images == "cache":
    cache = recovery_cache.RecoveryCache.open(c.reason.recovery_cache, c)
    on_the_fly = None
  else:
    if c.data.token_budget > 0:
      raise ValueError("reason.recovered_images='on_the_fly' recovers inside the step, which "
                       "needs unpacked batches of one image size (data.token_budget=0); "
                       "precompute the recoveries instead (reason.recovered_images=cache)")
    cache = None
    on_the_fly = (recovery_lib.Sampler.from_config(c, c.reason.recovery_steps),
                  images_lib.ImageRules.from_data_config(c.data))

  def host_inputs(batch, rng):
    del rng
    recovered = None if cache is None else cache.load_batch(batch)
    return reasoning_rows(batch, model_config, ctx.markers, instruction, recovered)

  return StageSpec(
      trainable=UNDERSTANDING_PARAMS, host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, tx, c.optimizer.ema_decay, on_the_fly,
                                               c.vae_posterior),
      samples_per_step=c.data.batch_size,
      # The rows' work with the answer tokens' logits; an on-the-fly recovery is not counted.
      work=lambda host: [flops.rows_work(host[0], model_config.latent_downsample ** 2,
                                         logit_tokens=int((np.asarray(host[1]) >= 0).sum()))])
