"""Flow-GRPO on the tiny model: one step moves the policy toward the better-rewarded sample; the
stage runs through the trainer and reports every metric."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import config_lib
from robust_u1_jax.data import shapes
from robust_u1_jax.inference import recovery
from robust_u1_jax.models import bagel, sequence
from robust_u1_jax.training import rl, sft, trainer
from robust_u1_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = os.path.join(ROOT, "configs", "rl.py") + ":tiny"


def test_one_step_raises_the_log_prob_of_the_better_sample():
  config = config_lib.load(RL, {"init_from": "random"})
  settings = dataclasses.replace(rl.RLSettings.from_config(config), group_size=4,
                                 num_steps=6, window_size=2, guidance=recovery.NO_GUIDANCE)
  model_config = bagel.BagelConfig.tiny()
  model = bagel.Bagel(model_config, rngs=nnx.Rngs(0))
  model.llm2vae.kernel.set_value(
      0.05 * jax.random.normal(jax.random.PRNGKey(1), model.llm2vae.kernel.shape))
  graphdef, params, frozen = state_lib.split_model(model, sft.GENERATION_PARAMS)
  tx = state_lib.make_optimizer(config.optimizer, 10)
  state = state_lib.create_state(params, frozen, tx, jax.random.PRNGKey(0), False)
  image = shapes.ShapesWorld("train")[0]["image"][None]
  inputs = jax.tree.map(jnp.asarray, recovery.recovery_inputs(
      [{"corrupted": image[0] // 2, "clean": image[0], "instruction_ids": [5, 6, 7]}],
      model_config, sequence.Markers(3, 4)))

  # Sample 0 of the group is the best; the others tie.
  best_first = lambda recovered, clean, aux: {"total": jnp.array([1.0, 0.0, 0.0, 0.0])}
  fns = rl.make_functions(graphdef, tx, settings, best_first)
  _, key = jax.random.split(state.rng)
  out, _, _ = jax.jit(fns.rollout)(state, inputs, key)  # the rollout the step will draw
  vae_key = rl.rollout_vae_key(key)
  before = jax.jit(fns.policy_terms)(state.params, state.frozen, inputs, out, vae_key).log_prob
  np.testing.assert_allclose(before, out.window_log_prob, rtol=1e-5, atol=1e-5)

  new_state, metrics = jax.jit(fns.step)(state, inputs)
  after = jax.jit(fns.policy_terms)(new_state.params, new_state.frozen, inputs, out,
                                    vae_key).log_prob
  change = np.asarray(after - before).sum(axis=0)  # summed over the window steps
  assert change[0] > 0, change
  assert np.all(change[1:] < change[0]), change
  assert float(metrics["advantage_abs_max"]) > 1.0


def test_rl_stage_runs_through_the_trainer(tmp_path):
  config = config_lib.load(RL, {"init_from": "random", "total_steps": 2, "log_every": 1,
                                "checkpoint_every": 2, "data.batch_size": 8, "mesh.data": -1,
                                "mesh.fsdp": 1, "rl.group_size": 2, "rl.num_steps": 4,
                                "rl.window_size": 1, "tensorboard": False,
                                "eval_every": 1000})
  history = trainer.train(config, str(tmp_path), rl.build)
  row = history[-1]
  for key in ("loss", "clip_fraction", "approx_kl", "log_prob_drift", "advantage_mean",
              "advantage_std", "reward_ssim_mean", "reward_ssim_std", "reward_total_mean"):
    assert np.isfinite(row[key]), key
  assert 0.0 <= row["reward_ssim_mean"] <= 1.0
  assert os.path.isdir(tmp_path / "model")
