"""Fixed-size key/value cache for the LLM: a pytree of arrays that passes through jit.

One cache row holds one sample's context. Slots are written in order at a shared write pointer
(`length`); a per-slot `valid` flag marks which slots hold real tokens, so rows whose prompts are
right-padded simply carry invalid slots, and RoPE positions are tracked per row
(`next_position`) independently of slot indices. Keys are stored after RoPE.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from robust_u1_jax.models import attention

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  k: Array  # (L, B, S, K, D) keys after RoPE and QK-norm
  v: Array  # (L, B, S, K, D)
  valid: Array  # (B, S) bool: slot holds a token that later queries may attend
  length: Array  # () int32: next slot to write, shared by all rows
  next_position: Array  # (B,) int32: RoPE position following the last valid token

  @classmethod
  def create(cls, num_layers: int, batch: int, max_length: int, kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> KVCache:
    shape = (num_layers, batch, max_length, kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               valid=jnp.zeros((batch, max_length), bool), length=jnp.zeros((), jnp.int32),
               next_position=jnp.zeros((batch,), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.k.shape[2]

  def attention_mask(self, mask_btt: Array | None, valid_bt: Array):
    """(B, T, S + T): new tokens see every valid cached slot, and each other by `mask_btt`.

    `mask_btt` None: valid new tokens see every valid cached slot and each other, invalid ones
    nothing, as an `attention.KeyMask` (which the fused kernels take without a (T, S) array).
    """
    if mask_btt is None:
      return attention.KeyMask(valid_bt, jnp.concatenate([self.valid, valid_bt], axis=1))
    b, t = valid_bt.shape
    cached_bts = jnp.broadcast_to(self.valid[:, None, :], (b, t, self.max_length))
    return jnp.concatenate([cached_bts, mask_btt & valid_bt[:, None, :]], axis=-1)

  def append(self, k_lbtkd: Array, v_lbtkd: Array, valid_bt: Array, positions_bt: Array
             ) -> KVCache:
    """Writes T new tokens at the write pointer; the caller must keep length + T <= S.

    Inside jit an overflowing write cannot raise, and XLA would clamp its start index; call
    `check_room` outside jit where lengths are concrete.
    """
    start = (0, 0, self.length, 0, 0)
    k = jax.lax.dynamic_update_slice(self.k, k_lbtkd.astype(self.k.dtype), start)
    v = jax.lax.dynamic_update_slice(self.v, v_lbtkd.astype(self.v.dtype), start)
    valid = jax.lax.dynamic_update_slice(self.valid, valid_bt, (0, self.length))
    last = jnp.max(jnp.where(valid_bt, positions_bt, -1), axis=-1)
    next_position = jnp.where(jnp.any(valid_bt, axis=-1), last + 1, self.next_position)
    return self.replace(k=k, v=v, valid=valid, length=self.length + valid_bt.shape[1],
                        next_position=next_position.astype(jnp.int32))

  def grow(self, min_free: int, multiple: int = 256) -> KVCache:
    """The same cache with room for at least `min_free` more tokens (host side, outside jit).

    Grows to a multiple of `multiple` slots, so a long conversation recompiles its steps at a few
    cache sizes only; returns `self` when there is room already.
    """
    need = int(self.length) + min_free
    if need <= self.max_length:
      return self
    new_max = -(-need // multiple) * multiple
    pad = new_max - self.max_length
    return self.replace(k=_pad_axis(self.k, 2, pad), v=_pad_axis(self.v, 2, pad),
                        valid=_pad_axis(self.valid, 1, pad))

  def check_room(self, new_tokens: int) -> None:
    """Raises (outside jit) when `new_tokens` more tokens would overflow the cache."""
    if int(self.length) + new_tokens > self.max_length:
      raise ValueError(f"KV cache overflow: {int(self.length)} slots used + {new_tokens} new > "
                       f"max_length {self.max_length}; create the cache with a larger max_length")


def concatenate(caches: list[KVCache]) -> KVCache:
  """Caches stacked along the batch (rows of the first, then the second, ...): the contexts of
  several guidance branches answered by one model call. Shorter caches are padded with invalid
  slots to the longest."""
  longest = max(c.max_length for c in caches)
  pad = lambda x, axis: _pad_axis(x, axis, longest - x.shape[axis])
  return KVCache(k=jnp.concatenate([pad(c.k, 2) for c in caches], axis=1),
                 v=jnp.concatenate([pad(c.v, 2) for c in caches], axis=1),
                 valid=jnp.concatenate([pad(c.valid, 1) for c in caches], axis=0),
                 length=jnp.max(jnp.stack([c.length for c in caches])),
                 next_position=jnp.concatenate([c.next_position for c in caches], axis=0))


def repeat_rows(cache: KVCache, times: int) -> KVCache:
  """Each row `times` times in a row: one prefill serves a group of samples of one context."""
  return cache.replace(k=jnp.repeat(cache.k, times, axis=1), v=jnp.repeat(cache.v, times, axis=1),
                       valid=jnp.repeat(cache.valid, times, axis=0),
                       next_position=jnp.repeat(cache.next_position, times, axis=0))


def _pad_axis(x: Array, axis: int, extra: int) -> Array:
  """x with `extra` zeros (invalid slots) appended along `axis`."""
  if not extra:
    return x
  return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
