"""Building blocks shared by every tower: norms, RoPE, dense, attention core, MLP, fixed tables.

Everything here is shape-generic and carries logical axis names on its parameters, so the same
layers shard by the rule set of whichever component (`llm`, `vit`, `vae`, `clip`) builds them.
Numerics follow the PyTorch references the checkpoints come from (Qwen2 RMSNorm in float32,
rotate-half RoPE, softmax in float32, MAE/BAGEL sin-cos tables, DiT timestep embedding).
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *,
          use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init=None, rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear whose (in, out) kernel carries `names` and whose bias carries `(names[1],)`."""
  kernel_init = kernel_init or nnx.initializers.lecun_normal()
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(kernel_init, names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
      rngs=rngs)


class RMSNorm(nnx.Module):
  """Qwen2/T5 RMSNorm: normalise in float32, cast back, then multiply by `scale` (init ones)."""

  def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs  # deterministic init; kept for a uniform constructor signature
    self.eps = eps
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))
    self.scale = nnx.Param(init(jax.random.key(0), (dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    # Cast back to the input dtype before the scale, as transformers' Qwen2RMSNorm does.
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def rope_cos_sin(positions_bt: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos/sin tables (B, T, head_dim) for explicit integer positions, computed in float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  emb_btd = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
  return jnp.cos(emb_btd), jnp.sin(emb_btd)


def apply_rope(x_bthd: Array, positions_bt: Array, theta: float) -> Array:
  """1-D rotary embedding, Qwen2/LLaMA rotate-half convention, per-token positions.

  Positions are explicit because packed sequences restart them per sample and all tokens of one
  image block share a position.
  """
  cos_btd, sin_btd = rope_cos_sin(positions_bt, x_bthd.shape[-1], theta)
  cos = cos_btd[:, :, None, :].astype(x_bthd.dtype)
  sin = sin_btd[:, :, None, :].astype(x_bthd.dtype)
  x1, x2 = jnp.split(x_bthd, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_bthd * cos + rotated * sin


def attention(q_bthd: Array, k_bshd: Array, v_bshd: Array, mask_bts: Array | None = None, *,
              scale: float | None = None) -> Array:
  """Softmax attention with grouped-query heads; returns (B, T, H, D) in q's dtype.

  Args:
    q_bthd: queries, H heads.
    k_bshd: keys, K heads with H % K == 0 (K == H is plain multi-head attention); S may differ
      from T (a KV cache).
    v_bshd: values, same shape as the keys.
    mask_bts: optional bool, True where query t may attend key s; any shape broadcastable to
      (B, T, S). A query row with no True entry (a padding token) returns zeros, not NaN.
    scale: logit scale, default 1/sqrt(D).

  Logits and softmax are computed in float32 whatever the input dtype.
  """
  b, t, h, d = q_bthd.shape
  s, kh = k_bshd.shape[1], k_bshd.shape[2]
  if h % kh:
    raise ValueError(f"attention: {h} query heads are not a multiple of {kh} key/value heads")
  if v_bshd.shape != k_bshd.shape:
    raise ValueError(f"attention: keys {k_bshd.shape} and values {v_bshd.shape} differ in shape")
  scale = d ** -0.5 if scale is None else scale
  q_btkgd = q_bthd.reshape(b, t, kh, h // kh, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bshd,
                      preferred_element_type=jnp.float32) * scale
  if mask_bts is not None:
    mask_bts = jnp.broadcast_to(mask_bts, (b, t, s))
    mask = mask_bts[:, None, None, :, :]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask_bts is not None:
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_bshd.dtype), v_bshd)
  return out.reshape(b, t, h, d).astype(q_bthd.dtype)


class SwiGLU(nnx.Module):
  """Qwen2 MLP without biases: down(silu(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = dense(dim, hidden, ("embed", "mlp"), **kw)
    self.up_proj = dense(dim, hidden, ("embed", "mlp"), **kw)
    self.down_proj = dense(hidden, dim, ("mlp", "embed"), **kw)

  def __call__(self, x: Array) -> Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE 1-D table: [sin(pos * w), cos(pos * w)] with w = 1 / 10000^(i / (embed_dim / 2))."""
  if embed_dim % 2:
    raise ValueError(f"sin-cos embedding dim must be even, got {embed_dim}")
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", np.asarray(pos, np.float64).reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(embed_dim: int, grid_size: int) -> np.ndarray:
  """BAGEL/MAE `get_2d_sincos_pos_embed`: (grid_size**2, embed_dim) float32, row h*grid_size + w.

  The first half of each row encodes the column (w), the second half the row (h), exactly as the
  reference's meshgrid(w, h) ordering produces.
  """
  if embed_dim % 4:
    raise ValueError(f"2-D sin-cos embedding dim must be a multiple of 4, got {embed_dim}")
  w_hw, h_hw = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                           np.arange(grid_size, dtype=np.float32))
  emb_w = sincos_1d(embed_dim // 2, w_hw)
  emb_h = sincos_1d(embed_dim // 2, h_hw)
  return np.concatenate([emb_w, emb_h], axis=1).astype(np.float32)


def timestep_sinusoid(t_b: Array, dim: int = 256, max_period: float = 10000.0) -> Array:
  """DiT timestep features [cos, sin] of the raw t (B,) -> (B, dim), float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t_b.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nnx.Module):
  """t -> Linear(freq_dim, hidden) -> SiLU -> Linear(hidden, hidden) (BAGEL `time_embedder`).

  `fc1`/`fc2` correspond to the checkpoint's `time_embedder.mlp.0` / `time_embedder.mlp.2`.
  """

  def __init__(self, hidden: int, freq_dim: int = 256, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.freq_dim = freq_dim
    self.fc1 = dense(freq_dim, hidden, (None, "mlp"), **kw)
    self.fc2 = dense(hidden, hidden, ("mlp", "embed"), **kw)

  def __call__(self, t_b: Array) -> Array:
    return self.fc2(jax.nn.silu(self.fc1(timestep_sinusoid(t_b, self.freq_dim))))


def remat_policy(name: str):
  """'none' -> no remat (None returned), 'full' -> save nothing, 'dots' -> save weight matmuls."""
  policies = {"full": jax.checkpoint_policies.nothing_saveable,
              "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
  if name == "none":
    return None
  if name not in policies:
    raise ValueError(f"unknown remat policy {name!r}; allowed: 'none', 'full', 'dots'")
  return policies[name]


def broadcast_mask(mask_bt: Array, like: Array) -> Array:
  """A (B, T) bool mask reshaped to broadcast over `like` (B, T, ...)."""
  return mask_bt.reshape(mask_bt.shape + (1,) * (like.ndim - mask_bt.ndim))

