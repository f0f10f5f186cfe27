"""Flow-GRPO objective: advantages, PPO-clip gradients, KL; each tested jitted and eager."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax.training import grpo


def _loss(**settings):
  """flow_grpo_loss with its static settings (clip range, beta) bound."""
  return functools.partial(grpo.flow_grpo_loss, **settings)


class AdvantagesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_group_advantages_normalise_and_clip(self):
    advantages = self.variant(grpo.group_advantages)
    r = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    a = advantages(r)
    chex.assert_equal_shape([a, r])
    chex.assert_trees_all_close(a[0], (r[0] - 2.5) / (np.std([1, 2, 3, 4]) + 1e-4), rtol=1e-5)
    chex.assert_trees_all_equal(a[1], jnp.zeros(4))  # a group without spread teaches nothing
    spiky = advantages(jnp.array([[0.0] * 99 + [1.0]]))
    assert float(spiky.max()) == 5.0


class PolicyLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_advantages_give_zero_gradient(self):
    logp = jnp.array([-1.0, -2.0, -0.5])
    loss = _loss(clip_low=1e-4, clip_high=1e-4)
    g = self.variant(jax.grad(lambda lp: loss(lp, logp + 0.01, jnp.zeros(3)).loss))(logp)
    chex.assert_trees_all_equal(g, jnp.zeros(3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_raises_the_log_prob_of_the_better_sample(self):
    old = jnp.array([-1.0, -1.0, -1.0, -1.0])
    adv = grpo.group_advantages(jnp.array([[0.1, 0.9, 0.1, 0.1]]))[0]
    loss = _loss(clip_low=0.2, clip_high=0.2)
    g = self.variant(jax.grad(lambda lp: loss(lp, old, adv).loss))(old)
    assert float(g[1]) < 0 and bool(jnp.all(g[jnp.array([0, 2, 3])] > 0))

  @chex.variants(with_jit=True, without_jit=True)
  def test_clipping_stops_the_gradient_outside_the_trust_region(self):
    old = jnp.zeros(2)
    lp = jnp.array([0.5, -0.5])  # ratios e^0.5 (above 1 + eps) and e^-0.5 (below 1 - eps)
    adv = jnp.array([1.0, -1.0])
    loss = _loss(clip_low=0.1, clip_high=0.2)
    out = self.variant(loss)(lp, old, adv)
    chex.assert_trees_all_close(out.clip_fraction, 1.0)
    g = self.variant(jax.grad(lambda x: loss(x, old, adv).loss))(lp)
    chex.assert_trees_all_equal(g, jnp.zeros(2))

  @chex.variants(with_jit=True, without_jit=True)
  def test_each_side_of_the_trust_region_has_its_own_bound(self):
    # clip_low 0.1 bounds ratios below 1, clip_high 0.2 above: the ratios 1.15 and 0.85 lie
    # inside one bound and outside the other, so swapped bounds clip the other one.
    old = jnp.zeros(4)
    lp = jnp.log(jnp.array([1.15, 0.85, 1.25, 0.95]))
    adv = jnp.array([1.0, -1.0, 1.0, -1.0])
    loss = _loss(clip_low=0.1, clip_high=0.2)
    out = self.variant(loss)(lp, old, adv)
    chex.assert_trees_all_close(out.clip_fraction, 0.5)  # 0.85 and 1.25
    g = self.variant(jax.grad(lambda x: loss(x, old, adv).loss))(lp)
    # Unclipped, d/dlp of -A r / 4 is -A r / 4; clipped, 0.
    chex.assert_trees_all_close(g, jnp.array([-1.15 / 4, 0.0, 0.0, 0.95 / 4]), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_kl_is_zero_when_policy_equals_reference(self):
    mean = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 2))
    std = jnp.full((3,), 0.3)
    kl = self.variant(grpo.mean_kl)
    chex.assert_trees_all_close(kl(mean, mean, std), 0.0)
    shifted = kl(mean + 0.1, mean, std)
    chex.assert_shape(shifted, ())
    chex.assert_trees_all_close(shifted, 0.01 / (2 * 0.09), rtol=1e-5)
    loss = self.variant(_loss(clip_low=0.1, clip_high=0.1, beta=0.04))
    out = loss(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), mean=mean + 0.1, ref_mean=mean, std=std)
    chex.assert_trees_all_close(out.loss, out.policy_loss + 0.04 * shifted, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_approx_kl_survives_tiny_log_ratios(self):
    # Off-policy log-ratios of the RL step are ~1e-4: k3 ~ x^2 / 2 must not round to 0.
    x = jnp.array([1e-4, -1e-4, 2e-4])
    out = self.variant(_loss(clip_low=0.2, clip_high=0.2))(x, jnp.zeros(3), jnp.ones(3))
    chex.assert_trees_all_close(out.approx_kl, np.mean(np.asarray(x, np.float64) ** 2 / 2),
                                rtol=1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mask_takes_the_loss_and_statistics_of_the_selected_transitions(self):
    log_prob = jnp.array([0.1, -0.3, 0.02, 0.5, -0.01])
    old = jnp.zeros(5)
    adv = jnp.array([1.0, -1.0, 0.5, 2.0, -0.5])
    mean = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 2))
    std = jnp.full((5,), 0.3)
    mask = jnp.array([True, False, True, False, True])
    loss = self.variant(_loss(clip_low=0.05, clip_high=0.05, beta=0.1))
    masked = loss(log_prob, old, adv, mean=mean, ref_mean=mean + 0.1, std=std, mask=mask)
    idx = jnp.array([0, 2, 4])
    subset = loss(log_prob[idx], old[idx], adv[idx], mean=mean[idx], ref_mean=mean[idx] + 0.1,
                  std=std[idx])
    chex.assert_tree_all_finite(masked)
    chex.assert_trees_all_close(masked, subset, rtol=1e-6)
    one_clip = _loss(clip_low=1.0, clip_high=1.0)
    grad = self.variant(jax.grad(lambda lp: one_clip(lp, old, adv, mask=mask).loss))(log_prob)
    chex.assert_trees_all_equal(grad[jnp.array([1, 3])], jnp.zeros(2))  # unselected: no gradient

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_mean_of_an_empty_mask_is_zero(self):
    masked_mean = self.variant(grpo.masked_mean)
    x = jnp.array([1.0, 2.0, 4.0])
    chex.assert_trees_all_close(masked_mean(x, jnp.array([True, False, True])), 2.5)
    chex.assert_trees_all_equal(masked_mean(x, jnp.zeros(3, bool)), jnp.float32(0.0))
