"""Flow-GRPO on the tiny model: one step moves the policy toward the better-rewarded sample;
updates after the first on a rollout are off-policy (ratio away from 1, clip and approx-KL act);
a single update is the plain PPO-clip update; the stage runs through the trainer and reports every
metric."""

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import config_lib, sampling
from robust_u1_jax.data import sequence
from robust_u1_jax.data import shapes
from robust_u1_jax.inference import recovery
from robust_u1_jax.models import bagel
from robust_u1_jax.training import grpo, rl, sft, trainer
from robust_u1_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = os.path.join(ROOT, "configs", "rl.py") + ":tiny"


@pytest.mark.slow
def test_one_step_raises_the_log_prob_of_the_better_sample():
  settings, graphdef, tx, state, inputs = _tiny_rl(1, group_size=4, num_steps=6, window_size=2)

  # Sample 0 of the group is the best; the others tie.
  best_first = lambda recovered, clean, aux: {"total": jnp.array([1.0, 0.0, 0.0, 0.0])}
  fns = rl.make_functions(graphdef, tx, settings, best_first)
  _, key = jax.random.split(state.rng)
  out, _, _ = jax.jit(fns.rollout)(state, inputs, key)  # the rollout the step will draw
  vae_key = rl.rollout_vae_key(key)
  before = jax.jit(fns.policy_terms)(state.params, state.frozen, inputs, out, vae_key).log_prob
  chex.assert_shape([before, out.window_log_prob], (2, 4))  # (window steps, recoveries)
  chex.assert_trees_all_close(before, out.window_log_prob, rtol=1e-5, atol=1e-5)

  new_state, metrics = jax.jit(fns.step)(state, inputs)
  chex.assert_tree_all_finite((new_state.params, metrics))
  after = jax.jit(fns.policy_terms)(new_state.params, new_state.frozen, inputs, out,
                                    vae_key).log_prob
  change = np.asarray(after - before).sum(axis=0)  # summed over the window steps
  assert change[0] > 0, change
  assert np.all(change[1:] < change[0]), change
  assert float(metrics["advantage_abs_max"]) > 1.0


@pytest.mark.slow
def test_rl_stage_runs_through_the_trainer(tmp_path):
  config = config_lib.load(RL, {"init_from": "random", "total_steps": 2, "log_every": 1,
                                "checkpoint_every": 2, "data.batch_size": 8, "mesh.data": -1,
                                "mesh.fsdp": 1, "rl.group_size": 2, "rl.num_steps": 4,
                                "rl.window_size": 1, "tensorboard": False,
                                "eval_every": 0})
  history = trainer.train(config, str(tmp_path), rl.build)
  row = history[-1]
  for key in ("loss", "clip_fraction", "approx_kl", "log_prob_drift", "advantage_mean",
              "advantage_std", "reward_ssim_mean", "reward_ssim_std", "reward_total_mean",
              "clip_fraction_last", "approx_kl_last", "ratio_mean_last", "ratio_min_last",
              "ratio_max_last"):
    assert np.isfinite(row[key]), key
  assert 0.0 <= row["reward_ssim_mean"] <= 1.0
  assert os.path.isdir(tmp_path / "model")


def _tiny_rl(num_images: int, **settings_overrides):
  """The random tiny Bagel (nonzero llm2vae, so the velocity depends on the trained expert), its
  fresh train state and `num_images` shapes-world recovery inputs."""
  settings, config = _tiny_settings(**settings_overrides)
  model_config = bagel.BagelConfig.tiny()
  model = bagel.Bagel(model_config, rngs=nnx.Rngs(0))
  model.llm2vae.kernel.set_value(
      0.05 * jax.random.normal(jax.random.PRNGKey(1), model.llm2vae.kernel.shape))
  graphdef, params, frozen = state_lib.split_model(model, sft.GENERATION_PARAMS)
  tx = state_lib.make_optimizer(config.optimizer, 10)
  state = state_lib.create_state(params, frozen, tx, jax.random.PRNGKey(0), False)
  world = shapes.ShapesWorld("train")
  rows = [{"corrupted": world[i]["image"] // 2, "clean": world[i]["image"],
           "instruction_ids": [5, 6, 7]} for i in range(num_images)]
  inputs = jax.tree.map(jnp.asarray, recovery.recovery_inputs(rows, model_config,
                                                              sequence.Markers(3, 4)))
  return settings, graphdef, tx, state, inputs


def test_updates_after_the_first_are_off_policy():
  # 2 images x 2 recoveries x 1 window step = 4 transitions; two updates of 2 each. The clip range
  # sits between the first update's recompute rounding (~4e-7 measured) and the second update's
  # departure (~1e-4 measured).
  settings, graphdef, tx, state, inputs = _tiny_rl(
      2, group_size=2, num_steps=4, window_size=1, updates_per_rollout=2, inner_epochs=1,
      clip_low=1e-5, clip_high=1e-5)
  rewards = jnp.array([1.0, 0.0, 0.3, 0.5])
  fns = rl.make_functions(graphdef, tx, settings, lambda r, c, aux: {"total": rewards})
  key, shuffle_key = jax.random.split(jax.random.PRNGKey(3))
  out, _, _ = jax.jit(fns.rollout)(state, inputs, key)
  advantages = grpo.group_advantages(rewards.reshape(-1, 2)).reshape(-1)
  _, per_update = jax.jit(fns.updates)(state, inputs, out, advantages, rl.rollout_vae_key(key),
                                       shuffle_key)
  per_update = jax.device_get(per_update)
  departure = np.maximum(np.abs(per_update["ratio_max"] - 1), np.abs(per_update["ratio_min"] - 1))
  assert per_update["clip_fraction"].shape == (2,)
  # First update: the rollout's own parameters, ratio 1 up to rounding, nothing clipped.
  assert departure[0] < 1e-5, departure
  assert per_update["clip_fraction"][0] == 0.0
  # Second update: the first moved the policy, so the ratio leaves 1 and the clip acts.
  assert departure[1] > 1e-5 and departure[1] > 10 * departure[0], departure
  assert per_update["clip_fraction"][1] > 0.0
  approx_kl = per_update["approx_kl"]
  assert approx_kl[1] > 0.0 and approx_kl[1] > approx_kl[0], approx_kl


def test_a_single_update_is_the_plain_ppo_update():
  # updates_per_rollout = inner_epochs = 1: the step is one PPO-clip update on every transition,
  # as before mini-batching existed; compared with that update written out here.
  settings, graphdef, tx, state, inputs = _tiny_rl(
      1, group_size=2, num_steps=4, window_size=2, updates_per_rollout=1, inner_epochs=1)
  rewards = jnp.array([1.0, 0.0])
  fns = rl.make_functions(graphdef, tx, settings, lambda r, c, aux: {"total": rewards})
  new_state, metrics = jax.jit(fns.step)(state, inputs)

  _, key = jax.random.split(state.rng)
  out, _, _ = jax.jit(fns.rollout)(state, inputs, key)
  advantages = grpo.group_advantages(rewards.reshape(1, 2)).reshape(-1)

  def loss(params):
    steps = fns.policy_terms(params, state.frozen, inputs, out, rl.rollout_vae_key(key))
    adv = jnp.broadcast_to(advantages, out.window_log_prob.shape)
    return grpo.flow_grpo_loss(steps.log_prob.reshape(-1), out.window_log_prob.reshape(-1),
                               adv.reshape(-1), clip_low=settings.clip_low,
                               clip_high=settings.clip_high).loss

  value, grads = jax.jit(jax.value_and_grad(loss))(state.params)
  expected, _ = jax.jit(lambda st, g: state_lib.apply_gradients(st, g, tx, 0.0))(state, grads)
  # At ratio 1 the loss is -mean(advantage) = 0 up to rounding (~3e-8 apart measured).
  chex.assert_trees_all_close(metrics["loss"], value, atol=1e-6)
  chex.assert_trees_all_close(new_state.params, expected.params, rtol=1e-6, atol=1e-7)
  assert int(new_state.step) == 1
  assert float(metrics["clip_fraction"]) == 0.0


class MinibatchTest(chex.TestCase):
  """The pure parts of the step that pick transitions and windows, jitted (as in the step) and
  eager."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_minibatch_masks_partition_each_epoch(self):
    masks_fn = self.variant(lambda key: rl.minibatch_masks(key, 10, updates_per_rollout=6,
                                                           inner_epochs=2))
    masks = masks_fn(jax.random.PRNGKey(0))
    chex.assert_shape(masks, (6, 10))
    chex.assert_type(masks, bool)
    masks = np.asarray(masks)
    for epoch in masks.reshape(2, 3, 10):
      chex.assert_trees_all_equal(epoch.sum(axis=0), np.ones(10, int))  # each once per epoch
      assert sorted(epoch.sum(axis=1)) == [3, 3, 4]  # near-even mini-batches
    assert not np.array_equal(masks[:3], masks[3:])  # each epoch reshuffles

  @chex.variants(with_jit=True, without_jit=True)
  def test_window_start_stays_in_the_noisier_half(self):
    settings, *_ = _tiny_settings(num_steps=10, window_size=3)
    starts = self.variant(jax.vmap(lambda k: rl.window_start(k, settings)))(
        jax.random.split(jax.random.PRNGKey(1), 400))
    chex.assert_shape(starts, (400,))
    # Uniform over [0, N/2 - W] = [0, 2]: every start drawn, none later.
    chex.assert_trees_all_equal(np.unique(np.asarray(starts)), np.arange(3))


def _tiny_settings(**overrides):
  config = config_lib.load(RL, {"init_from": "random"})
  return (dataclasses.replace(rl.RLSettings.from_config(config), guidance=recovery.NO_GUIDANCE,
                              **overrides), config)


@pytest.mark.parametrize("overrides,field", [
    ({"rl.inner_epochs": 0}, "rl.inner_epochs"),
    ({"rl.updates_per_rollout": 3, "rl.inner_epochs": 2}, "rl.updates_per_rollout"),
    ({"rl.updates_per_rollout": 0}, "rl.updates_per_rollout"),
    # 1 image x 2 recoveries x 1 window step: 2 transitions cannot fill 3 mini-batches.
    ({"rl.updates_per_rollout": 3, "data.batch_size": 1, "rl.group_size": 2,
      "rl.window_size": 1}, "rl.updates_per_rollout"),
    # No SDE step: nothing has a log-probability, and the run's first loss was NaN.
    ({"rl.window_size": 0}, "rl.window_size = 0"),
    # Each clip field named alone (the line named three).
    ({"rl.clip_low": 0.0}, "rl.clip_low = 0.0"),
    ({"rl.clip_high": -1.0}, "rl.clip_high = -1.0"),
    ({"rl.beta": -0.1}, "rl.beta = -0.1"),
])
def test_update_fields_are_validated(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    config_lib.load(RL, {"init_from": "random", **overrides})


def test_a_clip_checkpoint_without_its_weight_is_noted():
  # The tiny variant weighs CLIP 0: its file was silently not read.
  config = config_lib.load(RL, {"init_from": "random", "rl.clip_checkpoint": "clip.safetensors"})
  note = rl.unread_clip_note(config.rl)
  assert note.startswith("note: rl.clip_checkpoint = 'clip.safetensors' is not read")
  assert "--config.rl.reward_weights.clip=0.2" in note
  assert rl.unread_clip_note(config_lib.load(RL, {"init_from": "random"}).rl) is None


def test_learning_rate_follows_the_trainer_step_with_several_updates():
  config = config_lib.load(RL, {"init_from": "random", "total_steps": 6,
                                "optimizer.warmup_steps": 2, "optimizer.grad_clip": 0.0,
                                "optimizer.end_learning_rate": 0.0, "rl.updates_per_rollout": 2})
  plain_tx = state_lib.make_optimizer(config.optimizer, config.total_steps)
  tx = rl.update_optimizer(config, plain_tx)
  params = {"w": jnp.zeros(())}
  opt_state = tx.init(params)
  sizes = []
  for _ in range(12):  # constant gradients: Adam's update is the learning rate
    update, opt_state = tx.update({"w": jnp.ones(())}, opt_state, params)
    sizes.append(-float(update["w"]))
  schedule = state_lib.learning_rate_schedule(config.optimizer, config.total_steps)
  # Update 2n (the first of trainer step n + 1) runs at the trainer schedule's step-n rate.
  chex.assert_trees_all_close(np.asarray(sizes[::2]),
                              np.asarray([float(schedule(n)) for n in range(6)]), rtol=1e-5,
                              atol=1e-12)


def test_the_kl_term_divides_by_the_sde_noise_scale():
  """beta's term is mean((mu - mu_ref)^2) / (2 sigma^2) with sigma = a sqrt(s / (1 - s)), as
  Flow-GRPO's code takes it (its betas carry over), not the exact Gaussian KL, which divides by
  the step's variance sigma^2 (-dt) as well."""
  settings, graphdef, tx, state, inputs = _tiny_rl(
      1, group_size=2, num_steps=4, window_size=2, updates_per_rollout=1, inner_epochs=1,
      beta=0.04)
  # A reference policy away from the trained one, so the term is not 0.
  reference = jax.tree.map(lambda p: p * 1.05, state.params)
  state = state.replace(aux={"reference": reference})
  rewards = jnp.array([1.0, 0.0])
  fns = rl.make_functions(graphdef, tx, settings, lambda r, c, aux: {"total": rewards})
  key, shuffle_key = jax.random.split(jax.random.PRNGKey(3))
  out, _, _ = jax.jit(fns.rollout)(state, inputs, key)
  vae_key = rl.rollout_vae_key(key)
  advantages = grpo.group_advantages(rewards.reshape(1, 2)).reshape(-1)
  _, per_update = jax.jit(fns.updates)(state, inputs, out, advantages, vae_key, shuffle_key)
  terms = jax.jit(fns.policy_terms)
  policy = terms(state.params, state.frozen, inputs, out, vae_key)
  ref = terms(reference, state.frozen, inputs, out, vae_key)
  s, s_next = np.asarray(out.window_t), np.asarray(out.window_t_next)  # (W,)
  s_max = float(sampling.timesteps(settings.num_steps, settings.timestep_shift)[1])
  sigma = settings.noise_level * np.sqrt(s / (1 - np.where(s >= 1, s_max, s)))  # s = 1 moved
  sq = np.asarray((policy.mean - ref.mean) ** 2).reshape(2, 2, -1).mean(-1)  # (W, G)
  expected = np.mean(sq / (2 * sigma[:, None] ** 2))
  assert expected > 0
  np.testing.assert_allclose(per_update["kl"][0], expected, rtol=1e-4)
  exact = np.mean(sq / (2 * sigma[:, None] ** 2 * (s - s_next)[:, None]))
  assert not np.isclose(per_update["kl"][0], exact, rtol=0.5)


def test_the_policy_gradient_reaches_the_full_context_branch_only():
  """Flow-GRPO detaches its unconditional prediction: the guided velocity's gradient is the
  guidance scales times the full context's, the branches without text or image constants. With
  renorm_min 1 BAGEL's renorm is the identity, so the guided velocity is
  v_ni + s_i (v_nt + s_t (v - v_nt) - v_ni) and its gradient s_i s_t dv."""
  _, graphdef, _, state, inputs = _tiny_rl(1)
  guided = recovery.Guidance(text_scale=1.5, image_scale=2.0, renorm_min=1.0)
  x = jax.random.normal(jax.random.PRNGKey(5), (1, inputs.noisy.latent_seq_index.shape[1],
                                                    bagel.BagelConfig.tiny().latent_channels))
  t = jnp.array([0.6])
  w = jax.random.normal(jax.random.PRNGKey(6), x.shape)

  def projected(params, guidance):
    model = state_lib.merge_model(graphdef, params, state.frozen)
    return jnp.sum(w * recovery.velocity_fn(model, inputs, guidance)(x, t))

  grad_guided = jax.jit(jax.grad(lambda p: projected(p, guided)))(state.params)
  grad_full = jax.jit(jax.grad(lambda p: projected(p, recovery.Guidance(1.0, 1.0))))(state.params)
  moved = [np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grad_full)]
  assert max(moved) > 1e-3  # the full branch's velocity depends on the trained parameters
  for g, f in zip(jax.tree.leaves(grad_guided), jax.tree.leaves(grad_full)):
    np.testing.assert_allclose(g, 1.5 * 2.0 * f, rtol=1e-4, atol=1e-5)  # batched branches round


def test_each_recovery_is_scored_against_its_own_clean_image():
  # Rows are image-major: recoveries i*G .. i*G + G - 1 come from image i's context (the contexts'
  # KV caches repeated row by row) and form its group (advantages over reshape(-1, G)), so the
  # clean images must repeat the same way, not tile.
  settings, graphdef, tx, state, inputs = _tiny_rl(3, group_size=2, num_steps=2, window_size=1)
  seen = {}

  def recording(recovered, clean, aux):
    jax.debug.callback(lambda c: seen.update(clean=np.asarray(c)), clean)
    return {"total": jnp.zeros(recovered.shape[0])}

  fns = rl.make_functions(graphdef, tx, settings, recording)
  out, recovered, clean = jax.jit(fns.rollout)(state, inputs, jax.random.PRNGKey(4))
  assert recovered.shape[0] == 6
  expected = np.repeat(np.asarray(inputs.clean, np.float32) / 255.0, 2, axis=0)
  np.testing.assert_allclose(np.asarray(clean), expected, atol=1e-6)
  jax.block_until_ready(jax.jit(fns.step)(state, inputs))
  np.testing.assert_allclose(seen["clean"], expected, atol=1e-6)
