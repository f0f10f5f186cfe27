"""The BAGEL packed attention mask, built from per-token layout arrays with static shapes.

A packed row holds several samples, each a sequence of blocks:
  text   causal within the block, sees every earlier block of its sample;
  image  bidirectional within the block (ViT or clean VAE tokens), sees earlier blocks;
  noisy  a generation target: bidirectional within itself, sees earlier blocks, and no other
         token attends to it;
  pad    fills the row: attends nothing and is attended by nothing.
Samples never see each other. The mask is a pure function of four (B, T) arrays, so it is built
inside jit from data the pipeline produces, instead of shipping (T, T) masks through the input
pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BLOCK_KINDS = ("text", "image", "noisy")


@flax.struct.dataclass
class Layout:
  """Per-token description of a packed row; every field is (B, T) (or (T,) before batching).

  sample_id: which packed sample a token belongs to; negative for padding.
  block_id: increases from one block to the next along the row (unique per block in a row).
  causal: True inside text blocks (causal), False inside image and noisy blocks.
  noisy: True inside noisy (generation target) blocks.
  """
  sample_id: jax.Array
  block_id: jax.Array
  causal: jax.Array
  noisy: jax.Array


def packed_mask(layout: Layout) -> jax.Array:
  """(B, T, T) bool, True where query t may attend key s under the BAGEL rules."""
  sample, block = layout.sample_id, layout.block_id
  t = sample.shape[-1]
  valid = sample >= 0
  idx = jnp.arange(t)
  same_sample = (sample[..., :, None] == sample[..., None, :]) & valid[..., :, None] & valid[
      ..., None, :]
  same_block = block[..., :, None] == block[..., None, :]
  earlier_block = block[..., None, :] < block[..., :, None]
  causal_ok = ~layout.causal[..., :, None] | (idx[None, :] <= idx[:, None])
  visible_key = ~layout.noisy[..., None, :] | same_block
  return same_sample & visible_key & (earlier_block | (same_block & causal_ok))


def layout_from_blocks(blocks: Sequence[tuple[str, int]], *, sample_id: int = 0,
                       first_block_id: int = 0) -> dict[str, np.ndarray]:
  """Numpy layout (T,) fields for one sample given as [(kind, length), ...] blocks."""
  sample, block, causal, noisy = [], [], [], []
  for j, (kind, length) in enumerate(blocks):
    if kind not in BLOCK_KINDS:
      raise ValueError(f"unknown block kind {kind!r}; allowed: {BLOCK_KINDS}")
    if length <= 0:
      raise ValueError(f"block {j} ({kind}) has length {length}; lengths must be positive")
    sample += [sample_id] * length
    block += [first_block_id + j] * length
    causal += [kind == "text"] * length
    noisy += [kind == "noisy"] * length
  return dict(sample_id=np.asarray(sample, np.int32), block_id=np.asarray(block, np.int32),
              causal=np.asarray(causal, bool), noisy=np.asarray(noisy, bool))


def positions_from_blocks(blocks: Sequence[tuple[str, int]], start: int = 0) -> np.ndarray:
  """RoPE positions (T,) for one sample: text advances per token, an image block shares one."""
  out, pos = [], start
  for kind, length in blocks:
    if kind == "text":
      out += list(range(pos, pos + length))
      pos += length
    else:
      out += [pos] * length
      pos += 1
  return np.asarray(out, np.int32)


def pack_samples(samples: Sequence[Sequence[tuple[str, int]]], length: int
                 ) -> tuple[Layout, np.ndarray]:
  """Packs samples into one row of `length` tokens: (Layout of (T,) arrays, positions (T,)).

  Positions restart at 0 for each sample; padding gets sample_id -1, position 0 and a block id
  of its own.
  """
  parts, positions, next_block = [], [], 0
  for i, blocks in enumerate(samples):
    parts.append(layout_from_blocks(blocks, sample_id=i, first_block_id=next_block))
    positions.append(positions_from_blocks(blocks))
    next_block += len(blocks)
  used = sum(len(p) for p in positions)
  if used > length:
    raise ValueError(f"pack_samples: {used} tokens do not fit in a row of {length}")
  pad = length - used
  parts.append(dict(sample_id=np.full(pad, -1, np.int32), block_id=np.full(pad, next_block,
                                                                           np.int32),
                    causal=np.zeros(pad, bool), noisy=np.zeros(pad, bool)))
  positions.append(np.zeros(pad, np.int32))
  fields = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return Layout(**fields), np.concatenate(positions)


def stack_layouts(layouts: Sequence[Layout]) -> Layout:
  """Rows of equal length -> one batched Layout (B, T)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *layouts)
