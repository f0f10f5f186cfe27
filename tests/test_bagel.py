"""The unified BAGEL model over packed rows: KV-cached denoising equals the full forward, packed
samples are isolated, noisy blocks are invisible, latent tokens and positions, sharded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import sharding
from robust_u1_jax.data import sequence as seq
from robust_u1_jax.models import bagel

CFG = bagel.BagelConfig.tiny()  # LLM hidden 64, 4 heads / 2 KV heads: divisible by fsdp 4, tensor 2
MK = seq.Markers(3, 4)
_rng = np.random.default_rng(0)
IMG_A = _rng.uniform(-1, 1, (16, 24, 3)).astype(np.float32)
IMG_B = _rng.uniform(-1, 1, (24, 16, 3)).astype(np.float32)
CONTEXT_A = [seq.Latent(32, 48), seq.Vit(IMG_A), seq.Text([5, 6, 7, 8])]
NOISY_A = seq.Latent(32, 48, noisy=True)
# Text after the generation target: it must not see the noisy block.
SAMPLE_A = CONTEXT_A + [NOISY_A, seq.Text([9, 10, 11])]
SAMPLE_B = [seq.Text([12, 13]), seq.Vit(IMG_B), seq.Latent(48, 32, noisy=True)]
T_A, NV_A, NL_A = seq.lengths(SAMPLE_A, *seq.strides(CFG))
T_B, NV_B, NL_B = seq.lengths(SAMPLE_B, *seq.strides(CFG))
NL_CLEAN_A = seq.lengths(CONTEXT_A, *seq.strides(CFG))[2]
T_NOISY = 0.7


def assert_close(got, want, rel):
  got, want = np.asarray(got), np.asarray(want)
  scale = max(float(np.abs(want).max()), 1e-6)
  err = float(np.abs(got - want).max())
  assert err <= rel * scale, f"max error {err} > {rel} x scale {scale}"


@nnx.jit
def forward(model, inputs, latents, timesteps):
  hidden = model(inputs, latents, timesteps)
  return hidden, model.velocity(hidden, inputs.latent_seq_index), model.text_logits(hidden)


def _pad(x, n):
  return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])


@pytest.fixture(scope="module")
def batch():
  """Four rows: [A, B] packed, A alone, B alone, A alone with other noisy latents."""
  inputs = seq.build_rows([[SAMPLE_A, SAMPLE_B], [SAMPLE_A], [SAMPLE_B], [SAMPLE_A]], CFG, MK,
                          seq_len=T_A + T_B, max_vit=NV_A + NV_B, max_latent=NL_A + NL_B)
  rng = np.random.default_rng(1)
  c, n = CFG.latent_channels, NL_A + NL_B
  lat_a = rng.standard_normal((NL_A, c)).astype(np.float32)
  lat_b = rng.standard_normal((NL_B, c)).astype(np.float32)
  lat_a2 = lat_a.copy()
  lat_a2[NL_CLEAN_A:] = rng.standard_normal((NL_A - NL_CLEAN_A, c))
  t_a = np.where(np.arange(NL_A) < NL_CLEAN_A, 0.0, T_NOISY).astype(np.float32)
  t_b = np.full(NL_B, 0.4, np.float32)
  latents = np.stack([np.concatenate([lat_a, lat_b]), _pad(lat_a, n), _pad(lat_b, n),
                      _pad(lat_a2, n)])
  timesteps = np.stack([np.concatenate([t_a, t_b]), _pad(t_a, n), _pad(t_b, n), _pad(t_a, n)])
  return jax.tree.map(jnp.asarray, inputs), jnp.asarray(latents), jnp.asarray(timesteps)


@pytest.fixture(scope="module")
def model(random_bagel):
  return random_bagel(CFG, seed=3)


@pytest.fixture(scope="module")
def outputs(model, batch):
  return forward(model, *batch)


def test_cached_denoising_equals_full_forward(model, batch, outputs):
  _, latents, _ = batch
  _, velocity, _ = outputs
  full = velocity[1, NL_CLEAN_A:NL_A]  # A alone: its noisy block, computed over the whole row

  t, nv, nl = seq.lengths(CONTEXT_A, *seq.strides(CFG))
  context = jax.tree.map(jnp.asarray, seq.build_rows([[CONTEXT_A]], CFG, MK, seq_len=t + 2,
                                                     max_vit=nv, max_latent=nl))
  n_noisy = NL_A - NL_CLEAN_A
  block = jax.tree.map(jnp.asarray, seq.build_rows([[[NOISY_A]]], CFG, MK, seq_len=n_noisy + 2,
                                                   max_vit=0, max_latent=n_noisy))

  @nnx.jit
  def cached(m, x_t):
    cache = m.prefill(m.init_cache(1, 64), context, latents[1:2, :nl], jnp.zeros((1, nl)))
    return m.denoise_velocity(cache, block, x_t, jnp.array([T_NOISY]))

  got = cached(model, latents[1:2, NL_CLEAN_A:NL_A])
  assert float(jnp.abs(full).max()) > 1e-2
  assert_close(got[0], full, rel=1e-5)


@pytest.mark.parametrize("field,bad", [
    ("positions", lambda x: x[:, :-1]),  # a row one token short
    ("vit_patches", lambda x: x[..., :-1]),  # patches of another ViT patch size
    ("latent_image_index", lambda x: x[:1]),  # one batch row only
    ("layout", lambda layout: layout.replace(noisy=layout.noisy[:, :-2])),
])
def test_wrong_input_shapes_fail_at_the_model_naming_the_field(model, batch, field, bad):
  inputs, latents, timesteps = batch
  wrong = inputs.replace(**{field: bad(getattr(inputs, field))})
  with pytest.raises(AssertionError, match=rf"SequenceInputs\.{field}"):
    model(wrong, latents, timesteps)
  with pytest.raises(AssertionError, match="latents_bnc"):
    model(inputs, latents[:, :-1], timesteps)


def test_step_images_of_the_wrong_layout_fail_before_the_vae(model, batch):
  from robust_u1_jax.inference import context

  inputs, _, _ = batch
  images = jnp.zeros((4, 2, 32, 48, 3), jnp.uint8)  # (B, K, H, W, 3): K images per row
  with pytest.raises(AssertionError, match="images_bkhwc"):
    context.encode_images(model, images[:, 0])  # the K axis left out
  with pytest.raises(AssertionError, match="images_bkhwc"):
    context.encode_images(model, jnp.moveaxis(images, -1, 2))  # channels first
  tokens = jax.eval_shape(lambda: context.encode_images(model, images))
  with pytest.raises(AssertionError, match="one image stack per row"):
    context.gather_latents(jnp.zeros((3,) + tokens.shape[1:]), inputs)


def test_packed_samples_match_running_each_alone(outputs):
  hidden, velocity, logits = outputs
  assert_close(velocity[0, :NL_A], velocity[1, :NL_A], rel=1e-5)
  assert_close(velocity[0, NL_A:NL_A + NL_B], velocity[2, :NL_B], rel=1e-5)
  assert_close(hidden[0, :T_A], hidden[1, :T_A], rel=1e-5)
  assert_close(hidden[0, T_A:], hidden[2, :T_B], rel=1e-5)
  assert_close(logits[0, :T_A], logits[1, :T_A], rel=1e-5)
  assert_close(logits[0, T_A:], logits[2, :T_B], rel=1e-5)


def test_noisy_block_is_invisible_to_other_tokens(batch, outputs):
  inputs, _, _ = batch
  hidden, velocity, _ = outputs
  noisy = np.asarray(inputs.layout.noisy[1, :T_A])
  kind = np.asarray(inputs.token_kind[1, :T_A])
  assert noisy.sum() == NL_A - NL_CLEAN_A + 2  # the block's latent tokens and its two markers
  # Rows 1 and 3 differ only in the noisy latents: the block itself changes ...
  assert float(jnp.abs(velocity[1, NL_CLEAN_A:NL_A] - velocity[3, NL_CLEAN_A:NL_A]).max()) > 1e-3
  # ... every other token, the text after the block included, does not.
  later_text = (kind == bagel.TEXT) & ~noisy & (np.arange(T_A) > np.flatnonzero(noisy).max())
  assert later_text.sum() == 3
  np.testing.assert_allclose(np.asarray(hidden[3, :T_A][~noisy]),
                             np.asarray(hidden[1, :T_A][~noisy]), rtol=0, atol=1e-6)


def test_rope_positions_and_latent_position_ids(batch):
  inputs, _, _ = batch
  # Latent block (markers + 6 tokens) at 0, ViT block at 1, text 2..5, noisy block 6, text 7..9.
  expected = [0] * 8 + [1] * 8 + [2, 3, 4, 5] + [6] * 8 + [7, 8, 9]
  np.testing.assert_array_equal(np.asarray(inputs.positions[1, :T_A]), expected)
  # 32 x 48 px -> a 2 x 3 grid of latent tokens (16 px each), ids h * max_latent_size + w.
  grid_a = bagel.latent_position_ids(32, 48, CFG.latent_downsample, CFG.max_latent_size)
  np.testing.assert_array_equal(grid_a, [0, 1, 2, 8, 9, 10])
  grid_b = bagel.latent_position_ids(48, 32, CFG.latent_downsample, CFG.max_latent_size)
  np.testing.assert_array_equal(np.asarray(inputs.latent_position_ids[0, :NL_A + NL_B]),
                                np.concatenate([grid_a, grid_a, grid_b]))
  with pytest.raises(ValueError, match="at most 8"):
    bagel.latent_position_ids(16 * 9, 32, CFG.latent_downsample, CFG.max_latent_size)


def test_latent_patchify_matches_bagel_and_round_trips():
  p, c, h, w = CFG.latent_patch_size, CFG.vae.z_channels, 4, 6
  z_bhwc = np.random.default_rng(2).standard_normal((2, h, w, c)).astype(np.float32)
  tokens = np.asarray(bagel.patchify_latents(jnp.asarray(z_bhwc), p))
  assert tokens.shape == (2, (h // p) * (w // p), p * p * c)
  # BAGEL: latent (C, H, W) -> reshape (C, h, p, w, p) -> einsum chpwq->hwpqc -> (h w, p p C).
  for b in range(2):
    z_chw = z_bhwc[b].transpose(2, 0, 1)
    ref = np.einsum("chpwq->hwpqc", z_chw.reshape(c, h // p, p, w // p, p)).reshape(-1, p * p * c)
    np.testing.assert_array_equal(tokens[b], ref)
  back = bagel.unpatchify_latents(jnp.asarray(tokens), h, w, p)
  np.testing.assert_array_equal(np.asarray(back), z_bhwc)


def test_sharded_forward_matches_single_device(model, batch, outputs):
  # The parameters are placed by the same logical rules `sharding.create_sharded` uses
  # (`state_shardings` with `bagel.COMPONENTS`); initialising through create_sharded itself would
  # add ~35 s of XLA compile of the RNG initialisers on CPU.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  graphdef, state = nnx.split(model)
  sharded = nnx.merge(graphdef, jax.device_put(
      state, sharding.state_shardings(state, bagel.COMPONENTS, mesh)))
  kernel = sharded.language_model.layers.und.mlp.up_proj.kernel.get_value()
  assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")  # (layers, embed, mlp)
  assert len(kernel.addressable_shards) == 8 and not kernel.sharding.is_fully_replicated
  with jax.set_mesh(mesh):
    got = forward(sharded, *batch)
  for g, w in zip(got, outputs):
    assert_close(g, w, rel=1e-5)
