"""Evaluation during training: recover a fixed set of validation images with the deterministic
sampler and report their SSIM beside the corrupted images' own (what doing nothing scores), plus a
corrupted | recovered | clean grid to look at."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from robust_u1_jax import pixels
from robust_u1_jax.data import packing
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.inference import recovery as recovery_lib
from robust_u1_jax.training import rewards
from robust_u1_jax.training.stage_spec import RunContext

# The same images in every stage that recovers (SFT, RL), whatever its training batch: enough for
# the stages' figures to compare (with 4, and RL's batch of 2 cutting its set to 2, the demo's SFT
# and RL logged 0.518 and 0.400 on different images, where the report put RL above SFT).
EVAL_IMAGES = 16
GRID_IMAGES = 8  # the grid's rows: the first of the scored images


def other_source_note(c) -> str | None:
  """A note when the evaluation reads another source than the training data: eval_data is a copy
  of the config file's data, so `--config.data.source=folder` alone trains on the user's images
  and evaluates on the built-in world's."""
  if c.eval_data.source == c.data.source or not c.eval_every:
    return None
  return (f"note: the evaluation (every {c.eval_every} steps and at the last) reads "
          f"eval_data.source = {c.eval_data.source!r}, not the training data's data.source = "
          f"{c.data.source!r}; "
          "give --config.eval_data.source and --config.eval_data.path to evaluate on yours")


def once_each(samples: list[dict]) -> list[dict]:
  """Each source record's first sample: a source of fewer than EVAL_IMAGES records fills the
  batch by repeating them (the pipeline repeats epochs), which would count them twice in the mean
  and draw them twice in the grid."""
  seen: set[int] = set()
  kept = []
  for sample in samples:
    if int(sample["index"]) not in seen:
      seen.add(int(sample["index"]))
      kept.append(sample)
  return kept


def make_recovery_eval(ctx: RunContext, num_steps: int) -> Callable:
  """evaluate(graphdef, state) -> ({corrupted, recovered, clean} columns, metrics).

  The first EVAL_IMAGES validation samples (fewer where the source holds fewer), recovered in one
  batch per image size. Metrics: eval_ssim (the recoveries) and eval_ssim_corrupted (the corrupted
  images, fixed: a recovery below it is worse than doing nothing).
  """
  c = ctx.config
  note = other_source_note(c)
  if note:
    print(note, file=sys.stderr, flush=True)
  data_config = c.eval_data.copy_and_resolve_references()
  data_config.token_budget = 0  # one sample per row, whatever the training batches pack
  data_config.batch_size = EVAL_IMAGES
  data = pipeline_lib.make_pipeline(data_config, seed=c.seed, tokenizer=ctx.tokenizer,
                                    stage="rl", instruction=c.get("instruction"))
  samples = once_each([row[0] for row in packing.batch_samples(next(data))])
  data.close()
  groups = recovery_lib.size_groups(samples)
  inputs = [jax.tree.map(jnp.asarray, recovery_lib.recovery_inputs(
      [samples[i] for i in members], ctx.model_config, ctx.markers)) for members in groups]
  sampler = recovery_lib.Sampler.from_config(c, num_steps)
  # Doing nothing scores the same at every evaluation: once, here.
  ssim_corrupted = float(np.concatenate([
      rewards.ssim(pixels.to_float(r.corrupted[:, 0]), pixels.to_float(r.clean)) for r in inputs
  ]).mean())

  # Graph definitions hash: one compile per model. The outputs are replicated, so every process
  # of a multi-host run can read them whole (a sharded output spans other hosts' devices).
  replicated = NamedSharding(ctx.mesh, P())

  @functools.partial(jax.jit, static_argnums=0, out_shardings=(replicated, replicated))
  def recover_and_score(graphdef, params, frozen, recovery):
    model = nnx.merge(graphdef, params, frozen)
    # The posterior mean and a fixed noise: the same recoveries at every evaluation.
    _, recovered = recovery_lib.recover(model, recovery, sampler, jax.random.PRNGKey(c.seed))
    return recovered, rewards.ssim(recovered, pixels.to_float(recovery.clean))

  def evaluate(graphdef, state):
    params = state.ema if state.ema is not None else state.params
    recovered, ssim = [None] * len(samples), np.zeros(len(samples))
    for members, recovery in zip(groups, inputs):
      images, scores = jax.device_get(recover_and_score(graphdef, params, state.frozen,
                                                        recovery))
      for j, i in enumerate(members):
        recovered[i], ssim[i] = images[j], scores[j]
    shown = slice(GRID_IMAGES)
    columns = {"corrupted": [s["corrupted"] for s in samples[shown]],
               "recovered": recovered[shown], "clean": [s["clean"] for s in samples[shown]]}
    return columns, {"eval_ssim": float(ssim.mean()), "eval_ssim_corrupted": ssim_corrupted}

  return evaluate
