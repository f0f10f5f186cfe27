"""Evaluation during training: recover a fixed set of validation images with the deterministic
sampler and report their SSIM, plus a corrupted | recovered | clean grid to look at."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.training import reasoning, rewards, rl, sft

EVAL_IMAGES = 4


def make_recovery_eval(ctx, num_steps: int) -> Callable:
  """evaluate(graphdef, state) -> ([corrupted, recovered, clean] columns, metrics)."""
  c = ctx.config
  data = pipeline_lib.make_pipeline(c.eval_data, seed=c.seed, tokenizer=ctx.tokenizer, stage="rl")
  batch = next(data)
  data.close()
  take = lambda x: x[:EVAL_IMAGES]
  corrupted, clean = take(batch["corrupted"]), take(batch["clean"])
  inputs = jax.tree.map(jnp.asarray, rl.recovery_inputs(
      corrupted, take(batch.get("corrupted_vit", batch["corrupted"])), clean,
      sft.instruction_ids({k: take(batch[k]) for k in ("instruction_ids", "instruction_lengths")}),
      ctx.model.config, ctx.markers))
  settings = rl.RLSettings.inference(num_steps)

  @functools.partial(jax.jit, static_argnums=0)  # graph definitions hash: one compile per model
  def recover_and_score(graphdef, params, frozen):
    model = nnx.merge(graphdef, params, frozen)
    recovered = reasoning.recover(model, inputs, settings, jax.random.PRNGKey(c.seed))
    return recovered, rewards.ssim(recovered, inputs.clean.astype(jnp.float32) / 255.0)

  def evaluate(graphdef, state):
    params = state.ema if state.ema is not None else state.params
    recovered, ssim = jax.device_get(recover_and_score(graphdef, params, state.frozen))
    columns = [corrupted, np.asarray(recovered), clean]
    return columns, {"eval_ssim": float(np.mean(ssim))}

  return evaluate
