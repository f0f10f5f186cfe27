"""Pre-LayerNorm transformer encoder shared by the SigLIP and CLIP towers.

One block is `x + attn(ln1(x))` then `x + mlp(ln2(x))`, with biases on every projection, as in
SigLIP (transformers), OpenAI CLIP and open_clip. Only the MLP activation differs between them:
tanh-approximated GELU for SigLIP, QuickGELU for OpenAI CLIP, and whatever a transformers config
names. The attention core is `attention.attention` (the platform's kernel, chosen by the
`attention` argument); this module only projects heads.

The blocks are one `layers.stack` run as one `lax.scan` (`layers.scan`), parameters stacked along
a leading layer axis. State paths: `layers.{ln1,ln2}.{scale,bias}`,
`layers.attn.{q,k,v,o}.{kernel,bias}`, `layers.mlp.{fc1,fc2}.{kernel,bias}`, each (L, ...);
kernels are (L, in, out). Checkpoint key tables address block i as `layers.{i}.<rest>`
(`checkpoints/loader.py` stacks and unstacks).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from robust_u1_jax import sharding
from robust_u1_jax.models import attention as attention_lib
from robust_u1_jax.models import layers

Array = jax.Array


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
}

# transformers `hidden_act` strings -> our names.
HF_ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
}


def activation(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; allowed: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def activation_from_hf(hidden_act: str) -> str:
  """Our activation name for a transformers config's `hidden_act`."""
  if hidden_act not in HF_ACTIVATIONS:
    raise ValueError(
        f"hidden_act {hidden_act!r} is not supported; allowed: {sorted(HF_ACTIVATIONS)}")
  return HF_ACTIVATIONS[hidden_act]


def images_to_patches(images_hwc, patch: int):
  """(..., H, W, C) -> (..., H/p * W/p, p*p*C), each patch flattened as (row, column, channel).

  Works on numpy and jax arrays alike (only reshape/transpose), so the data pipeline and jitted
  code share it. The order matches a Conv2d kernel permuted to (out, kh, kw, in), which is how BAGEL
  stores its SigLIP patch embedding as a Linear.
  """
  *lead, h, w, c = images_hwc.shape
  if h % patch or w % patch:
    raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
  nh, nw = h // patch, w // patch
  x = images_hwc.reshape(*lead, nh, patch, nw, patch, c)
  n = len(lead)
  x = x.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4)
  return x.reshape(*lead, nh * nw, patch * patch * c)


def layer_norm(width: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: the fast E[x^2] - E[x]^2 form loses precision against PyTorch's LayerNorm.
  return nnx.LayerNorm(
      width, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
      rngs=rngs)


class MultiHeadAttention(nnx.Module):
  """Self-attention with biased q/k/v/o projections; the softmax core is `attention.attention`
  on the kernel `attention` names ('auto': the platform's)."""

  def __init__(self, width: int, num_heads: int, *, component: str, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "auto", rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    self.component = component
    self.attention = attention_lib.check_implementation(attention)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Kernels keep PyTorch's flat (embed, heads * head_dim) layout, so checkpoints map with a plain
    # transpose; sharding the flat axis over `tensor` still splits whole heads.
    self.q = layers.dense(width, width, ("embed", "heads"), **kw)
    self.k = layers.dense(width, width, ("embed", "heads"), **kw)
    self.v = layers.dense(width, width, ("embed", "heads"), **kw)
    self.o = layers.dense(width, width, ("heads", "embed"), **kw)

  def __call__(self, x_btd: Array, mask_btt: attention_lib.Mask) -> Array:
    b, t, d = x_btd.shape
    names = ("batch", "length", "act_heads", None)

    def heads(proj):
      y_bthd = proj(x_btd).reshape(b, t, self.num_heads, d // self.num_heads)
      return sharding.activation_constraint(y_bthd, names, self.component)

    out_bthd = attention_lib.attention(heads(self.q), heads(self.k), heads(self.v), mask_btt,
                                       implementation=self.attention)
    return self.o(out_bthd.reshape(b, t, d))


class Mlp(nnx.Module):

  def __init__(self, width: int, mlp_dim: int, act: str, *, component: str, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    activation(act)  # validates the name
    self.act = act
    self.component = component
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.dense(width, mlp_dim, ("embed", "mlp"), **kw)
    self.fc2 = layers.dense(mlp_dim, width, ("mlp", "embed"), **kw)

  def __call__(self, x: Array) -> Array:
    h = ACTIVATIONS[self.act](self.fc1(x))
    h = sharding.activation_constraint(h, ("batch", "length", "act_mlp"), self.component)
    return self.fc2(h)


class EncoderBlock(nnx.Module):

  def __init__(self, width: int, mlp_dim: int, num_heads: int, *, act: str, eps: float,
               component: str, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str = "auto", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = layer_norm(width, eps, **kw)
    self.attn = MultiHeadAttention(width, num_heads, component=component, attention=attention,
                                   **kw)
    self.ln2 = layer_norm(width, eps, **kw)
    self.mlp = Mlp(width, mlp_dim, act, component=component, **kw)
    self.component = component

  def __call__(self, x_btd: Array, mask_btt: attention_lib.Mask) -> Array:
    x_btd = x_btd + self.attn(self.ln1(x_btd), mask_btt)
    x_btd = x_btd + self.mlp(self.ln2(x_btd))
    return sharding.activation_constraint(x_btd, ("batch", "length", "act_embed"), self.component)


class Encoder(nnx.Module):
  """A stack of pre-LN blocks (no final norm: each tower places its own), scanned.

  `remat`: the blocks' rematerialisation policy by name (`layers.remat_policy`); `attention`:
  their attention kernel (`attention.IMPLEMENTATIONS`).
  """

  def __init__(self, num_layers: int, width: int, mlp_dim: int, num_heads: int, *, act: str,
               eps: float, component: str, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: str = "none", attention: str = "auto", rngs: nnx.Rngs):
    layers.remat_policy(remat)  # validates the name
    self.remat = remat
    self.layers = layers.stack(
        lambda r: EncoderBlock(width, mlp_dim, num_heads, act=act, eps=eps, component=component,
                               dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=r),
        num_layers, rngs)

  def __call__(self, x_btd: Array, mask_btt: attention_lib.Mask = None) -> Array:
    def step(block, x_btd, _):
      return block(x_btd, mask_btt), None

    return layers.scan(self.layers, step, x_btd, remat=self.remat)[0]
