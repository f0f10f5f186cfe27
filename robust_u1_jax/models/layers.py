"""Building blocks shared by every tower: norms, RoPE, dense, attention core, MLP, fixed tables.

Everything here is shape-generic and carries logical axis names on its parameters, so the same
layers shard by the rule set of whichever component (`llm`, `vit`, `vae`, `clip`) builds them.
Numerics follow the PyTorch references the checkpoints come from (Qwen2 RMSNorm in float32,
rotate-half RoPE, softmax in float32, MAE/BAGEL sin-cos tables, DiT timestep embedding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
# Logical name of the leading axis of stacked layer parameters (see `stack`). The attribute that
# holds a stack is named the same (`layers`): checkpoint key tables address layer i of a stack as
# `...layers.{i}....`, and `checkpoints/loader.py` maps that onto row i of the stacked parameter.
LAYER_AXIS = "layers"
# What `remat='minimal'` keeps of a layer: the attention's inputs and output (`attention`).
MINIMAL_SAVED = ("attention_q", "attention_k", "attention_v", "attention_out")


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
  # Named for remat='minimal', which keeps them and recomputes the rest of a layer.
  q_bthd = checkpoint_name(q_bthd, "attention_q")
  k_bshd = checkpoint_name(k_bshd, "attention_k")
  v_bshd = checkpoint_name(v_bshd, "attention_v")
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
  return checkpoint_name(out.reshape(b, t, h, d).astype(q_bthd.dtype), "attention_out")


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
    # Replicated (51 MB in float32 at 7B): it runs on every latent token, and with its shard on
    # the fsdp axis the partitioner all-gathered the global batch's tokens instead (4.2 GiB per
    # chip at 32k-token rows on v5p-64; docs/PERFORMANCE.md, "Memory").
    self.fc2 = dense(hidden, hidden, (None, None), **kw)

  def __call__(self, t_b: Array) -> Array:
    return self.fc2(jax.nn.silu(self.fc1(timestep_sinusoid(t_b, self.freq_dim))))


REMAT_POLICIES = ("none", "full", "dots", "minimal")


def remat_policy(name: str):
  """The `jax.checkpoint` policy of a layer for a config's `remat` name (None: no remat).

  From most to least memory: 'none' keeps every intermediate for the backward pass; 'dots' keeps
  the outputs of the weight matmuls (projections and MLP, not the attention's batched einsums)
  and recomputes the elementwise work and the attention; 'minimal' keeps only the attention's
  inputs and output (q, k, v after RoPE and the attention context: a few hidden widths per
  token, none of the MLP's wide intermediates) and recomputes projections, norms and MLP;
  'full' keeps nothing but each layer's input (the scan carry) and recomputes the whole layer.
  """
  policies = {"full": jax.checkpoint_policies.nothing_saveable,
              "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
              "minimal": jax.checkpoint_policies.save_only_these_names(*MINIMAL_SAVED)}
  if name == "none":
    return None
  if name not in policies:
    raise ValueError(f"unknown remat policy {name!r}; allowed: "
                     + ", ".join(repr(p) for p in REMAT_POLICIES))
  return policies[name]


def stack(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs
          ) -> nnx.Module:
  """`num_layers` layers as one module whose parameters are stacked along a leading axis.

  `make_layer(rngs)` builds one layer; it is traced once (`nnx.vmap` over split RNG streams), so
  each layer still gets its own draw, and every parameter's logical axis names gain LAYER_AXIS
  in front (unsharded by every rule set in `sharding.py`: each device holds its shard of every
  layer, and `scan` slices one layer per step). Assign the result to an attribute named
  LAYER_AXIS (see there).
  """
  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
  def make(layer_rngs: nnx.Rngs) -> nnx.Module:
    return make_layer(layer_rngs)

  return make(rngs)


def scan(layer_stack: nnx.Module, step: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
         carry: Any, xs: Any = None, *, remat: str = "none") -> tuple[Any, Any]:
  """`step(layer, carry, x) -> (carry, y)` over the layers of a `stack`, in order, as ONE
  `lax.scan`: the program holds a single layer body, so its compile time does not grow with depth.

  `xs` (optional) is sliced along its leading (layer) axis like the parameters; the per-layer
  outputs `y` come back stacked. Each step runs under `jax.checkpoint` with `remat`'s policy.
  `jax.checkpoint` and `lax.scan` of a pure function of the split state, not `nnx.scan` /
  `nnx.remat`: the training steps merge the model inside `jax.value_and_grad`, and nnx's
  transforms refuse to touch parameters created at that outer trace level.
  """
  graphdef, state = nnx.split(layer_stack)
  policy = remat_policy(remat)

  def body(carry, inputs):
    layer_state, x = inputs
    return step(nnx.merge(graphdef, layer_state), carry, x)

  if policy is not None:
    # prevent_cse=False: a scan body is not merged with its neighbours, so the CSE guard only
    # costs (JAX's advice for remat under scan).
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  return jax.lax.scan(body, carry, (state, xs))
