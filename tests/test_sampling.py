"""Samplers: schedule, Euler, Flow-GRPO SDE step and log-prob, CFG renorm, windowed rollouts.

Each pure function is tested jitted and eager (chex variants): the samplers run inside jitted
steps in training and inference, and eagerly in analysis code.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from scipy import stats

from robust_u1_jax import sampling


class ScheduleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_schedule_ends_and_shift(self):
    timesteps = self.variant(lambda shift: sampling.timesteps(50, shift))
    t = timesteps(3.0)
    chex.assert_shape(t, (50,))
    assert float(t[0]) == 1.0 and float(t[-1]) == 0.0
    assert bool(jnp.all(jnp.diff(t) < 0))
    # shift 3 keeps more of the schedule at high noise than no shift.
    assert float(t[25]) > float(timesteps(1.0)[25])

  @chex.variants(with_jit=True, without_jit=True)
  def test_schedule_matches_the_sd3_shift_formula(self):
    # Ends and monotonicity hold for any warp of [1, 0] (t ** (1 / shift) passes them): the
    # interior must be BAGEL's / SD3's shift * t / (1 + (shift - 1) * t) of a uniform grid.
    timesteps = self.variant(lambda shift: sampling.timesteps(11, shift))
    grid = np.linspace(1.0, 0.0, 11)
    for shift in (1.0, 3.0):
      expected = shift * grid / (1 + (shift - 1) * grid)
      chex.assert_trees_all_close(timesteps(shift), expected, rtol=1e-6, atol=1e-7)
    # Worked points of the closed form, independent of the line above: 3 * 0.5 / 2 = 0.75,
    # 3 * 0.1 / 1.2 = 0.25, 3 * 0.9 / 2.8 = 27 / 28.
    t = np.asarray(timesteps(3.0))
    np.testing.assert_allclose(t[[1, 5, 9]], [27 / 28, 0.75, 0.25], rtol=1e-6)

  def test_schedule_needs_both_ends(self):
    with self.assertRaisesRegex(ValueError, "num_steps"):
      sampling.timesteps(1, 1.0)


class SdeStepTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sde_log_prob_equals_gaussian_density(self):
    key = jax.random.PRNGKey(0)
    x, v = jax.random.normal(key, (2, 2, 6, 4))
    draw = self.variant(lambda x, v, k: sampling.sde_step(x, v, 0.6, 0.5, 0.95, 0.7, key=k))
    step = draw(x, v, jax.random.PRNGKey(1))
    chex.assert_shape([step.x_next, step.mean], x.shape)
    chex.assert_shape(step.log_prob, (2,))
    s_std = 0.7 * np.sqrt(0.6 / 0.4)
    std = s_std * np.sqrt(0.1)
    dt = -0.1
    mean = (np.asarray(x) * (1 + s_std**2 / 1.2 * dt)
            + np.asarray(v) * (1 + s_std**2 * 0.4 / 1.2) * dt)
    chex.assert_trees_all_close(step.mean, mean, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(step.std, std, rtol=1e-6)
    direct = stats.norm.logpdf(np.asarray(step.x_next), mean, std).reshape(2, -1).mean(-1)
    chex.assert_trees_all_close(step.log_prob, direct, rtol=1e-5)
    # Scoring the recorded sample under the same velocity reproduces its log-prob.
    score = self.variant(lambda x, v, x_next: sampling.sde_step(x, v, 0.6, 0.5, 0.95, 0.7,
                                                                x_next=x_next))
    chex.assert_trees_all_close(score(x, v, step.x_next).log_prob, step.log_prob, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_sample_times_match_scalar_times(self):
    # s, s_next may be (batch,): each row steps with its own times, as one row alone would.
    key = jax.random.PRNGKey(2)
    x, v = jax.random.normal(key, (2, 2, 5, 4))  # two rows each
    step = self.variant(lambda x, v, s, s_next: sampling.sde_step(x, v, s, s_next, 0.95, 0.7,
                                                                  x_next=x))
    both = step(x, v, jnp.array([0.6, 0.4]), jnp.array([0.5, 0.3]))
    for row, (s, s_next) in enumerate(((0.6, 0.5), (0.4, 0.3))):
      alone = step(x[row:row + 1], v[row:row + 1], s, s_next)
      chex.assert_trees_all_close(both.log_prob[row:row + 1], alone.log_prob, rtol=1e-6)
      chex.assert_trees_all_close(both.mean[row:row + 1], alone.mean, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sde_std_avoids_the_singularity_at_one(self):
    std = self.variant(lambda s, s_max: sampling.sde_std(s, s_max, 1.3))(
        jnp.asarray(1.0), jnp.asarray(0.98))
    chex.assert_tree_all_finite(std)
    chex.assert_trees_all_close(std, 1.3 * np.sqrt(1.0 / 0.02), rtol=1e-5)

  def test_sde_step_needs_a_key_or_a_sample(self):
    x = jnp.zeros((1, 2, 3))
    with self.assertRaisesRegex(ValueError, "PRNG key"):
      sampling.sde_step(x, x, 0.6, 0.5, 0.95, 0.7)


def _gaussian_velocity(sigma0):
  """Exact velocity E[eps - x0 | x_t] for data x0 ~ N(0, sigma0^2)."""
  def velocity(x, t):
    t = t[:, None, None]
    var = (1 - t) ** 2 * sigma0**2 + t**2
    return x * (t - (1 - t) * sigma0**2) / var
  return velocity


class SamplerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 3)
  def test_sampler_keeps_the_marginals(self, window):
    """With the exact velocity of Gaussian data, ODE and SDE steps both end at the data law."""
    sigma0 = 0.3
    schedule = sampling.timesteps(40, 1.0)
    x_init = jax.random.normal(jax.random.PRNGKey(0), (4000, 1, 2))
    run = self.variant(lambda x, k: sampling.sample(
        _gaussian_velocity(sigma0), x, schedule, k, window_start=5, window_size=window,
        noise_level=0.7))
    out = run(x_init, jax.random.PRNGKey(1))
    chex.assert_shape(out.x_final, x_init.shape)
    chex.assert_tree_all_finite(out.x_final)
    np.testing.assert_allclose(float(jnp.std(out.x_final)), sigma0, rtol=0.06)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rollout_records_the_window(self):
    schedule = sampling.timesteps(10, 3.0)
    x0 = jnp.full((2, 3, 4), 0.25)
    velocity = lambda x, t: (x - x0) / t[:, None, None]  # exact for data concentrated at x0
    x_init = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
    out = self.variant(lambda x, k: sampling.sample(velocity, x, schedule, k, window_start=2,
                                                    window_size=3, noise_level=0.7))(
        x_init, jax.random.PRNGKey(2))
    chex.assert_shape([out.window_x, out.window_x_next, out.window_mean], (3,) + x0.shape)
    chex.assert_shape([out.window_t, out.window_t_next], (3,))
    chex.assert_shape(out.window_log_prob, (3, 2))
    chex.assert_trees_all_close(out.window_t, schedule[2:5], rtol=1e-6)
    chex.assert_trees_all_close(out.window_t_next, schedule[3:6], rtol=1e-6)
    # Consecutive window steps chain, and every recorded log-prob re-scores exactly.
    chex.assert_trees_all_close(out.window_x[1], out.window_x_next[0])
    for w in range(3):
      v = velocity(out.window_x[w], jnp.full((2,), out.window_t[w]))
      step = sampling.sde_step(out.window_x[w], v, out.window_t[w], out.window_t_next[w],
                               schedule[1], 0.7, x_next=out.window_x_next[w])
      chex.assert_trees_all_close(step.log_prob, out.window_log_prob[w], rtol=1e-5)
    # The Euler steps after the window land exactly on the data point.
    chex.assert_trees_all_close(out.x_final, x0, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_row_keys_make_a_row_independent_of_its_batch(self):
    schedule = sampling.timesteps(6, 3.0)
    velocity = lambda x, t: x * 0.5
    run = self.variant(lambda x, keys: sampling.sample(velocity, x, schedule, keys,
                                                       window_start=1, window_size=2).x_final)
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    chex.assert_shape(keys, (3, 2))
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 4))
    chex.assert_trees_all_close(run(x, keys)[1:2], run(x[1:2], keys[1:2]), rtol=1e-6)


class GuidanceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_cfg_text_channel_renorm(self):
    key = jax.random.PRNGKey(0)
    v, v_nt, v_ni = jax.random.normal(key, (3, 2, 5, 8))
    out = self.variant(lambda *vs: sampling.cfg_velocity(*vs, 4.0, 2.0, 0.0))(v, v_nt, v_ni)
    chex.assert_shape(out, v.shape)
    v_t = v_nt + 4.0 * (v - v_nt)
    scale = np.clip(np.linalg.norm(v, axis=-1, keepdims=True)
                    / (np.linalg.norm(v_t, axis=-1, keepdims=True) + 1e-8), 0.0, 1.0)
    expected = v_ni + 2.0 * (v_t * scale - v_ni)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
    # The renormed text-guided velocity is never longer than the conditional one, per token.
    guided = self.variant(lambda v, v_nt: sampling.cfg_velocity(v, v_nt, None, 4.0, 1.0))(v, v_nt)
    assert bool(jnp.all(jnp.linalg.norm(guided, axis=-1) <= jnp.linalg.norm(v, axis=-1) + 1e-5))
    unguided = self.variant(lambda v: sampling.cfg_velocity(v, None, None, 1.0, 1.0))(v)
    chex.assert_trees_all_equal(unguided, v)
    # A zero velocity (a fresh head) keeps gradients finite through the renorm.
    grad = self.variant(jax.grad(lambda x: sampling.cfg_velocity(x, x, x, 4.0, 2.0).sum()))(
        jnp.zeros((2, 3)))
    chex.assert_tree_all_finite(grad)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cfg_scales_may_be_traced(self):
    # A CFG interval switches the scales per step inside the sampler's scan: traced values.
    v, v_nt, v_ni = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 5, 8))
    cfg = self.variant(lambda s_t, s_i: sampling.cfg_velocity(v, v_nt, v_ni, s_t, s_i))
    chex.assert_trees_all_close(cfg(jnp.float32(4.0), jnp.float32(2.0)),
                                sampling.cfg_velocity(v, v_nt, v_ni, 4.0, 2.0), rtol=1e-6)
    chex.assert_trees_all_equal(cfg(jnp.float32(1.0), jnp.float32(2.0)), v)  # guidance off

  @chex.variants(with_jit=True, without_jit=True)
  def test_cfg_global_and_channel_renorm_as_bagel(self):
    v, v_nt, v_ni = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (3, 2, 5, 8)))
    guided = v_ni + 2.0 * ((v_nt + 4.0 * (v - v_nt)) - v_ni)  # both terms, then one renorm
    for renorm, axes in (("global", (1, 2)), ("channel", (2,))):
      norm = lambda x, axes=axes: np.sqrt((x * x).sum(axis=axes, keepdims=True))
      expected = guided * np.clip(norm(v) / (norm(guided) + 1e-8), 0.3, 1.0)
      cfg = self.variant(lambda *vs, renorm=renorm: sampling.cfg_velocity(*vs, 4.0, 2.0, 0.3,
                                                                          renorm))
      chex.assert_trees_all_close(cfg(v, v_nt, v_ni), expected, rtol=1e-5, atol=1e-6)
    # As in BAGEL, no text guidance means no guidance at all, image guidance included.
    off = self.variant(lambda *vs: sampling.cfg_velocity(*vs, 1.0, 2.0))(v, v_nt, v_ni)
    chex.assert_trees_all_close(off, v, rtol=0, atol=0)

  def test_cfg_refuses_unknown_renorm_and_missing_branches(self):
    v = jnp.zeros((1, 2, 3))
    with self.assertRaisesRegex(ValueError, "renorm_type"):
      sampling.cfg_velocity(v, v, v, 4.0, 2.0, 0.0, "spatial")
    with self.assertRaisesRegex(ValueError, "without text"):
      sampling.cfg_velocity(v, None, None, 4.0, 1.0)
    with self.assertRaisesRegex(ValueError, "without images"):
      sampling.cfg_velocity(v, v, None, 4.0, 2.0)


class SampleTokenTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_sample_token(self):
    logits = jnp.array([[0.0, 5.0, 1.0]])
    greedy = self.variant(lambda lg, k: sampling.sample_token(lg, k, 0.0))
    assert int(greedy(logits, jax.random.PRNGKey(0))[0]) == 1
    draw = self.variant(jax.vmap(lambda k: sampling.sample_token(logits, k, 1.0)))
    draws = draw(jax.random.split(jax.random.PRNGKey(0), 2000))
    chex.assert_shape(draws, (2000, 1))
    freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / 2000
    chex.assert_trees_all_close(freq, jax.nn.softmax(logits[0]), atol=0.03)
