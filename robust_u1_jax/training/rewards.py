"""Recovery rewards for Flow-GRPO (docs/design.md#rewards), chosen by name from a registry.

Every reward maps (recovered, clean) image batches, float in [0, 1] and (B, H, W, 3), to one value
per image; `RewardSet` weights and sums them and reports each part for logging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import dm_pix
import jax
import jax.numpy as jnp

RewardFn = Callable[[jax.Array, jax.Array], jax.Array]


def match_size(reference: jax.Array, like: jax.Array) -> jax.Array:
  """Bilinear resize of `reference` to `like`'s height and width (half-pixel centres, no
  antialiasing: the semantics of torch's F.interpolate(mode='bilinear', align_corners=False))."""
  if reference.shape[1:3] == like.shape[1:3]:
    return reference
  shape = (reference.shape[0],) + like.shape[1:3] + (reference.shape[3],)
  return jax.image.resize(reference, shape, "bilinear", antialias=False)


def ssim(recovered: jax.Array, clean: jax.Array) -> jax.Array:
  """Per-image SSIM: Gaussian window 11, sigma 1.5, valid convolution, K = (0.01, 0.03), data
  range 1, averaged over pixels and RGB channels; the clean image is resized to the recovery's
  size."""
  recovered = recovered.astype(jnp.float32)
  clean = match_size(clean.astype(jnp.float32), recovered)
  return dm_pix.ssim(recovered, clean, max_val=1.0, filter_size=11, filter_sigma=1.5,
                     k1=0.01, k2=0.03)


def semantic_similarity(embed_image: Callable[[jax.Array], jax.Array], alpha: float) -> RewardFn:
  """exp(-alpha (1 - cos)) of L2-normalised image embeddings, cos clamped to [0, 1].

  `embed_image` maps [0, 1] images of any size to embeddings (a frozen CLIP tower with its own
  preprocessing); the clean image goes through the same tower at its own size.
  """
  def reward(recovered: jax.Array, clean: jax.Array) -> jax.Array:
    a = embed_image(recovered.astype(jnp.float32))
    b = embed_image(clean.astype(jnp.float32))
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    cos = jnp.clip(jnp.sum(a * b, axis=-1), 0.0, 1.0)
    return jnp.exp(-alpha * (1.0 - cos))

  return reward


@dataclasses.dataclass(frozen=True)
class RewardSet:
  """Weighted sum of named rewards; `__call__` returns every part and the 'total'."""
  fns: Mapping[str, RewardFn]
  weights: Mapping[str, float]

  def __call__(self, recovered: jax.Array, clean: jax.Array) -> dict[str, jax.Array]:
    parts = {name: fn(recovered, clean) for name, fn in self.fns.items()}
    parts["total"] = sum(self.weights[name] * value for name, value in parts.items())
    return parts


REWARDS = ("ssim", "clip")


def build_rewards(weights: Mapping[str, float], *, alpha: float = 5.0,
                  embed_image: Callable[[jax.Array], jax.Array] | None = None) -> RewardSet:
  """Builds the configured rewards; a zero weight leaves that reward out (no CLIP pass)."""
  unknown = sorted(set(weights) - set(REWARDS))
  if unknown:
    raise ValueError(f"unknown reward(s) {unknown}; available: {', '.join(REWARDS)}")
  fns: dict[str, RewardFn] = {}
  for name, weight in weights.items():
    if weight == 0:
      continue
    if name == "ssim":
      fns[name] = ssim
    elif name == "clip":
      if embed_image is None:
        raise ValueError("the 'clip' reward needs a CLIP image tower (rl.clip_checkpoint)")
      fns[name] = semantic_similarity(embed_image, alpha)
  if not fns:
    raise ValueError(f"every reward weight is zero: {dict(weights)}")
  return RewardSet(fns, {k: float(weights[k]) for k in fns})
