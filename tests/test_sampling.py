"""Samplers: schedule, Euler, Flow-GRPO SDE step and log-prob, CFG renorm, windowed rollouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from robust_u1_jax import sampling


def test_schedule_ends_and_shift():
  t = sampling.timesteps(50, 3.0)
  assert t.shape == (50,) and float(t[0]) == 1.0 and float(t[-1]) == 0.0
  assert bool(jnp.all(jnp.diff(t) < 0))
  # shift 3 keeps more of the schedule at high noise than no shift.
  assert float(t[25]) > float(sampling.timesteps(50, 1.0)[25])
  with pytest.raises(ValueError, match="num_steps"):
    sampling.timesteps(1, 1.0)


def test_sde_log_prob_equals_gaussian_density():
  key = jax.random.PRNGKey(0)
  x, v = jax.random.normal(key, (2, 2, 6, 4))
  step = sampling.sde_step(x, v, 0.6, 0.5, 0.95, 0.7, key=jax.random.PRNGKey(1))
  std = 0.7 * np.sqrt(0.6 / 0.4) * np.sqrt(0.1)
  dt = -0.1
  s_std = 0.7 * np.sqrt(0.6 / 0.4)
  mean = np.asarray(x) * (1 + s_std**2 / 1.2 * dt) + np.asarray(v) * (1 + s_std**2 * 0.4 / 1.2) * dt
  np.testing.assert_allclose(step.mean, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(step.std, std, rtol=1e-6)
  direct = stats.norm.logpdf(np.asarray(step.x_next), mean, std).reshape(2, -1).mean(-1)
  np.testing.assert_allclose(step.log_prob, direct, rtol=1e-5)
  # Scoring the recorded sample under the same velocity reproduces its log-prob.
  again = sampling.sde_step(x, v, 0.6, 0.5, 0.95, 0.7, x_next=step.x_next)
  np.testing.assert_allclose(again.log_prob, step.log_prob, rtol=1e-6)


def test_sde_std_avoids_the_singularity_at_one():
  std = sampling.sde_std(jnp.asarray(1.0), jnp.asarray(0.98), 1.3)
  np.testing.assert_allclose(std, 1.3 * np.sqrt(1.0 / 0.02), rtol=1e-5)


def _gaussian_velocity(sigma0):
  """Exact velocity E[eps - x0 | x_t] for data x0 ~ N(0, sigma0^2)."""
  def velocity(x, t):
    t = t[:, None, None]
    var = (1 - t) ** 2 * sigma0**2 + t**2
    return x * (t - (1 - t) * sigma0**2) / var
  return velocity


@pytest.mark.parametrize("window", [0, 3])
def test_sampler_keeps_the_marginals(window):
  """With the exact velocity of Gaussian data, ODE and SDE steps both end at the data law."""
  sigma0 = 0.3
  schedule = sampling.timesteps(40, 1.0)
  x_init = jax.random.normal(jax.random.PRNGKey(0), (4000, 1, 2))
  out = jax.jit(lambda x, k: sampling.sample(
      _gaussian_velocity(sigma0), x, schedule, k, window_start=5, window_size=window,
      noise_level=0.7))(x_init, jax.random.PRNGKey(1))
  np.testing.assert_allclose(float(jnp.std(out.x_final)), sigma0, rtol=0.06)


def test_rollout_records_the_window():
  schedule = sampling.timesteps(10, 3.0)
  x0 = jnp.full((2, 3, 4), 0.25)
  velocity = lambda x, t: (x - x0) / t[:, None, None]  # exact for data concentrated at x0
  x_init = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  out = sampling.sample(velocity, x_init, schedule, jax.random.PRNGKey(2), window_start=2,
                        window_size=3, noise_level=0.7)
  np.testing.assert_allclose(out.window_t, schedule[2:5], rtol=1e-6)
  np.testing.assert_allclose(out.window_t_next, schedule[3:6], rtol=1e-6)
  # Consecutive window steps chain, and every recorded log-prob re-scores exactly.
  np.testing.assert_allclose(out.window_x[1], out.window_x_next[0])
  for w in range(3):
    v = velocity(out.window_x[w], jnp.full((2,), out.window_t[w]))
    step = sampling.sde_step(out.window_x[w], v, out.window_t[w], out.window_t_next[w],
                             schedule[1], 0.7, x_next=out.window_x_next[w])
    np.testing.assert_allclose(step.log_prob, out.window_log_prob[w], rtol=1e-5)
  # The Euler steps after the window land exactly on the data point.
  np.testing.assert_allclose(out.x_final, x0, atol=1e-5)


def test_cfg_text_channel_renorm():
  key = jax.random.PRNGKey(0)
  v, v_nt, v_ni = jax.random.normal(key, (3, 2, 5, 8))
  out = sampling.cfg_velocity(v, v_nt, v_ni, 4.0, 2.0, 0.0)
  v_t = v_nt + 4.0 * (v - v_nt)
  scale = np.clip(np.linalg.norm(v, axis=-1, keepdims=True)
                  / (np.linalg.norm(v_t, axis=-1, keepdims=True) + 1e-8), 0.0, 1.0)
  expected = v_ni + 2.0 * (v_t * scale - v_ni)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # The renormed text-guided velocity is never longer than the conditional one, per token.
  guided = sampling.cfg_velocity(v, v_nt, None, 4.0, 1.0)
  assert bool(jnp.all(jnp.linalg.norm(guided, axis=-1) <= jnp.linalg.norm(v, axis=-1) + 1e-5))
  np.testing.assert_array_equal(sampling.cfg_velocity(v, None, None, 1.0, 1.0), v)
  # A zero velocity (a fresh head) keeps gradients finite through the renorm.
  grad = jax.grad(lambda x: sampling.cfg_velocity(x, x, x, 4.0, 2.0).sum())(jnp.zeros((2, 3)))
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_sample_token():
  logits = jnp.array([[0.0, 5.0, 1.0]])
  assert int(sampling.sample_token(logits, jax.random.PRNGKey(0), 0.0)[0]) == 1
  draws = jax.vmap(lambda k: sampling.sample_token(logits, k, 1.0))(
      jax.random.split(jax.random.PRNGKey(0), 2000))
  freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / 2000
  np.testing.assert_allclose(freq, jax.nn.softmax(logits[0]), atol=0.03)


def test_cfg_global_and_channel_renorm_as_bagel():
  v, v_nt, v_ni = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (3, 2, 5, 8)))
  guided = v_ni + 2.0 * ((v_nt + 4.0 * (v - v_nt)) - v_ni)  # both terms, then one renorm
  for renorm, axes in (("global", (1, 2)), ("channel", (2,))):
    norm = lambda x: np.sqrt((x * x).sum(axis=axes, keepdims=True))
    expected = guided * np.clip(norm(v) / (norm(guided) + 1e-8), 0.3, 1.0)
    out = sampling.cfg_velocity(v, v_nt, v_ni, 4.0, 2.0, 0.3, renorm)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # As in BAGEL, no text guidance means no guidance at all, image guidance included.
  np.testing.assert_array_equal(sampling.cfg_velocity(v, v_nt, v_ni, 1.0, 2.0), v)
  with pytest.raises(ValueError, match="renorm_type"):
    sampling.cfg_velocity(v, v_nt, v_ni, 4.0, 2.0, 0.0, "spatial")
