"""BAGEL packed mask: brute force from the rules, and packing equals running samples alone."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax.models import attention_mask as am
from robust_u1_jax.models import qwen2_mot


def _brute_force(samples, length):
  """The rules of docs/design.md#packed-sequences-and-the-attention-mask, token pair by token pair,
  from the block lists directly."""
  tokens = []  # (sample, block index within the sample, kind, offset within block)
  for s, blocks in enumerate(samples):
    for j, (kind, n) in enumerate(blocks):
      tokens += [(s, j, kind, o) for o in range(n)]
  mask = np.zeros((length, length), bool)
  for qi, (qs, qb, qkind, qo) in enumerate(tokens):
    for ki, (ks, kb, kkind, ko) in enumerate(tokens):
      if qs != ks:
        continue  # samples are isolated
      if kb == qb:
        mask[qi, ki] = ko <= qo if qkind == "text" else True
      elif kb < qb:
        mask[qi, ki] = kkind != "noisy"  # nothing outside a noisy block attends to it
  return mask  # padding rows and columns stay False


def _random_samples(rng, length):
  samples, used = [], 0
  while True:
    blocks = [(str(rng.choice(am.BLOCK_KINDS)), int(rng.randint(1, 6)))
              for _ in range(rng.randint(1, 5))]
    n = sum(b[1] for b in blocks)
    if used + n > length:
      return samples
    samples.append(blocks)
    used += n


class PackedMaskTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_packed_mask_equals_brute_force_on_random_layouts(self):
    rng = np.random.RandomState(0)
    length = 40
    rows = [_random_samples(rng, length) for _ in range(12)]
    layouts = am.stack_layouts([am.pack_samples(s, length)[0] for s in rows])
    mask = self.variant(am.packed_mask)(jax.tree.map(jnp.asarray, layouts))
    chex.assert_shape(mask, (12, length, length))
    chex.assert_type(mask, bool)
    for i, samples in enumerate(rows):
      np.testing.assert_array_equal(mask[i], _brute_force(samples, length), err_msg=str(samples))
    assert any(sum(n for b in s for _, n in b) < length for s in rows)  # padding was exercised


def test_positions_and_layout_fields():
  blocks = [("text", 3), ("image", 4), ("noisy", 2), ("text", 2)]
  chex.assert_trees_all_equal(am.positions_from_blocks(blocks),
                              np.array([0, 1, 2, 3, 3, 3, 3, 4, 4, 5, 6]))
  layout, positions = am.pack_samples([blocks, [("text", 2)]], 16)
  chex.assert_shape([positions, *jax.tree.leaves(layout)], (16,))
  chex.assert_trees_all_equal(layout.sample_id, np.array([0] * 11 + [1] * 2 + [-1] * 3))
  chex.assert_trees_all_equal(layout.block_id, np.array([0] * 3 + [1] * 4 + [2] * 2 + [3] * 2
                                                        + [4] * 2 + [5] * 3))
  chex.assert_trees_all_equal(positions[11:13], np.array([0, 1]))
  assert layout.noisy.sum() == 2 and layout.causal.sum() == 7


def test_bad_layouts_are_rejected():
  with pytest.raises(ValueError, match="unknown block kind 'video'"):
    am.layout_from_blocks([("video", 3)])
  with pytest.raises(ValueError, match="do not fit"):
    am.pack_samples([[("text", 10)]], 8)


def test_packing_matches_each_sample_alone():
  """Row 0 packs two samples; rows 1 and 2 hold each alone (padded): outputs must agree."""
  model = qwen2_mot.Qwen2MoT(qwen2_mot.LLMConfig.tiny(), rngs=nnx.Rngs(0))
  a = [("text", 5), ("image", 6), ("text", 3), ("noisy", 4)]
  b = [("text", 4), ("image", 3), ("noisy", 5)]
  length = 36
  rows = [am.pack_samples([a, b], length), am.pack_samples([a], length),
          am.pack_samples([b], length)]
  layout = am.stack_layouts([r[0] for r in rows])
  positions = jnp.asarray(np.stack([r[1] for r in rows]))
  layout = jax.tree.map(jnp.asarray, layout)
  gen = layout.noisy | (~layout.causal & (layout.block_id % 2 == 1))  # some clean blocks gen too
  x = jax.random.normal(jax.random.key(1), (3, length, 64))
  # The same token embeddings in every row at each sample's tokens.
  x = x.at[1, :18].set(x[0, :18]).at[2, :12].set(x[0, 18:30])
  gen = gen.at[1, :18].set(gen[0, :18]).at[2, :12].set(gen[0, 18:30])
  out = nnx.jit(lambda m, *args: m(*args))(model, x, positions, am.packed_mask(layout), gen)
  chex.assert_shape(out, x.shape)
  chex.assert_trees_all_close(out[0, :18], out[1, :18], atol=1e-5)
  chex.assert_trees_all_close(out[0, 18:30], out[2, :12], atol=1e-5)
