"""Flow-GRPO objective pieces (DESIGN section 5): group advantages, PPO-clip, KL to a reference.

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
  kl: jax.Array  # beta-free KL term, mean((mu - mu_ref)^2 / (2 std^2))
  clip_fraction: jax.Array
  approx_kl: jax.Array  # E[(ratio - 1) - log ratio], the k3 estimator of KL(old || new)
  log_ratio_mean: jax.Array


def ppo_clip_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                  clip_low: float, clip_high: float) -> tuple[jax.Array, jax.Array]:
  """mean(max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))) and the fraction of clipped ratios."""
  ratio = jnp.exp(log_prob - old_log_prob)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  clip_fraction = jnp.mean((jnp.abs(ratio - 1.0) > jnp.where(ratio > 1, clip_high, clip_low))
                           .astype(jnp.float32))
  return jnp.mean(jnp.maximum(unclipped, clipped)), clip_fraction


def mean_kl(mean: jax.Array, ref_mean: jax.Array, std: jax.Array) -> jax.Array:
  """KL between Gaussians sharing std: mean over samples of mean((mu - mu_ref)^2) / (2 std^2)."""
  batch = mean.shape[0]
  sq = ((mean - ref_mean) ** 2).reshape(batch, -1).mean(-1)
  return jnp.mean(sq / (2 * std.reshape(batch, -1)[:, 0] ** 2))


def flow_grpo_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, *,
                   clip_low: float, clip_high: float, beta: float = 0.0,
                   mean: jax.Array | None = None, ref_mean: jax.Array | None = None,
                   std: jax.Array | None = None) -> PolicyLoss:
  """The per-step Flow-GRPO loss; the KL term is computed only when beta > 0."""
  policy, clip_fraction = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_low, clip_high)
  kl = mean_kl(mean, ref_mean, std) if beta > 0 else jnp.zeros((), policy.dtype)
  log_ratio = log_prob - old_log_prob
  approx_kl = jnp.mean(jnp.exp(log_ratio) - 1.0 - log_ratio)
  return PolicyLoss(policy + beta * kl, policy, kl, clip_fraction, approx_kl, jnp.mean(log_ratio))
