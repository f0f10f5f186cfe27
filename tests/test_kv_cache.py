"""KV cache: prefill + incremental decoding and cached denoising equal the uncached forward."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax.models import attention_mask as am
from robust_u1_jax.models import qwen2_mot
from robust_u1_jax.models.kv_cache import KVCache

CONFIG = qwen2_mot.LLMConfig.tiny()
D = CONFIG.hidden_size


@pytest.fixture(scope="module")
def model():
  return qwen2_mot.Qwen2MoT(CONFIG, rngs=nnx.Rngs(0))


def _rows(samples_per_row, length):
  packed = [am.pack_samples(samples, length) for samples in samples_per_row]
  layout = jax.tree.map(jnp.asarray, am.stack_layouts([p[0] for p in packed]))
  return layout, jnp.asarray(np.stack([p[1] for p in packed]))


@nnx.jit
def full_forward(model, x, positions, layout, route):
  return model(x, positions, am.packed_mask(layout), route)


def reference(model, blocks_per_row, xs, length=24):
  """Uncached forward, one sample per row padded to `length` (one compile for every test);
  non-text blocks use the generation expert."""
  layout, positions = _rows([[blocks] for blocks in blocks_per_row], length)
  x = jnp.stack([jnp.pad(x, ((0, length - x.shape[0]), (0, 0))) for x in xs])
  route = ~layout.causal & (layout.sample_id >= 0)
  return full_forward(model, x, positions, layout, route), positions


@nnx.jit
def prefill(model, cache, x, positions, layout, route):
  valid = layout.sample_id >= 0
  return model.prefill(cache, x, positions, am.packed_mask(layout), route, valid)


@nnx.jit
def decode(model, cache, x):
  return model.decode(cache, x)


@nnx.jit(static_argnames="route")
def extend(model, cache, x, positions, mask, route):
  return model.extend(cache, x, positions, mask, route)


def test_prefill_then_decode_equals_full_forward(model):
  """Row 0: 10-token prompt; row 1: 7-token prompt padded to 10. Then an image block is appended
  to both contexts (bidirectional, generation expert), then 3 text tokens decoded one by one."""
  prompt_lens, img, steps, s_max = (10, 7), 4, 3, 24
  key = jax.random.key(0)
  prompt = jax.random.normal(key, (2, 10, D))
  image = jax.random.normal(jax.random.fold_in(key, 1), (2, img, D))
  text = jax.random.normal(jax.random.fold_in(key, 2), (2, steps, D))

  layout, positions = _rows([[[("text", n)]] for n in prompt_lens], 10)
  cache = model.init_cache(2, s_max)
  hidden, cache = prefill(model, cache, prompt, positions, layout, jnp.zeros((2, 10), bool))
  chex.assert_shape([cache.next_position, cache.length], [(2,), ()])
  chex.assert_trees_all_equal(cache.next_position, np.asarray(prompt_lens, np.int32))
  img_pos = cache.next_position[:, None] + jnp.zeros((1, img), jnp.int32)
  img_hidden, cache = extend(model, cache, image, img_pos, jnp.ones((2, img, img), bool),
                                 route="gen")
  step_hidden = []
  for i in range(steps):
    h, cache = decode(model, cache, text[:, i:i + 1])
    step_hidden.append(h[:, 0])
  assert int(cache.length) == 10 + img + steps
  chex.assert_trees_all_equal(cache.next_position, np.asarray(prompt_lens, np.int32) + 1 + steps)

  # Uncached reference: each row as one packed sample [text, image, text] without padding.
  blocks = [[("text", n), ("image", img), ("text", steps)] for n in prompt_lens]
  xs = [jnp.concatenate([prompt[r, :n], image[r], text[r]]) for r, n in enumerate(prompt_lens)]
  ref, _ = reference(model, blocks, xs)
  decoded = jnp.stack(step_hidden, 1)
  for row, n in enumerate(prompt_lens):
    chex.assert_trees_all_close(hidden[row, :n], ref[row, :n], atol=1e-5)
    chex.assert_trees_all_close(img_hidden[row], ref[row, n:n + img], atol=1e-5)
    chex.assert_trees_all_close(decoded[row], ref[row, n + img:n + img + steps], atol=1e-5)
    # Logits too (the decoding path uses them).
    chex.assert_trees_all_close(model.logits(decoded[row]),
                               model.logits(ref[row, n + img:n + img + steps]), atol=1e-4)


def test_denoise_equals_full_forward_with_noisy_block(model):
  """Context [text, clean VAE image (gen expert), text] cached once; the noisy latents run alone."""
  ctx_blocks = [[("text", 5), ("image", 6), ("text", 3)], [("text", 3), ("image", 6), ("text", 2)]]
  ctx_len, n_noisy = 14, 8
  key = jax.random.key(3)
  ctx = jax.random.normal(key, (2, ctx_len, D))
  noisy = jax.random.normal(jax.random.fold_in(key, 1), (2, n_noisy, D))
  layout, positions = _rows([[b] for b in ctx_blocks], ctx_len)
  route = ~layout.causal & (layout.sample_id >= 0)
  cache = model.init_cache(2, 16)
  _, cache = prefill(model, cache, ctx, positions, layout, route)
  noisy_pos = cache.next_position[:, None] + jnp.zeros((1, n_noisy), jnp.int32)
  denoise = nnx.jit(lambda m, c, x, p: m.denoise(c, x, p))
  got = denoise(model, cache, noisy, noisy_pos)
  got_again = denoise(model, cache, noisy * 0.5, noisy_pos)  # the cache was not modified
  chex.assert_shape([got, got_again], (2, n_noisy, D))

  lens = [sum(length for _, length in blocks) for blocks in ctx_blocks]
  full_blocks = [blocks + [("noisy", n_noisy)] for blocks in ctx_blocks]
  for x_noisy, out in ((noisy, got), (noisy * 0.5, got_again)):
    xs = [jnp.concatenate([ctx[r, :n], x_noisy[r]]) for r, n in enumerate(lens)]
    ref, ref_positions = reference(model, full_blocks, xs)
    for row, n in enumerate(lens):
      chex.assert_trees_all_equal(ref_positions[row, n:n + n_noisy], noisy_pos[row])
      chex.assert_trees_all_close(out[row], ref[row, n:n + n_noisy], atol=1e-5)


def test_cache_is_a_pytree_and_checks_room():
  cache = KVCache.create(2, 1, 4, 2, 8)
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 5 and cache.max_length == 4
  moved = jax.jit(lambda c: c.replace(length=c.length + 1))(cache)
  assert int(moved.length) == 1 and isinstance(moved, KVCache)
  chex.assert_trees_all_equal_shapes_and_dtypes(moved, cache)  # a jitted update keeps its type
  with pytest.raises(ValueError, match="KV cache overflow: 1 slots used \\+ 4 new > max_length 4"):
    moved.check_room(4)
