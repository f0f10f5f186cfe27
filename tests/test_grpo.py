"""Flow-GRPO objective: advantages, PPO-clip gradients, KL."""

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax.training import grpo


def test_group_advantages_normalise_and_clip():
  r = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
  a = grpo.group_advantages(r)
  np.testing.assert_allclose(a[0], (r[0] - 2.5) / (np.std([1, 2, 3, 4]) + 1e-4), rtol=1e-5)
  np.testing.assert_array_equal(a[1], 0.0)  # a group without spread teaches nothing
  spiky = grpo.group_advantages(jnp.array([[0.0] * 99 + [1.0]]))
  assert float(spiky.max()) == 5.0


def test_zero_advantages_give_zero_gradient():
  logp = jnp.array([-1.0, -2.0, -0.5])
  g = jax.grad(lambda lp: grpo.flow_grpo_loss(lp, logp + 0.01, jnp.zeros(3), clip_low=1e-4,
                                              clip_high=1e-4).loss)(logp)
  np.testing.assert_array_equal(g, 0.0)


def test_gradient_raises_the_log_prob_of_the_better_sample():
  old = jnp.array([-1.0, -1.0, -1.0, -1.0])
  adv = grpo.group_advantages(jnp.array([[0.1, 0.9, 0.1, 0.1]]))[0]
  g = jax.grad(lambda lp: grpo.flow_grpo_loss(lp, old, adv, clip_low=0.2, clip_high=0.2).loss)(old)
  assert float(g[1]) < 0 and bool(jnp.all(g[jnp.array([0, 2, 3])] > 0))


def test_clipping_stops_the_gradient_outside_the_trust_region():
  old = jnp.zeros(2)
  lp = jnp.array([0.5, -0.5])  # ratios e^0.5 (above 1 + eps) and e^-0.5 (below 1 - eps)
  adv = jnp.array([1.0, -1.0])
  out = grpo.flow_grpo_loss(lp, old, adv, clip_low=0.1, clip_high=0.2)
  np.testing.assert_allclose(out.clip_fraction, 1.0)
  g = jax.grad(lambda x: grpo.flow_grpo_loss(x, old, adv, clip_low=0.1, clip_high=0.2).loss)(lp)
  np.testing.assert_array_equal(g, 0.0)


def test_kl_is_zero_when_policy_equals_reference():
  mean = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 2))
  std = jnp.full((3,), 0.3)
  np.testing.assert_allclose(grpo.mean_kl(mean, mean, std), 0.0)
  shifted = grpo.mean_kl(mean + 0.1, mean, std)
  np.testing.assert_allclose(shifted, 0.01 / (2 * 0.09), rtol=1e-5)
  out = grpo.flow_grpo_loss(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), clip_low=0.1, clip_high=0.1,
                            beta=0.04, mean=mean + 0.1, ref_mean=mean, std=std)
  np.testing.assert_allclose(out.loss, out.policy_loss + 0.04 * shifted, rtol=1e-6)


def test_approx_kl_survives_tiny_log_ratios():
  # Off-policy log-ratios of the RL step are ~1e-4: k3 ~ x^2 / 2 must not round to 0.
  x = jnp.array([1e-4, -1e-4, 2e-4])
  out = grpo.flow_grpo_loss(x, jnp.zeros(3), jnp.ones(3), clip_low=0.2, clip_high=0.2)
  np.testing.assert_allclose(out.approx_kl, np.mean(np.asarray(x, np.float64) ** 2 / 2), rtol=1e-3)


def test_mask_takes_the_loss_and_statistics_of_the_selected_transitions():
  log_prob = jnp.array([0.1, -0.3, 0.02, 0.5, -0.01])
  old = jnp.zeros(5)
  adv = jnp.array([1.0, -1.0, 0.5, 2.0, -0.5])
  mean = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 2))
  std = jnp.full((5,), 0.3)
  mask = jnp.array([True, False, True, False, True])
  kw = {"clip_low": 0.05, "clip_high": 0.05, "beta": 0.1}
  masked = grpo.flow_grpo_loss(log_prob, old, adv, mean=mean, ref_mean=mean + 0.1, std=std,
                               mask=mask, **kw)
  idx = jnp.array([0, 2, 4])
  subset = grpo.flow_grpo_loss(log_prob[idx], old[idx], adv[idx], mean=mean[idx],
                               ref_mean=mean[idx] + 0.1, std=std[idx], **kw)
  for got, want in zip(masked, subset):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  grad = jax.grad(lambda lp: grpo.flow_grpo_loss(lp, old, adv, mask=mask, clip_low=1.0,
                                                 clip_high=1.0).loss)(log_prob)
  np.testing.assert_array_equal(grad[jnp.array([1, 3])], 0.0)  # unselected: no gradient
