"""One attention function for every tower, on the platform's kernel.

`attention(q, k, v, mask, implementation=...)` computes softmax attention with grouped-query heads
and picks the kernel (`choose`):

  xla     `layers.attention`: logits and softmax in float32, any mask; materialises the
          (B, H, T, S) scores. CPU, and the fallback everywhere.
  splash  TPU: the Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.
          splash_attention, `models/splash.py`), flash attention that skips the tiles the mask
          leaves empty. It takes the BAGEL packed mask (`PackedMask`) of self-attention over rows
          whose length is a multiple of 128 (at most 65,408), and the KV-cache mask of a noisy
          block against its context (`KeyMask`) at any lengths; other masks go to xla.
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

How splash takes each mask: `models/splash.py` (docs/design.md#fused-attention).
"""

from __future__ import annotations

import contextlib

import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from robust_u1_jax.models import attention_mask, layers, splash

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
GPU_PLATFORMS = ("gpu", "cuda")
# The kernel 'auto' picks per platform.
AUTO = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128
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


@flax.struct.dataclass
class KeyMask:
  """Every valid query sees every valid key, nothing else: new tokens against a KV cache's valid
  slots and each other (a noisy latent block denoised against its cached context). What splash
  takes at any lengths, and `dense()` for the other kernels; invalid queries see nothing."""
  q_valid: Array  # (B, T) bool
  k_valid: Array  # (B, S) bool

  @property
  def shape(self) -> tuple[int, int]:
    return self.q_valid.shape

  def dense(self) -> Array:
    """(B, T, S) bool."""
    return self.q_valid[:, :, None] & self.k_valid[:, None, :]


Mask = Array | PackedMask | KeyMask | None


def mask_kind(mask: Mask) -> str:
  """'none', 'packed' (a PackedMask), 'keys' (a KeyMask) or 'dense' (a bool array broadcastable
  to (B, T, S))."""
  if mask is None:
    return "none"
  if isinstance(mask, PackedMask):
    return "packed"
  return "keys" if isinstance(mask, KeyMask) else "dense"


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
  return kind == "keys" or (kind == "packed" and splash.takes_packed(q_len, kv_len))


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
    mask: None (every key), a `PackedMask` (self-attention over packed rows), a `KeyMask`
      (valid queries see valid keys), or a bool array broadcastable to (B, T, S), True where
      query t may attend key s. A query with no visible key
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
  if kind in ("packed", "keys") and mask.shape != (b, t):
    raise ValueError(f"attention: {type(mask).__name__} of {mask.shape} for queries of {(b, t)}")
  if kind == "keys" and mask.k_valid.shape != (b, s):
    raise ValueError(f"attention: KeyMask keys of {mask.k_valid.shape} for keys of {(b, s)}")
  kernel = choose(implementation, platform=platform or current_platform(), kind=kind,
                  dtype=q_bthd.dtype, head_dim=d, q_len=t, kv_len=s)
  dense = mask.dense() if kind in ("packed", "keys") else mask
  if kernel == "xla":
    return layers.attention(q_bthd, k_bshd, v_bshd, dense, scale=scale)
  scale = d ** -0.5 if scale is None else scale
  # Named as in `layers.attention`, for remat='minimal'.
  q_bthd = checkpoint_name(q_bthd, "attention_q")
  k_bshd = checkpoint_name(k_bshd, "attention_k")
  v_bshd = checkpoint_name(v_bshd, "attention_v")
  if kernel == "cudnn":
    return _cudnn(q_bthd, k_bshd, v_bshd, dense, scale)
  interpret = interpret or bool(_EMULATED)
  if kind == "keys":
    return splash.key_mask(q_bthd, k_bshd, v_bshd, mask.q_valid, mask.k_valid, scale=scale,
                           interpret=interpret)
  return splash.packed(q_bthd, k_bshd, v_bshd, mask.layout, has_noisy=mask.has_noisy, scale=scale,
                       interpret=interpret)


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


