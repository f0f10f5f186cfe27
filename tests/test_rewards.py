"""Rewards: SSIM against pytorch_msssim on real photographs; the semantic reward's formula; the
CLIP reward end to end (checkpoint file -> RL loader -> reward) against open_clip."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from absl.testing import parameterized
from PIL import Image
from pytorch_msssim import ssim as torch_ssim
from skimage import data as skdata

from robust_u1_jax import config_lib
from robust_u1_jax.models import clip
from robust_u1_jax.training import rewards, rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.torch_ref
class SsimTest(chex.TestCase):
  """SSIM jitted (as the RL step runs it) and eager, against pytorch_msssim."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("astronaut", (64, 64)), ("chelsea", (96, 128)),
                            ("coffee", (150, 200)))
  def test_ssim_matches_pytorch_msssim(self, name, size):
    clean = _photo(name, size)
    recovered = _degrade(clean, 0)
    expected = torch_ssim(recovered[None], clean[None], data_range=1.0, size_average=False,
                          win_size=11, win_sigma=1.5, K=(0.01, 0.03)).numpy()
    r, c = _to_jax(recovered, clean)
    ours = self.variant(rewards.ssim)(r, c)
    chex.assert_shape(ours, (1,))
    assert 0.2 < expected[0] < 0.95
    chex.assert_trees_all_close(ours, expected, atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ssim_resizes_a_reference_of_another_size(self):
    clean_big = _photo("astronaut", (128, 96))
    clean = F.interpolate(clean_big[None], size=(64, 48), mode="bilinear", align_corners=False)[0]
    recovered = _degrade(clean, 1)
    expected = torch_ssim(recovered[None], clean[None], data_range=1.0, size_average=False).numpy()
    r, c_big = _to_jax(recovered, clean_big)
    chex.assert_trees_all_close(self.variant(rewards.ssim)(r, c_big), expected, atol=1e-4)


class RewardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ssim_is_one_per_image_batch(self):
    clean = _photo("chelsea", (48, 64))
    batch = jnp.concatenate(_to_jax(clean, _degrade(clean, 2)), axis=0)
    ref = jnp.concatenate(_to_jax(clean, clean), axis=0)
    values = self.variant(rewards.ssim)(batch, ref)
    chex.assert_shape(values, (2,))
    chex.assert_tree_all_finite(values)
    chex.assert_trees_all_close(values[0], 1.0, atol=1e-5)
    assert values[1] < 0.9

  @chex.variants(with_jit=True, without_jit=True)
  def test_semantic_reward_formula(self):
    # The embedding is a lookup by the image's first pixel: cosines 0.6, -1 (clamped to 0) and 1.
    table = jnp.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    embed = lambda imgs: table[imgs[:, 0, 0, 0].astype(jnp.int32)] * 3.0
    reward = self.variant(rewards.semantic_similarity(embed, alpha=5.0))
    imgs = lambda *ids: jnp.asarray(ids, jnp.float32)[:, None, None, None] * jnp.ones((1, 2, 2, 3))
    out = reward(imgs(1, 2, 0), imgs(0, 0, 0))
    chex.assert_shape(out, (3,))
    chex.assert_trees_all_close(out, np.asarray([np.exp(-5 * 0.4), np.exp(-5.0), 1.0]),
                                rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_reward_set_weights_and_registry(self):
    clean = _photo("astronaut", (48, 48))
    r, c = _to_jax(_degrade(clean, 3), clean)
    # Weights other than the release's 1.0 / 0.2 too: a weight of 1.0 would hide one ignored.
    for w_ssim, w_clip in ((1.0, 0.2), (0.5, 0.3)):
      rs = rewards.build_rewards({"ssim": w_ssim, "clip": w_clip},
                                 embed_image=lambda x: x.mean((1, 2)))
      parts = self.variant(lambda r, c: rs(r, c))(r, c)  # as the RL step calls it, in its jit
      assert set(parts) == {"ssim", "clip", "total"}
      chex.assert_shape(list(parts.values()), (1,))
      chex.assert_trees_all_close(parts["total"], w_ssim * parts["ssim"] + w_clip * parts["clip"],
                                  rtol=1e-6)
    ssim_only_set = rewards.build_rewards({"ssim": 1.0, "clip": 0.0})
    ssim_only = self.variant(lambda r, c: ssim_only_set(r, c))(r, c)
    assert set(ssim_only) == {"ssim", "total"}

  def test_registry_refuses_unknown_and_unbuildable_rewards(self):
    with self.assertRaisesRegex(ValueError, "available: ssim, clip"):
      rewards.build_rewards({"lpips": 1.0})
    with self.assertRaisesRegex(ValueError, "CLIP image tower"):
      rewards.build_rewards({"clip": 1.0})
    with self.assertRaisesRegex(ValueError, "every reward weight is zero"):
      rewards.build_rewards({"ssim": 0.0})


# -- the CLIP reward against open_clip -------------------------------------------------------------

ALPHA = 5.0


def _tiny_open_clip(seed=0):
  """A random open_clip CLIP of the shapes of `CLIPConfig.tiny()` (rl.clip_model='tiny')."""
  import open_clip
  c = clip.CLIPConfig.tiny()
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(
      embed_dim=c.embed_dim,
      vision_cfg=dict(layers=c.vision_layers, width=c.vision_width,
                      head_width=c.vision_width // c.vision_heads, patch_size=c.patch_size,
                      image_size=c.image_size, mlp_ratio=c.vision_mlp_dim / c.vision_width),
      text_cfg=dict(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                    heads=c.text_heads, layers=c.text_layers,
                    mlp_ratio=c.text_mlp_dim / c.text_width),
      quick_gelu=True)
  with torch.no_grad():  # LayerNorms start at 1/0: perturb every parameter
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
  """(open_clip model, RL config pointing at its .safetensors, (graphdef, state) from the RL
  stage's own loader)."""
  from safetensors.torch import save_file

  ref = _tiny_open_clip()
  path = str(tmp_path_factory.mktemp("clip") / "clip.safetensors")
  save_file({k: v.detach().contiguous() for k, v in ref.state_dict().items()}, path)
  config = config_lib.load(os.path.join(ROOT, "configs", "rl.py") + ":tiny", {
      "init_from": "random", "rl.clip_checkpoint": path, "rl.clip_model": "tiny",
      "rl.clip_alpha": ALPHA,
      "rl.reward_weights.ssim": 0.0, "rl.reward_weights.clip": 1.0})
  return ref, config, rl.load_clip_tower(config.rl)


@pytest.mark.torch_ref
@pytest.mark.slow
def test_rl_with_the_clip_reward_trains_on_a_mesh_of_several_devices(clip_setup, tmp_path):
  # The 8 test devices: the CLIP's weights live on the policy's mesh (they sat on device 0, and
  # creating the train state refused the mix of devices).
  from robust_u1_jax.training import trainer

  _, config, _ = clip_setup
  config = config_lib.load(os.path.join(ROOT, "configs", "rl.py") + ":tiny", {
      "init_from": "random", "rl.clip_checkpoint": config.rl.clip_checkpoint,
      "rl.clip_model": "tiny", "rl.reward_weights.clip": 0.2, "total_steps": 1,
      "checkpoint_every": 1, "log_every": 1, "data.batch_size": 8, "rl.group_size": 2,
      "rl.num_steps": 4, "rl.window_size": 1, "tensorboard": False, "eval_every": 0})
  assert jax.device_count() == 8
  (row,) = trainer.train(config, str(tmp_path), rl.build)
  assert np.isfinite(row["loss"]) and -1.0 <= row["reward_clip_mean"] <= 1.0


@pytest.mark.torch_ref
def test_a_clip_of_other_shapes_names_the_clip_model_field(clip_setup):
  from robust_u1_jax.checkpoints import key_table

  _, config, _ = clip_setup
  with config.unlocked():
    config.rl.clip_model = "vit_b32"  # the tiny CLIP's checkpoint read as a ViT-B/32
  with pytest.raises(key_table.CheckpointError,
                     match=r"clip.safetensors: tensor .* expects .*; rl.clip_model='vit_b32' "
                           r"reads .* set --config.rl.clip_model to the checkpoint's") as e:
    rl.load_clip_tower(config.rl)
  # The file as given, not its base name alone (the demo's is runs/demo/clip/model/...).
  assert str(e.value).startswith(f"{config.rl.clip_checkpoint}: ")


def _photo_u8(name, h, w):
  img = getattr(skdata, name)()[..., :3]
  return np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))


def _noisy_u8(img, seed):
  noise = np.random.default_rng(seed).normal(0.0, 20.0, img.shape)
  return np.clip(img + noise, 0, 255).astype(np.uint8)


def _clip_pairs():
  """Three (recovered, clean) pairs: a noisy recovery of the clean photo and two other photos.
  The recoveries (24 x 20, portrait) are enlarged to the tower's 32 x 32, the clean images (90 x
  120, landscape) shrunk: both resize directions, both crops, and a clean image of another size."""
  clean = _photo_u8("chelsea", 90, 120)
  recovered = np.stack([_noisy_u8(_photo_u8("chelsea", 24, 20), 0), _photo_u8("astronaut", 24, 20),
                        _photo_u8("coffee", 24, 20)])
  return recovered, np.stack([clean] * 3)


def _open_clip_reward(ref, recovered_u8, clean_u8, via):
  """The reward computed in torch with open_clip's eval transform: on PIL images (uint8, as
  `model, _, preprocess = open_clip.create_model_and_transforms(...)` is used on files) or on
  float CHW tensors in [0, 1] (the same transform objects, torchvision's tensor kernels)."""
  from open_clip.transform import image_transform

  transform = image_transform(ref.visual.image_size[0], is_train=False)

  def embed(images):
    if via == "pil":
      x = torch.stack([transform(Image.fromarray(i)) for i in images])
    else:
      x = torch.stack([transform(torch.from_numpy(i).permute(2, 0, 1).float() / 255.0)
                       for i in images])
    with torch.no_grad():
      return ref.encode_image(x, normalize=True)

  cos = (embed(recovered_u8) * embed(clean_u8)).sum(-1).clamp(0.0, 1.0)
  return torch.exp(-ALPHA * (1.0 - cos)).numpy(), cos.numpy()


def _our_clip_reward(graphdef, state, recovered_u8, clean_u8):
  """The 'clip' reward as the RL stage composes it: the loaded tower, `clip.preprocess` at the
  tower's image size, `rewards.build_rewards` with rl.clip_alpha."""
  from flax import nnx

  model = nnx.merge(graphdef, state)
  embed = nnx.jit(lambda m, x: m.encode_image(clip.preprocess(x, m.config.image_size)))
  reward_set = rewards.build_rewards({"clip": 1.0}, alpha=ALPHA,
                                     embed_image=lambda x: embed(model, x))
  to_float = lambda x: jnp.asarray(x, jnp.float32) / 255.0  # as rl.rollout hands over images
  return np.asarray(reward_set(to_float(recovered_u8), to_float(clean_u8))["clip"])


@pytest.mark.torch_ref
def test_clip_reward_matches_open_clip(clip_setup):
  ref, _, (graphdef, state) = clip_setup
  recovered, clean = _clip_pairs()
  ours = _our_clip_reward(graphdef, state, recovered, clean)
  want, cos = _open_clip_reward(ref, recovered, clean, via="tensor")
  assert 0.5 < cos.min() and cos.max() < 0.9999, cos  # not clamped: the formula is exercised
  # The same float pipeline (Keys cubic a = -0.5, antialiased when shrinking, same sizes and
  # crop): float32 round-off only (measured 1.1e-6).
  np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)
  # open_clip on PIL images resizes in 8 bits: it rounds and clips after the horizontal and again
  # after the vertical pass (0.4/255 per pixel on average here, up to 13/255 where the cubic
  # overshoots past 0 or 1 on the noisy image). `clip.preprocess` stays in float: it matches PIL's
  # resize of float ("F" mode) images to 1e-6 per pixel, and with 8-bit rounding after each pass
  # added it reproduces this reference to 1.3e-4. The rounding alone moves the reward of this
  # random tower by up to 2.3e-3 (measured).
  want_pil, _ = _open_clip_reward(ref, recovered, clean, via="pil")
  np.testing.assert_allclose(ours, want_pil, atol=3e-3, rtol=0)


@pytest.mark.torch_ref
def test_rl_reward_fn_gives_the_same_clip_reward(clip_setup):
  ref, config, (graphdef, state) = clip_setup
  recovered, clean = _clip_pairs()
  reward_fn = jax.jit(rl.reward_fn_from_config(config.rl, graphdef))
  got = reward_fn(jnp.asarray(recovered, jnp.float32) / 255.0,
                  jnp.asarray(clean, jnp.float32) / 255.0, {"clip": state})
  want, _ = _open_clip_reward(ref, recovered, clean, via="tensor")
  np.testing.assert_allclose(np.asarray(got["clip"]), want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(got["total"]), want, atol=1e-5, rtol=0)
