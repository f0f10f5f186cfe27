"""Text decoding from a cached context: greedy or temperature sampling, one compiled loop.

As BAGEL's `gen_text`, decoding starts by feeding `<|im_start|>` after the context and stops at a
stop token (BAGEL's `<|im_end|>`; the reasoner adds its action tokens) or after `max_new_tokens`.
The loop is a `lax.while_loop` over a single-token step that appends to the cache, so any number of
tokens runs one program; rows stop independently (a finished row's further tokens are written as
invalid slots). The caller keeps the returned cache (the text stays in the context as the model
wrote it, the reasoner's way) or its own (BAGEL's `gen_text`: the text re-enters as a block).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from robust_u1_jax import sampling
from robust_u1_jax.models import bagel as bagel_lib
from robust_u1_jax.models.kv_cache import KVCache

Array = jax.Array


class Generated(NamedTuple):
  tokens: Array  # (B, max_new_tokens) int32; the stop token included; -1 after it
  length: Array  # (B,) tokens produced, the stop token included
  stop: Array  # (B,) the stop token that ended the row, or -1 (ran out of tokens)
  cache: KVCache  # the context followed by the fed tokens (the start token and all but the last)


def generate(model: bagel_lib.Bagel, cache: KVCache, start_b: Array, key: Array, *,
             max_new_tokens: int, temperature: float, stop_ids: Sequence[int]) -> Generated:
  """Feeds `start_b` (B,) after the cached context, then the model's own tokens.

  The cache needs room for `max_new_tokens` more slots (`KVCache.grow`).
  """
  b = start_b.shape[0]
  stops = jnp.asarray(list(stop_ids), jnp.int32)
  causal = jnp.ones((b, 1, 1), bool)

  def body(carry):
    i, cache, token, done, out, key = carry
    key, draw = jax.random.split(key)
    x = model.language_model.embed(token[:, None])
    positions = cache.next_position[:, None]
    hidden, cache = model.language_model.extend(cache, x, positions, causal, "und",
                                                valid_bt=~done[:, None])
    logits = model.text_logits(hidden[:, -1])
    token = sampling.sample_token(logits, draw, temperature).astype(jnp.int32)
    out = out.at[:, i].set(jnp.where(done, -1, token))
    done = done | jnp.isin(token, stops)
    return i + 1, cache, token, done, out, key

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  init = (jnp.zeros((), jnp.int32), cache, start_b.astype(jnp.int32), jnp.zeros((b,), bool),
          jnp.full((b, max_new_tokens), -1, jnp.int32), key)
  _, cache, _, _, out, _ = jax.lax.while_loop(cond, body, init)
  length = jnp.sum(out >= 0, axis=1)
  last = jnp.take_along_axis(out, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
  stop = jnp.where((length > 0) & jnp.isin(last, stops), last, -1)
  return Generated(out, length, stop, cache)
