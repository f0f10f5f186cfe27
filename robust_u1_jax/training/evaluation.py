"""Evaluation during training: recover a fixed set of validation images with the deterministic
sampler and report their SSIM, plus a corrupted | recovered | clean grid to look at."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import pixels
from robust_u1_jax.data import packing
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.inference import recovery as recovery_lib
from robust_u1_jax.training import rewards
from robust_u1_jax.training.stage_spec import RunContext

EVAL_IMAGES = 4


def make_recovery_eval(ctx: RunContext, num_steps: int) -> Callable:
  """evaluate(graphdef, state) -> ([corrupted, recovered, clean] columns, metrics).

  The first EVAL_IMAGES validation samples, recovered in one batch per image size.
  """
  c = ctx.config
  data_config = c.eval_data.copy_and_resolve_references()
  data_config.token_budget = 0  # one sample per row, whatever the training batches pack
  data = pipeline_lib.make_pipeline(data_config, seed=c.seed, tokenizer=ctx.tokenizer,
                                    stage="rl")
  samples = [row[0] for row in packing.batch_samples(next(data))][:EVAL_IMAGES]
  data.close()
  groups = recovery_lib.size_groups(samples)
  inputs = [jax.tree.map(jnp.asarray, recovery_lib.recovery_inputs(
      [samples[i] for i in members], ctx.model_config, ctx.markers)) for members in groups]
  sampler = recovery_lib.Sampler(num_steps=num_steps)

  @functools.partial(jax.jit, static_argnums=0)  # graph definitions hash: one compile per model
  def recover_and_score(graphdef, params, frozen, recovery):
    model = nnx.merge(graphdef, params, frozen)
    # The posterior mean and a fixed noise: the same recoveries at every evaluation.
    _, recovered = recovery_lib.recover(model, recovery, sampler, jax.random.PRNGKey(c.seed))
    return recovered, rewards.ssim(recovered, pixels.to_float(recovery.clean))

  def evaluate(graphdef, state):
    params = state.ema if state.ema is not None else state.params
    recovered, ssim = [None] * len(samples), [0.0] * len(samples)
    for members, recovery in zip(groups, inputs):
      images, scores = jax.device_get(recover_and_score(graphdef, params, state.frozen,
                                                        recovery))
      for j, i in enumerate(members):
        recovered[i], ssim[i] = images[j], float(scores[j])
    columns = [[s["corrupted"] for s in samples], recovered, [s["clean"] for s in samples]]
    return columns, {"eval_ssim": float(np.mean(ssim))}

  return evaluate
