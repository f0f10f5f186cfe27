"""One attention function for every tower, on the platform's kernel.

`attention(q, k, v, mask, implementation=...)` computes softmax attention with grouped-query heads
and picks the kernel (`choose`):

  xla     `layers.attention`: logits and softmax in float32, any mask; materialises the
          (B, H, T, S) scores. CPU, and the fallback everywhere.
  splash  TPU: the Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.
          splash_attention), flash attention that skips the tiles the mask leaves empty. It takes
          the BAGEL packed mask (`PackedMask`) of self-attention over rows whose length is a
          multiple of 128 (at most 65,408); other masks go to xla.
  cudnn   GPU: cuDNN flash attention through `jax.nn.dot_product_attention(...,
          implementation='cudnn')`, for bfloat16 / float16 inputs with head_dim a multiple of 8 up
          to 128. Without a mask it runs unmasked; a mask (a `PackedMask` materialised, a
          KV-cache mask) enters as cuDNN's additive bias of (B, 1, T, S), which needs T and S
          even: B T S half-precision values instead of xla's B H T S float32 scores. Everything
          else goes to xla.

`implementation` is a run's `attention` field: 'auto' means by platform (tpu: splash, gpu: cudnn,
else xla); an explicit kernel the platform, mask or shapes cannot take falls back to xla, so a
config runs everywhere. The platform is the one the program is compiled for: the devices of the
mesh in context (a TPU topology compiled ahead of time on a CPU host is 'tpu'), else JAX's
default backend.

How splash takes the packed mask (docs/design.md#fused-attention). The kernel's dynamic inputs are
per-token segment ids (a key is visible only where the query's and the key's ids are equal), a
per-query int32 (`q_sequence`) handed with the key index to a static mask function, and the tile
tables of its `MaskInfo` (which kv tile each step loads, which tiles run). The static `NumpyMask`
path needs the (T, T) mask at trace time, and the kernel's dynamic-mask path ships the whole
(T, T) mask in tiles: one byte per pair, 1 GiB per 32k row. Neither suits packed rows. Segment
ids plus one interval per query cannot express the mask either: a noisy block is hidden from the
later tokens of its sample but must see its own, and a sample with two noisy blocks and text after
them has no key order in which every token's visible keys form one interval of one segment. So the
keys are laid out twice, a row of 2T keys: the first T are every token with noisy keys hidden (their
segment id matches no query), the last T are every token again with only the noisy keys visible.
Then, with X, Y per query,

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
ids increase along the row. The backward pass runs the kernel's separate dq kernel (its fused
backward writes a partial dq per kv tile: 64 copies of dq for a 32k row).

The tile tables are built here as the kernel's `MaskInfo` (its documented fields), with the
kernel's public `SplashAttentionKernel`, `SegmentIds` and `BlockSizes` of the installed jax (0.10).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from robust_u1_jax import sharding
from robust_u1_jax.models import attention_mask, layers

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
GPU_PLATFORMS = ("gpu", "cuda")
# The kernel 'auto' picks per platform.
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
# splash: rows a multiple of the lane width; (X + 1, Y) in 16 bits each.
SPLASH_ALIGN = 128
SPLASH_MAX_LENGTH = 65_535
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128
# A key segment id no query has.
_HIDDEN = -1
# Platforms `emulate` stands in for (innermost last).
_EMULATED: list[str] = []


def check_implementation(name: str, field: str = "attention") -> str:
  """`name` if it is one of IMPLEMENTATIONS; else a ValueError naming `field`."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{field} = {name!r} is not an attention implementation; allowed: "
                     + ", ".join(IMPLEMENTATIONS))
  return name


@flax.struct.dataclass
class PackedMask:
  """The BAGEL packed mask of self-attention, described per token (docs/design.md, packed
  sequences): what the splash kernel takes, and `dense()` for the other kernels.

  `has_noisy` (static): whether rows may hold noisy blocks; False (ViT segments) lets splash skip
  the second copy of the keys.
  """
  layout: attention_mask.Layout  # (B, T) fields
  has_noisy: bool = flax.struct.field(pytree_node=False, default=True)

  @classmethod
  def from_segments(cls, segment_ids_bn: Array) -> PackedMask:
    """SigLIP's mask: each segment id > 0 one image (bidirectional), 0 padding."""
    seg = jnp.asarray(segment_ids_bn, jnp.int32)
    valid = seg > 0
    false = jnp.zeros(seg.shape, bool)
    return cls(attention_mask.Layout(sample_id=jnp.where(valid, seg, -1),
                                     block_id=jnp.where(valid, seg, jnp.iinfo(jnp.int32).max),
                                     causal=false, noisy=false), has_noisy=False)

  @property
  def shape(self) -> tuple[int, int]:
    return self.layout.sample_id.shape

  def dense(self) -> Array:
    """(B, T, T) bool: `attention_mask.packed_mask`."""
    return attention_mask.packed_mask(self.layout)

  def valid(self) -> Array:
    """(B, T) bool: tokens that attend something (not padding)."""
    return self.layout.sample_id >= 0


Mask = Array | PackedMask | None


def mask_kind(mask: Mask) -> str:
  """'none', 'packed' (a PackedMask) or 'dense' (a bool array broadcastable to (B, T, S))."""
  if mask is None:
    return "none"
  return "packed" if isinstance(mask, PackedMask) else "dense"


@contextlib.contextmanager
def emulate(platform: str):
  """Within: kernels are chosen as on `platform`, and splash runs in Pallas interpret mode. How
  tests run a model's TPU path on a CPU; it acts when a function is traced, so jit a fresh one
  inside."""
  _EMULATED.append(platform)
  try:
    yield
  finally:
    _EMULATED.pop()


def current_platform() -> str:
  """The platform the traced program is for: `emulate`'s, else the mesh in context's devices,
  else the default backend."""
  if _EMULATED:
    return _EMULATED[-1]
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  platform = getattr(device, "platform", None)
  return str(platform) if platform else jax.default_backend()


def splash_takes(kind: str, q_len: int, kv_len: int) -> bool:
  """Whether the splash path takes this mask and these lengths."""
  return (kind == "packed" and q_len == kv_len and q_len % SPLASH_ALIGN == 0
          and 0 < q_len <= SPLASH_MAX_LENGTH)


def cudnn_takes(kind: str, dtype, head_dim: int, q_len: int, kv_len: int) -> bool:
  """Whether cuDNN flash attention takes these inputs: half-precision inputs, head_dim a multiple
  of 8 up to 128, and for a mask (applied as a bias) even lengths."""
  if jnp.dtype(dtype) not in CUDNN_DTYPES:
    return False
  if head_dim % 8 or head_dim > CUDNN_MAX_HEAD_DIM:
    return False
  return kind == "none" or (q_len % 2 == 0 and kv_len % 2 == 0)


def choose(implementation: str, *, platform: str, kind: str, dtype, head_dim: int, q_len: int,
           kv_len: int) -> str:
  """The kernel that runs: 'xla', 'splash' or 'cudnn' (module docstring)."""
  check_implementation(implementation)
  kernel = AUTO.get(platform, "xla") if implementation == "auto" else implementation
  if kernel == "splash" and platform == "tpu" and splash_takes(kind, q_len, kv_len):
    return "splash"
  if (kernel == "cudnn" and platform in GPU_PLATFORMS
      and cudnn_takes(kind, dtype, head_dim, q_len, kv_len)):
    return "cudnn"
  return "xla"


def attention(q_bthd: Array, k_bshd: Array, v_bshd: Array, mask: Mask = None, *,
              implementation: str = "auto", scale: float | None = None,
              platform: str | None = None, interpret: bool = False) -> Array:
  """Softmax attention with grouped-query heads on the chosen kernel; (B, T, H, D) in q's dtype.

  Args:
    q_bthd, k_bshd, v_bshd: queries (H heads), keys and values (K heads, H % K == 0).
    mask: None (every key), a `PackedMask` (self-attention over packed rows), or a bool array
      broadcastable to (B, T, S), True where query t may attend key s. A query with no visible key
      (padding) returns zeros on every kernel.
    implementation: 'auto' | 'xla' | 'splash' | 'cudnn' (module docstring).
    scale: logit scale, default 1 / sqrt(D).
    platform: the platform to choose for (default `current_platform()`).
    interpret: run the splash kernel in Pallas interpret mode (tests on CPU: with
      platform='tpu', or under `emulate('tpu')`).
  """
  b, t, h, d = q_bthd.shape
  s = k_bshd.shape[1]
  kind = mask_kind(mask)
  if kind == "packed" and mask.shape != (b, t):
    raise ValueError(f"attention: PackedMask of {mask.shape} for queries of {(b, t)}")
  kernel = choose(implementation, platform=platform or current_platform(), kind=kind,
                  dtype=q_bthd.dtype, head_dim=d, q_len=t, kv_len=s)
  dense = mask.dense() if kind == "packed" else mask
  if kernel == "xla":
    return layers.attention(q_bthd, k_bshd, v_bshd, dense, scale=scale)
  scale = d ** -0.5 if scale is None else scale
  # Named as in `layers.attention`, for remat='minimal'.
  q_bthd = checkpoint_name(q_bthd, "attention_q")
  k_bshd = checkpoint_name(k_bshd, "attention_k")
  v_bshd = checkpoint_name(v_bshd, "attention_v")
  if kernel == "cudnn":
    return _cudnn(q_bthd, k_bshd, v_bshd, dense, scale)
  return splash_packed(q_bthd, k_bshd, v_bshd, mask, scale=scale,
                       interpret=interpret or bool(_EMULATED))


# -- cuDNN ----------------------------------------------------------------------------------------


def _cudnn(q_bthd: Array, k_bshd: Array, v_bshd: Array, mask: Array | None, scale: float
           ) -> Array:
  b, t = q_bthd.shape[:2]
  s = k_bshd.shape[1]
  if mask is None:
    out = jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, scale=scale,
                                       implementation="cudnn")
    return checkpoint_name(out.astype(q_bthd.dtype), "attention_out")
  mask_bts = jnp.broadcast_to(mask, (b, t, s))
  out = jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, mask=mask_bts[:, None],
                                     scale=scale, implementation="cudnn")
  # cuDNN averages the values of a row whose keys are all masked; xla returns zeros.
  out = jnp.where(jnp.any(mask_bts, axis=-1)[:, :, None, None], out, 0)
  return checkpoint_name(out.astype(q_bthd.dtype), "attention_out")


# -- splash ---------------------------------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  """Tile sizes of the splash kernel for a row of `length` tokens: q tiles of `block_q`, kv tiles
  of `block_kv` (dividing the row, so no tile straddles the two key copies)."""
  block_q: int
  block_kv: int
  block_kv_compute: int

  @classmethod
  def for_length(cls, length: int) -> SplashBlocks:
    def largest(options):
      return next(o for o in options if length % o == 0)
    block_kv = largest((1024, 512, 256, 128))
    return cls(block_q=largest((512, 256, 128)), block_kv=block_kv,
               block_kv_compute=min(block_kv, 512))

  def kernel_sizes(self):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    return sk.BlockSizes(block_q=self.block_q, block_kv=self.block_kv,
                         block_kv_compute=self.block_kv_compute, block_q_dkv=self.block_q,
                         block_kv_dkv=self.block_kv, block_kv_dkv_compute=self.block_kv_compute,
                         block_q_dq=self.block_q, block_kv_dq=self.block_kv,
                         use_fused_bwd_kernel=False)


def splash_row_inputs(layout: attention_mask.Layout, has_noisy: bool = True
                      ) -> dict[str, Array]:
  """The splash kernel's per-token inputs of one row ((T,) layout fields): segment ids of the
  queries (T,) and keys (2T, or T without noisy blocks) and the packed (X + 1, Y) per query."""
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
  """(T / block_q, S / block_kv) bool: the tiles that may hold a visible pair (a superset)."""
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


def _small(table: Array, bound: int) -> Array:
  """Scalar-memory tables as narrow as their values allow (as the kernel's own mask info)."""
  if bound <= np.iinfo(np.int8).max:
    return table.astype(jnp.int8)
  if bound <= np.iinfo(np.int16).max:
    return table.astype(jnp.int16)
  return table.astype(jnp.int32)


def _splash_row(q_htd: Array, k_ktd: Array, v_ktd: Array, layout: attention_mask.Layout, *,
                has_noisy: bool, interpret: bool, blocks: SplashBlocks | None) -> Array:
  """One row: q (H, T, D) already scaled, k / v (K, T, D) -> (H, T, D)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi

  t = q_htd.shape[1]
  blocks = blocks or SplashBlocks.for_length(t)
  inputs = splash_row_inputs(layout, has_noisy)
  if has_noisy:
    k_ktd = jnp.concatenate([k_ktd, k_ktd], axis=1)
    v_ktd = jnp.concatenate([v_ktd, v_ktd], axis=1)
  run = splash_tiles(inputs, t, blocks)
  nq, nk = run.shape
  block_mask = run.astype(jnp.int8)[None]

  def info(data_next, bound):
    return mi.MaskInfo(data_next=_small(data_next, bound)[None], mask_next=None,
                       block_mask=block_mask, partial_mask_blocks=None,
                       q_sequence=inputs["packed"])

  # dq has its own kernel (same tiles as the forward): the fused backward kernel would write a
  # partial dq per kv tile, (2T / block_kv) copies of dq.
  forward = info(_fill(run, 1), nk)
  kernel = sk.SplashAttentionKernel(
      forward, forward, info(_fill(run, 0), nq),
      block_sizes=blocks.kernel_sizes(), is_mqa=False, save_residuals=False,
      mask_value=sk.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None,
      # The kernel's output and log-sum-exp, saved by remat='minimal'.
      residual_checkpoint_name="attention_out",
      mask_function=PackedMaskFunction(t), interpret=interpret)
  return kernel(q_htd, k_ktd, v_ktd, sk.SegmentIds(inputs["q_seg"], inputs["kv_seg"]))


def splash_packed(q_bthd: Array, k_bshd: Array, v_bshd: Array, mask: PackedMask, *,
                  scale: float | None = None, interpret: bool = False,
                  blocks: SplashBlocks | None = None) -> Array:
  """Packed-row self-attention on the splash kernel (module docstring); (B, T, H, D).

  Under a mesh the kernel runs per device (`shard_map`): rows split like the activations'
  `batch` axis, heads like `act_heads` when the mesh divides both head counts.
  """
  b, t, h, d = q_bthd.shape
  kh = k_bshd.shape[2]
  if not splash_takes("packed", t, k_bshd.shape[1]):
    raise ValueError(f"splash attention takes self-attention over rows of a multiple of "
                     f"{SPLASH_ALIGN} tokens up to {SPLASH_MAX_LENGTH}; got T={t}, "
                     f"S={k_bshd.shape[1]}")
  if h % kh:
    raise ValueError(f"attention: {h} query heads are not a multiple of {kh} key/value heads")
  scale = d ** -0.5 if scale is None else scale
  has_noisy = mask.has_noisy

  def rows(q, k, v, layout):
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    row = lambda q, k, v, lay: _splash_row(  # noqa: E731
        q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), lay, has_noisy=has_noisy,
        interpret=interpret, blocks=blocks).swapaxes(0, 1)
    out = jax.vmap(row)(q, k, v, layout)
    return jnp.where((layout.sample_id >= 0)[:, :, None, None], out, 0).astype(q.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return rows(q_bthd, k_bshd, v_bshd, mask.layout)
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
  layout_spec = jax.tree.map(lambda _: row_spec, mask.layout)
  return jax.shard_map(rows, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, layout_spec),
                       out_specs=heads_spec, check_vma=False)(q_bthd, k_bshd, v_bshd, mask.layout)
