"""Rewards: SSIM against pytorch_msssim on real photographs; the semantic reward's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as torch_ssim
from skimage import data as skdata

from robust_u1_jax.training import rewards


def _photo(name, size):
  img = getattr(skdata, name)()[..., :3].astype(np.float32) / 255.0
  t = torch.from_numpy(img).permute(2, 0, 1)[None]
  return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _degrade(x, seed):
  g = torch.Generator().manual_seed(seed)
  noisy = x + 0.08 * torch.randn(x.shape, generator=g)
  return F.avg_pool2d(noisy[None], 3, 1, 1)[0].clamp(0, 1)


def _to_jax(*tensors):
  return [jnp.asarray(t.permute(1, 2, 0).numpy())[None] for t in tensors]


@pytest.mark.parametrize("name,size", [("astronaut", (64, 64)), ("chelsea", (96, 128)),
                                       ("coffee", (150, 200))])
def test_ssim_matches_pytorch_msssim(name, size):
  clean = _photo(name, size)
  recovered = _degrade(clean, 0)
  expected = torch_ssim(recovered[None], clean[None], data_range=1.0, size_average=False,
                        win_size=11, win_sigma=1.5, K=(0.01, 0.03)).numpy()
  r, c = _to_jax(recovered, clean)
  ours = np.asarray(rewards.ssim(r, c))
  assert 0.2 < expected[0] < 0.95
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_ssim_resizes_a_reference_of_another_size():
  clean_big = _photo("astronaut", (128, 96))
  clean = F.interpolate(clean_big[None], size=(64, 48), mode="bilinear", align_corners=False)[0]
  recovered = _degrade(clean, 1)
  expected = torch_ssim(recovered[None], clean[None], data_range=1.0, size_average=False).numpy()
  r, c_big = _to_jax(recovered, clean_big)
  np.testing.assert_allclose(np.asarray(rewards.ssim(r, c_big)), expected, atol=1e-4)


def test_ssim_is_one_per_image_batch():
  clean = _photo("chelsea", (48, 64))
  batch = jnp.concatenate(_to_jax(clean, _degrade(clean, 2)), axis=0)
  ref = jnp.concatenate(_to_jax(clean, clean), axis=0)
  values = np.asarray(jax.jit(rewards.ssim)(batch, ref))
  assert values.shape == (2,)
  np.testing.assert_allclose(values[0], 1.0, atol=1e-5)
  assert values[1] < 0.9


def test_semantic_reward_formula():
  table = {0: jnp.array([1.0, 0.0]), 1: jnp.array([0.6, 0.8]), 2: jnp.array([-1.0, 0.0])}
  embed = lambda imgs: jnp.stack([table[int(i)] for i in imgs[:, 0, 0, 0]]) * 3.0
  reward = rewards.semantic_similarity(embed, alpha=5.0)
  imgs = lambda *ids: jnp.asarray(ids, jnp.float32)[:, None, None, None] * jnp.ones((1, 2, 2, 3))
  out = np.asarray(reward(imgs(1, 2, 0), imgs(0, 0, 0)))
  np.testing.assert_allclose(out, [np.exp(-5 * 0.4), np.exp(-5.0), 1.0], rtol=1e-6)


def test_reward_set_weights_and_registry():
  clean = _photo("astronaut", (48, 48))
  r, c = _to_jax(_degrade(clean, 3), clean)
  rs = rewards.build_rewards({"ssim": 1.0, "clip": 0.2}, embed_image=lambda x: x.mean((1, 2)))
  parts = rs(r, c)
  assert set(parts) == {"ssim", "clip", "total"}
  np.testing.assert_allclose(parts["total"], parts["ssim"] + 0.2 * parts["clip"], rtol=1e-6)
  assert set(rewards.build_rewards({"ssim": 1.0, "clip": 0.0})(r, c)) == {"ssim", "total"}
  with pytest.raises(ValueError, match="available: ssim, clip"):
    rewards.build_rewards({"lpips": 1.0})
  with pytest.raises(ValueError, match="CLIP image tower"):
    rewards.build_rewards({"clip": 1.0})
