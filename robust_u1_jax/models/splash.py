"""The Pallas splash-attention kernel (TPU) for the two masks the model's towers use
(docs/design.md#fused-attention); `attention.attention` decides when it runs.

  packed  self-attention over BAGEL's packed rows (`attention.PackedMask`: the LLM's rows,
          SigLIP's images).
  keys    new tokens against a KV cache where every valid query sees every valid key
          (`attention.KeyMask`: a noisy latent block denoised against its cached context).

How splash takes the packed mask. The kernel's dynamic inputs are per-token segment ids (a key is
visible only where the query's and the key's ids are equal), a per-query int32 (`q_sequence`)
handed with the key index to a static mask function, and the tile tables of its `MaskInfo` (which
kv tile each step loads, which tiles run). The static `NumpyMask` path needs the (T, T) mask at
trace time, and the kernel's dynamic-mask path ships the whole (T, T) mask in tiles: one byte per
pair, 1 GiB per 32k row. Neither suits packed rows. Segment ids plus one interval per query cannot
express the mask either: a noisy block is hidden from the later tokens of its sample but must see
its own, and a sample with two noisy blocks and text after them has no key order in which every
token's visible keys form one interval of one segment. So the keys are laid out twice, a row of
2T keys: the first T are every token with noisy keys hidden (their segment id matches no query),
the last T are every token again with only the noisy keys visible. Then, with X, Y per query,

  key s < T visible   iff  segment equal and s <= X
  key T + u visible   iff  segment equal and X < u <= Y

text: X = Y = t; image (clean): X = Y = the block's last index; noisy: X = the block's first
index - 1, Y = its last index; padding: its own segment id, X = Y = t (it sees itself only, so no
row is empty; the result is zeroed). (X + 1, Y) travel packed in the query's int32 (16 bits each,
hence T <= 65,535). The tile tables are computed per row from per-tile bounds of these arrays
(conservative: a tile that runs may still be all masked), so tiles outside each sample, above each
text diagonal and in the second half outside the noisy blocks are skipped. Only O(T) values and
(T / 512) x (2T / 1024) tile entries per row are built, never a (T, T) array. The per-token bounds
rely on what `attention_mask.Layout` states: each block is one contiguous run of tokens and block
ids increase along the row.

The key mask is segment ids alone (no mask function): valid queries and keys id 1, invalid ones
id 2. Queries and keys are padded to multiples of 128 with id 2, the keys by at least one, so an
invalid or padding query always has a key to see (a finite result, zeroed afterwards, with a
finite gradient); the tiles of a valid query tile against an all-invalid kv tile (the short
no-image guidance context, padded to the longest) are skipped.

Both backward passes run the kernel's separate dq kernel (its fused backward writes a partial dq
per kv tile: 64 copies of dq for a 32k row). The tile tables are built here as the kernel's
`MaskInfo` (its documented fields), with the kernel's public `SplashAttentionKernel`,
`SegmentIds` and `BlockSizes` of the installed jax (0.10).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import sharding
from robust_u1_jax.models import attention_mask

Array = jax.Array

# Rows a multiple of the lane width; (X + 1, Y) in 16 bits each.
ALIGN = 128
MAX_PACKED_LENGTH = 65_535
# A key segment id no query has.
_HIDDEN = -1
# The key mask's segment ids.
_VALID, _INVALID = 1, 2


def takes_packed(q_len: int, kv_len: int) -> bool:
  """Whether the packed path takes these lengths: self-attention over rows of a multiple of 128
  tokens up to 65,535."""
  return q_len == kv_len and q_len % ALIGN == 0 and 0 < q_len <= MAX_PACKED_LENGTH


@dataclasses.dataclass(frozen=True)
class PackedMaskFunction:
  """The splash kernel's mask function (module docstring): `q_sequence` holds (X + 1) << 16 | Y
  per query; keys at or after `length` are the second copy. Hashable by value (a static argument
  of the kernel's jit)."""
  length: int

  def __call__(self, q_packed: Array, k_index: Array) -> Array:
    upper = jax.lax.shift_right_arithmetic(q_packed, 16) & 0xFFFF  # X + 1
    last = q_packed & 0xFFFF  # Y
    head = k_index < self.length
    u = k_index - self.length
    return (head & (k_index < upper)) | (~head & (u >= upper) & (u <= last))


def _largest_divisor(length: int, options: tuple[int, ...]) -> int:
  return next(o for o in options if length % o == 0)


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  """Tile sizes of the splash kernel: q tiles of `block_q`, kv tiles of `block_kv`."""
  block_q: int
  block_kv: int
  block_kv_compute: int

  @classmethod
  def for_lengths(cls, q_len: int, kv_len: int) -> SplashBlocks:
    """The largest tiles dividing both lengths (multiples of 128). A packed row passes its own
    length as kv_len, so no kv tile straddles the two key copies."""
    block_kv = _largest_divisor(kv_len, (1024, 512, 256, 128))
    return cls(block_q=_largest_divisor(q_len, (512, 256, 128)), block_kv=block_kv,
               block_kv_compute=min(block_kv, 512))

  @classmethod
  def for_length(cls, length: int) -> SplashBlocks:
    return cls.for_lengths(length, length)

  def kernel_sizes(self):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    return sk.BlockSizes(block_q=self.block_q, block_kv=self.block_kv,
                         block_kv_compute=self.block_kv_compute, block_q_dkv=self.block_q,
                         block_kv_dkv=self.block_kv, block_kv_dkv_compute=self.block_kv_compute,
                         block_q_dq=self.block_q, block_kv_dq=self.block_kv,
                         use_fused_bwd_kernel=False)


def splash_row_inputs(layout: attention_mask.Layout, has_noisy: bool = True
                      ) -> dict[str, Array]:
  """The splash kernel's per-token inputs of one packed row ((T,) layout fields): segment ids of
  the queries (T,) and keys (2T, or T without noisy blocks) and the packed (X + 1, Y) per
  query."""
  sample, block = layout.sample_id, layout.block_id
  t = sample.shape[-1]
  idx = jnp.arange(t, dtype=jnp.int32)
  change = (block[1:] != block[:-1]) | (sample[1:] != sample[:-1])
  first = jnp.concatenate([jnp.ones((1,), bool), change])
  last = jnp.concatenate([change, jnp.ones((1,), bool)])
  start = jax.lax.cummax(jnp.where(first, idx, 0))
  end = jax.lax.cummin(jnp.where(last, idx, t - 1), reverse=True)
  valid = sample >= 0
  noisy = layout.noisy & valid
  hi = jnp.where(layout.causal, idx, end)
  x = jnp.where(valid, jnp.where(noisy, start - 1, hi), idx)
  y = jnp.where(valid, hi, idx)
  # Padding: ids above every sample's, one per token, so each pad token sees itself only.
  own = jnp.max(jnp.where(valid, sample, -1)) + 1 + idx
  q_seg = jnp.where(valid, sample, own).astype(jnp.int32)
  kv_seg = jnp.where(valid, jnp.where(noisy, _HIDDEN, sample), own).astype(jnp.int32)
  if has_noisy:
    kv_seg = jnp.concatenate([kv_seg, jnp.where(noisy, sample, _HIDDEN).astype(jnp.int32)])
  packed = jax.lax.shift_left(x + 1, 16) | y
  return dict(q_seg=q_seg, kv_seg=kv_seg, packed=packed.astype(jnp.int32), x=x, y=y)


def _fill(run: Array, axis: int) -> Array:
  """Tile table `data_next` along `axis`: a running tile's own index; a skipped tile the next
  running tile's (else the last one's, else 0), so skipped steps load nothing new."""
  n = run.shape[axis]
  shape = [1, 1]
  shape[axis] = n
  index = jnp.arange(n, dtype=jnp.int32).reshape(shape)
  nxt = jax.lax.cummin(jnp.where(run, index, n), axis=axis, reverse=True)
  prev = jax.lax.cummax(jnp.where(run, index, -1), axis=axis)
  return jnp.where(run, index, jnp.where(nxt < n, nxt, jnp.maximum(prev, 0)))


def splash_tiles(inputs: dict[str, Array], length: int, blocks: SplashBlocks) -> Array:
  """(T / block_q, S / block_kv) bool: the packed row's tiles that may hold a visible pair (a
  superset)."""
  t, bq, bkv = length, blocks.block_q, blocks.block_kv
  big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
  nq = t // bq
  q_seg = inputs["q_seg"].reshape(nq, bq)
  upper = (inputs["x"] + 1).reshape(nq, bq)
  last = inputs["y"].reshape(nq, bq)
  tail = upper <= last  # queries with keys in the second copy
  q_lo, q_hi = q_seg.min(1), q_seg.max(1)
  head_upper = upper.max(1)  # keys s < this may be visible
  tail_lo = jnp.where(tail, upper, big).min(1)
  tail_hi = jnp.where(tail, last, small).max(1)

  kv_seg = inputs["kv_seg"]
  nk = kv_seg.shape[0] // bkv
  seen = (kv_seg != _HIDDEN).reshape(nk, bkv)
  k_seg = kv_seg.reshape(nk, bkv)
  k_lo = jnp.where(seen, k_seg, big).min(1)
  k_hi = jnp.where(seen, k_seg, small).max(1)
  pos = jnp.arange(nk * bkv, dtype=jnp.int32).reshape(nk, bkv)
  p_lo = jnp.where(seen, pos, big).min(1)
  p_hi = jnp.where(seen, pos, small).max(1)
  is_head = jnp.arange(nk) * bkv < t

  segments = (q_lo[:, None] <= k_hi[None]) & (k_lo[None] <= q_hi[:, None])
  head = is_head[None] & (p_lo[None] < head_upper[:, None])
  tail_ok = (~is_head[None] & (p_lo[None] - t <= tail_hi[:, None])
             & (tail_lo[:, None] <= p_hi[None] - t))
  return segments & (head | tail_ok)


def key_mask_tiles(q_seg: Array, kv_seg: Array, blocks: SplashBlocks) -> Array:
  """(Tq / block_q, S / block_kv) bool: the key mask's tiles holding a visible pair (exact: a
  tile runs when it holds a query and a key of the same id)."""
  def has(seg, block, value):
    return (seg == value).reshape(-1, block).any(1)

  valid = has(q_seg, blocks.block_q, _VALID)[:, None] & has(kv_seg, blocks.block_kv, _VALID)[None]
  invalid = (has(q_seg, blocks.block_q, _INVALID)[:, None]
             & has(kv_seg, blocks.block_kv, _INVALID)[None])
  return valid | invalid


def _small(table: Array, bound: int) -> Array:
  """Scalar-memory tables as narrow as their values allow (as the kernel's own mask info)."""
  if bound <= np.iinfo(np.int8).max:
    return table.astype(jnp.int8)
  if bound <= np.iinfo(np.int16).max:
    return table.astype(jnp.int16)
  return table.astype(jnp.int32)


def _kernel_call(q_htd: Array, k_ktd: Array, v_ktd: Array, q_seg: Array, kv_seg: Array,
                 run: Array, blocks: SplashBlocks, *, q_sequence: Array | None = None,
                 mask_function: Callable | None = None, interpret: bool) -> Array:
  """One row on the kernel: q (H, T, D) already scaled, k / v (K, S, D), the tiles that run
  (T / block_q, S / block_kv) -> (H, T, D)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi

  nq, nk = run.shape
  block_mask = run.astype(jnp.int8)[None]

  def info(data_next, bound):
    return mi.MaskInfo(data_next=_small(data_next, bound)[None], mask_next=None,
                       block_mask=block_mask, partial_mask_blocks=None, q_sequence=q_sequence)

  # dq has its own kernel (same tiles as the forward): the fused backward kernel would write a
  # partial dq per kv tile.
  forward = info(_fill(run, 1), nk)
  kernel = sk.SplashAttentionKernel(
      forward, forward, info(_fill(run, 0), nq),
      block_sizes=blocks.kernel_sizes(), is_mqa=False, save_residuals=False,
      mask_value=sk.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
      # The kernel's output and log-sum-exp, saved by remat='minimal'.
      residual_checkpoint_name="attention_out",
      mask_function=mask_function, interpret=interpret)
  return kernel(q_htd, k_ktd, v_ktd, sk.SegmentIds(q_seg, kv_seg))


def _packed_row(q_htd: Array, k_ktd: Array, v_ktd: Array, layout: attention_mask.Layout, *,
                has_noisy: bool, interpret: bool, blocks: SplashBlocks | None) -> Array:
  t = q_htd.shape[1]
  blocks = blocks or SplashBlocks.for_length(t)
  inputs = splash_row_inputs(layout, has_noisy)
  if has_noisy:
    k_ktd = jnp.concatenate([k_ktd, k_ktd], axis=1)
    v_ktd = jnp.concatenate([v_ktd, v_ktd], axis=1)
  return _kernel_call(q_htd, k_ktd, v_ktd, inputs["q_seg"], inputs["kv_seg"],
                      splash_tiles(inputs, t, blocks), blocks, q_sequence=inputs["packed"],
                      mask_function=PackedMaskFunction(t), interpret=interpret)


def _key_mask_row(q_htd: Array, k_ktd: Array, v_ktd: Array, q_valid: Array, k_valid: Array, *,
                  interpret: bool) -> Array:
  t, s = q_htd.shape[1], k_ktd.shape[1]
  tp = -(-t // ALIGN) * ALIGN
  sp = (s // ALIGN + 1) * ALIGN  # at least one padding key (module docstring)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0)))
  q_seg = jnp.pad(jnp.where(q_valid, _VALID, _INVALID), (0, tp - t), constant_values=_INVALID)
  kv_seg = jnp.pad(jnp.where(k_valid, _VALID, _INVALID), (0, sp - s), constant_values=_INVALID)
  blocks = SplashBlocks.for_lengths(tp, sp)
  out = _kernel_call(pad(q_htd, tp), pad(k_ktd, sp), pad(v_ktd, sp), q_seg.astype(jnp.int32),
                     kv_seg.astype(jnp.int32), key_mask_tiles(q_seg, kv_seg, blocks), blocks,
                     interpret=interpret)
  return out[:, :t]


def packed(q_bthd: Array, k_bshd: Array, v_bshd: Array, layout: attention_mask.Layout, *,
           has_noisy: bool = True, scale: float, interpret: bool = False,
           blocks: SplashBlocks | None = None) -> Array:
  """Packed-row self-attention (module docstring); (B, T, H, D), padding tokens zero."""
  b, t, _, _ = q_bthd.shape
  if not takes_packed(t, k_bshd.shape[1]):
    raise ValueError(f"splash attention takes self-attention over rows of a multiple of {ALIGN} "
                     f"tokens up to {MAX_PACKED_LENGTH}; got T={t}, S={k_bshd.shape[1]}")
  row = lambda q, k, v, lay: _packed_row(q, k, v, lay, has_noisy=has_noisy,  # noqa: E731
                                         interpret=interpret, blocks=blocks)
  return _per_device(row, q_bthd, k_bshd, v_bshd, layout, layout.sample_id >= 0, scale)


def key_mask(q_bthd: Array, k_bshd: Array, v_bshd: Array, q_valid_bt: Array, k_valid_bs: Array,
             *, scale: float, interpret: bool = False) -> Array:
  """Every valid query against every valid key, any lengths (module docstring); (B, T, H, D),
  invalid queries zero."""
  row = lambda q, k, v, valid: _key_mask_row(q, k, v, *valid,  # noqa: E731
                                             interpret=interpret)
  return _per_device(row, q_bthd, k_bshd, v_bshd, (q_valid_bt, k_valid_bs), q_valid_bt, scale)


def _per_device(row: Callable, q_bthd: Array, k_bshd: Array, v_bshd: Array, row_inputs,
                q_valid_bt: Array, scale: float) -> Array:
  """`row(q (H, T, D), k, v (K, S, D), its row_inputs)` over the rows, queries scaled, invalid
  queries zeroed. Under a mesh the kernel runs per device (`shard_map`): rows split like the
  activations' `batch` axis, heads like `act_heads` when the mesh divides both head counts."""
  b, _, h, _ = q_bthd.shape
  kh = k_bshd.shape[2]
  if h % kh:
    raise ValueError(f"attention: {h} query heads are not a multiple of {kh} key/value heads")

  def rows(q, k, v, row_inputs, q_valid):
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    one = lambda q, k, v, x: row(  # noqa: E731
        q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), x).swapaxes(0, 1)
    out = jax.vmap(one)(q, k, v, row_inputs)
    return jnp.where(q_valid[:, :, None, None], out, 0).astype(q.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return rows(q_bthd, k_bshd, v_bshd, row_inputs, q_valid_bt)
  rules = sharding.RULES["llm"]
  spec = sharding.logical_to_spec(("batch", "length", "act_heads", None), rules, mesh)
  batch_axes, head_axes = spec[0], spec[2]

  def size(axes):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)

  if b % size(batch_axes):
    batch_axes = None
  if h % size(head_axes) or kh % size(head_axes):
    head_axes = None
  P = jax.sharding.PartitionSpec
  heads_spec = P(batch_axes, None, head_axes, None)
  row_spec = P(batch_axes, None)
  inputs_spec = jax.tree.map(lambda _: row_spec, row_inputs)
  return jax.shard_map(rows, mesh=mesh,
                       in_specs=(heads_spec, heads_spec, heads_spec, inputs_spec, row_spec),
                       out_specs=heads_spec, check_vma=False)(q_bthd, k_bshd, v_bshd, row_inputs,
                                                              q_valid_bt)
