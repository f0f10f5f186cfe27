"""Flow-GRPO objective pieces (docs/design.md#flow-grpo): group advantages, PPO-clip, KL to
a reference.

Pure functions of arrays, so the RL step composes them inside one jitted loss.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def group_advantages(rewards_bg: jax.Array, clip: float = 5.0, eps: float = 1e-4) -> jax.Array:
  """(R - mean_g) / (std_g + eps) within each group of G samples of one image, clipped to +-clip."""
  mean = rewards_bg.mean(axis=-1, keepdims=True)
  std = rewards_bg.std(axis=-1, keepdims=True)
  return jnp.clip((rewards_bg - mean) / (std + eps), -clip, clip)


class PolicyLoss(NamedTuple):
  loss: jax.Array
  policy_loss: jax.Array
  kl: jax.Array  # beta-free KL term, mean((mu - mu_ref)^2 / (2 sigma^2)) (`mean_kl`)
  clip_fraction: jax.Array
  approx_kl: jax.Array  # E[(ratio - 1) - log ratio], the k3 estimator of KL(old || new)
  log_ratio_mean: jax.Array
  # The importance ratio over the transitions taken: 1 up to rounding on the rollout's own
  # parameters, away from 1 once earlier updates of the same rollout moved the policy.
  ratio_mean: jax.Array
  ratio_min: jax.Array
  ratio_max: jax.Array


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """mean(x) over the entries where `mask` is true (all when None): a mini-batch's mean taken
  on a fixed-shape batch, so one compiled loss serves every mini-batch."""
  if mask is None:
    return jnp.mean(x)
  # An empty mask gives 0 rather than 0/0 (the RL step never makes one; see rl.minibatch_masks).
  return jnp.sum(jnp.where(mask, x, 0)) / jnp.maximum(jnp.sum(mask), 1).astype(x.dtype)


def ppo_clip_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                  clip_low: float, clip_high: float, mask: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """mean(max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))) and the fraction of clipped ratios,
  both over the transitions in `mask` (all when None)."""
  ratio = jnp.exp(log_prob - old_log_prob)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  clip_fraction = masked_mean(
      (jnp.abs(ratio - 1.0) > jnp.where(ratio > 1, clip_high, clip_low)).astype(jnp.float32), mask)
  return masked_mean(jnp.maximum(unclipped, clipped), mask), clip_fraction


def mean_kl(mean: jax.Array, ref_mean: jax.Array, std: jax.Array,
            mask: jax.Array | None = None) -> jax.Array:
  """The KL term: mean over samples (those in `mask`, all when None) of
  mean((mu - mu_ref)^2) / (2 std^2).

  The RL step passes the SDE's noise scale sigma = a sqrt(s / (1 - s)) as `std`, as Flow-GRPO's
  code divides, so its betas (0 to 0.04) carry over. The exact KL between the two steps'
  Gaussians (std sigma sqrt(-dt)) also divides by -dt, as Flow-GRPO's paper writes it: in the
  window's steps of a 15-step sampler (shift 3) the same beta would be 17 to 40 times stronger."""
  batch = mean.shape[0]
  sq = ((mean - ref_mean) ** 2).reshape(batch, -1).mean(-1)
  return masked_mean(sq / (2 * std.reshape(batch, -1)[:, 0] ** 2), mask)


def flow_grpo_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, *,
                   clip_low: float, clip_high: float, beta: float = 0.0,
                   mean: jax.Array | None = None, ref_mean: jax.Array | None = None,
                   std: jax.Array | None = None, mask: jax.Array | None = None) -> PolicyLoss:
  """The per-step Flow-GRPO loss; the KL term is computed only when beta > 0. `mask` (bool, like
  log_prob) selects the transitions of one mini-batch; every mean and statistic is over them."""
  policy, clip_fraction = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_low, clip_high,
                                        mask)
  kl = mean_kl(mean, ref_mean, std, mask) if beta > 0 else jnp.zeros((), policy.dtype)
  log_ratio = log_prob - old_log_prob
  ratio = jnp.exp(log_ratio)
  # expm1: off-policy log-ratios here are ~1e-4, where exp(x) - 1 - x in float32 cancels to 0
  # (the k3 value, ~x^2 / 2, is below the rounding of exp(x) near 1).
  approx_kl = masked_mean(jnp.expm1(log_ratio) - log_ratio, mask)
  taken = jnp.ones(ratio.shape, bool) if mask is None else mask
  ratio = jax.lax.stop_gradient(ratio)
  return PolicyLoss(policy + beta * kl, policy, kl, clip_fraction, approx_kl,
                    masked_mean(log_ratio, mask), masked_mean(ratio, mask),
                    jnp.min(jnp.where(taken, ratio, jnp.inf)),
                    jnp.max(jnp.where(taken, ratio, -jnp.inf)))
