"""Stage I, self-recovery SFT: rows, loss and the jitted step.

A sample is `[clean VAE latents of the corrupted image] [ViT of the corrupted image]
[instruction] [noisy latents of the clean image]`; condition dropout removes the text, ViT or VAE
block per sample (0.1 / 0.3 / 0.3: docs/design.md#flow-matching-and-guidance), which also
teaches the unconditional velocities that classifier-free guidance needs at inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from robust_u1_jax import flops
from robust_u1_jax.data import multihost, packing
from robust_u1_jax.data import sequence
from robust_u1_jax.models.bagel import BagelConfig, bound_experts
from robust_u1_jax.training import evaluation, flow_matching
from robust_u1_jax.training.stage_spec import RunContext, StageSpec
from robust_u1_jax.training.state import loss_step, merge_model


def sft_rows(batch: Mapping[str, np.ndarray], config: BagelConfig, markers: sequence.Markers,
             rng: np.random.Generator, dropout: tuple[float, float, float]
             ) -> tuple[Any, np.ndarray]:
  """Host side: a pipeline batch, packed or not -> (SequenceInputs, VAE images (B, 2S, H, W, 3)
  uint8: each sample's corrupted and clean image on the batch's canvas, S samples per row).

  Images keep their own sizes (the `*_hw` valid regions); row shapes are fixed per data config
  and text bucket (sequence.bounds), so the step compiles once. Dropout is drawn per sample
  (multihost.SampleRng), so a sample is dropped the same way in a run of any process count.
  """
  size = sequence.canvas(batch)
  sample_rng = multihost.SampleRng(rng)
  rows, position = [], 0
  for samples in packing.batch_samples(batch):
    row = []
    for sample in samples:
      keep = sample_rng(sample, position).uniform(size=3) >= np.asarray(dropout)
      position += 1
      row.append(sequence.sft_blocks(sample, size, use_text=keep[0], use_vit=keep[1],
                                     use_vae=keep[2]))
    rows.append(row)
  seq_len, max_vit, max_latent = sequence.bounds(
      batch, lambda sample: sequence.sft_blocks(sample, size), config)
  # Declares each expert's token capacity where the rows' bounds give one (bagel.bound_experts).
  inputs = bound_experts(sequence.build_rows(rows, config, markers, seq_len=seq_len,
                                             max_vit=max_vit, max_latent=max_latent,
                                             images_per_sample=2))
  return inputs, sequence.image_stack(batch, ("corrupted", "clean"))


def make_step(graphdef: nnx.GraphDef, tx, *, timestep_shift: float, ema_decay: float,
              vae_posterior: str = "sample"):
  """step(state, (inputs, images)) -> (state, metrics): one optimizer update."""

  def loss_fn(params, frozen, batch, key):
    inputs, images = batch
    model = merge_model(graphdef, params, frozen)
    return flow_matching.flow_matching_loss(model, inputs, images, key, timestep_shift,
                                            vae_posterior)

  return loss_step(loss_fn, tx, ema_decay)


# Trainable parameters of stages I and II: the generation expert and the generation heads.
GENERATION_PARAMS = (r"^language_model\.layers\.gen\.", r"^language_model\.final_norm\.gen\.",
                     r"^time_embedder\.", r"^vae2llm\.", r"^llm2vae\.")


def build(ctx: RunContext) -> StageSpec:
  """The SFT stage (stage_spec.py's contract)."""
  c = ctx.config
  model_config = ctx.model_config
  dropout = (c.text_dropout, c.vit_dropout, c.vae_dropout)

  def host_inputs(batch, rng):
    return sft_rows(batch, model_config, ctx.markers, rng, dropout)

  return StageSpec(
      trainable=GENERATION_PARAMS, host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, tx, timestep_shift=c.timestep_shift,
                                               ema_decay=c.optimizer.ema_decay,
                                               vae_posterior=c.vae_posterior),
      samples_per_step=c.data.batch_size,
      evaluate=evaluation.make_recovery_eval(ctx, c.eval_num_steps),
      work=lambda host: [flops.rows_work(host[0], model_config.latent_downsample ** 2)])
