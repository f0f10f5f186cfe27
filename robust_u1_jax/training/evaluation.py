"""Evaluation during training: recover a fixed set of validation images with the deterministic
sampler and report their SSIM, plus a corrupted | recovered | clean grid to look at."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax.data import packing
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.training import reasoning, rewards, rl

EVAL_IMAGES = 4


def make_recovery_eval(ctx, num_steps: int) -> Callable:
  """evaluate(graphdef, state) -> ([corrupted, recovered, clean] columns, metrics).

  The first EVAL_IMAGES validation samples, recovered in one batch per image size; images of
  other sizes than the largest sit top-left on its canvas in the grid.
  """
  c = ctx.config
  data_config = c.eval_data.copy_and_resolve_references()
  data_config.token_budget = 0  # one sample per row, whatever the training batches pack
  data = pipeline_lib.make_pipeline(data_config, seed=c.seed, tokenizer=ctx.tokenizer,
                                    stage="rl")
  samples = [row[0] for row in packing.batch_samples(next(data))][:EVAL_IMAGES]
  data.close()
  groups: dict[tuple, list[int]] = {}
  for i, sample in enumerate(samples):
    key = (sample["corrupted"].shape, sample.get("corrupted_vit", sample["corrupted"]).shape)
    groups.setdefault(key, []).append(i)
  inputs = {key: jax.tree.map(jnp.asarray, rl.recovery_inputs(
      [samples[i] for i in members], ctx.model.config, ctx.markers))
            for key, members in groups.items()}
  settings = rl.RLSettings.inference(num_steps)

  @functools.partial(jax.jit, static_argnums=0)  # graph definitions hash: one compile per model
  def recover_and_score(graphdef, params, frozen, recovery):
    model = nnx.merge(graphdef, params, frozen)
    recovered = reasoning.recover(model, recovery, settings, jax.random.PRNGKey(c.seed))
    return recovered, rewards.ssim(recovered, recovery.clean.astype(jnp.float32) / 255.0)

  def evaluate(graphdef, state):
    params = state.ema if state.ema is not None else state.params
    recovered, ssim = [None] * len(samples), [0.0] * len(samples)
    for key, members in groups.items():
      images, scores = jax.device_get(recover_and_score(graphdef, params, state.frozen,
                                                        inputs[key]))
      for j, i in enumerate(members):
        recovered[i], ssim[i] = images[j], float(scores[j])
    columns = [_on_canvas([s["corrupted"] for s in samples]), _on_canvas(recovered),
               _on_canvas([s["clean"] for s in samples])]
    return columns, {"eval_ssim": float(np.mean(ssim))}

  return evaluate


def _on_canvas(images) -> np.ndarray:
  """Images of any sizes, top-left on one canvas (float in [0, 1]; white elsewhere)."""
  images = [np.asarray(im, np.float32) / (255.0 if im.dtype == np.uint8 else 1.0)
            for im in images]
  h = max(im.shape[0] for im in images)
  w = max(im.shape[1] for im in images)
  out = np.ones((len(images), h, w, 3), np.float32)
  for i, im in enumerate(images):
    out[i, :im.shape[0], :im.shape[1]] = im
  return out
