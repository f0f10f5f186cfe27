"""CLIP image and text towers (the semantic reward of Flow-GRPO), with CLIP preprocessing in JAX.

The image tower is OpenAI's ViT: patch embedding without bias, a class token, learned positions,
`ln_pre`, the shared pre-LN encoder, `ln_post` on the class token, and a projection. The text tower
embeds tokens and positions, runs the encoder under a causal mask, applies `ln_final`, and takes
the features of the end-of-text token: the largest token id (OpenAI tokenizer, where EOT = 49407
is the top id) unless `eos_token_id` is set, then its first occurrence (transformers' convention).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import files, pixels
from robust_u1_jax import sharding
from robust_u1_jax.models import layers
from robust_u1_jax.models import vit

Array = jax.Array
COMPONENT = "clip"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  embed_dim: int = 512
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_dim: int = 2048
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  # None: pool at argmax(token ids) as OpenAI does; else at the first `eos_token_id`.
  eos_token_id: int | None = None

  def __post_init__(self):
    vit.activation(self.activation)
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPConfig: image_size {self.image_size} is not a multiple of "
                       f"patch_size {self.patch_size}")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @classmethod
  def vit_b32(cls) -> "CLIPConfig":
    """OpenAI CLIP ViT-B/32 (open_clip `ViT-B-32`, pretrained='openai')."""
    return cls()

  @classmethod
  def tiny(cls) -> "CLIPConfig":
    return cls(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
               vision_heads=4, vision_mlp_dim=128, context_length=12, vocab_size=100,
               text_width=32, text_layers=2, text_heads=4, text_mlp_dim=128)

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any] | str) -> "CLIPConfig":
    """From a transformers CLIPConfig dict or config.json path."""
    if isinstance(config, str):
      config = files.read_json(config)
    v, t = dict(config["vision_config"]), dict(config["text_config"])
    acts = {vit.activation_from_hf(v.get("hidden_act", "quick_gelu")),
            vit.activation_from_hf(t.get("hidden_act", "quick_gelu"))}
    if len(acts) != 1:
      raise ValueError(f"CLIP config: vision and text towers use different activations {acts}")
    eos = t.get("eos_token_id", 2)
    return cls(
        embed_dim=int(config.get("projection_dim", 512)), image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]), vision_width=int(v["hidden_size"]),
        vision_layers=int(v["num_hidden_layers"]), vision_heads=int(v["num_attention_heads"]),
        vision_mlp_dim=int(v["intermediate_size"]),
        context_length=int(t.get("max_position_embeddings", 77)),
        vocab_size=int(t["vocab_size"]), text_width=int(t["hidden_size"]),
        text_layers=int(t["num_hidden_layers"]), text_heads=int(t["num_attention_heads"]),
        text_mlp_dim=int(t["intermediate_size"]), activation=acts.pop(),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
        # transformers keeps argmax pooling for legacy configs whose eos_token_id is 2.
        eos_token_id=None if eos in (None, 2) else int(eos))


def preprocess(images_hwc: Array, size: int = 224) -> Array:
  """CLIP eval transform: shortest side to `size` (bicubic), center crop, normalise.

  Input (..., H, W, 3), float in [0, 1] or uint8; output float32 (..., size, size, 3). Matches
  torchvision's Resize(size, BICUBIC, antialias=True) + CenterCrop geometry (long side
  `int(size * long / short)`, crop offset `round((side - size) / 2)`). `jax.image.resize` uses the
  same Keys cubic (a = -0.5) with antialiasing on downscale, but PIL works on uint8 and rounds and
  clips the resized image, while this stays in float: expect differences of about 1/255 per pixel
  (larger at sharp edges, where the cubic overshoot is not clipped).
  """
  x = jnp.asarray(images_hwc)
  x = pixels.to_float(x)
  *lead, h, w, c = x.shape
  if c != 3:
    raise ValueError(f"CLIP preprocess expects (..., H, W, 3) images, got shape {x.shape}")
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (*lead, new_h, new_w, 3), method="bicubic", antialias=True)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  x = x[..., top:top + size, left:left + size, :]
  return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)


def _param(init, shape, names, rngs, param_dtype):
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, param_dtype))


class CLIPVisionTower(nnx.Module):

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    c = config
    self.config = c
    d = c.vision_width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    normal = nnx.initializers.normal(d ** -0.5)
    self.patch_embed = layers.dense(3 * c.patch_size ** 2, d, ("patch", "embed"), use_bias=False,
                                    **kw)
    self.class_embedding = _param(normal, (d,), ("embed",), rngs, param_dtype)
    self.pos_embedding = _param(normal, (c.grid ** 2 + 1, d), ("pos", "embed"), rngs, param_dtype)
    self.ln_pre = vit.layer_norm(d, c.layer_norm_eps, **kw)
    self.encoder = vit.Encoder(c.vision_layers, d, c.vision_mlp_dim, c.vision_heads,
                               act=c.activation, eps=c.layer_norm_eps, component=COMPONENT, **kw)
    self.ln_post = vit.layer_norm(d, c.layer_norm_eps, **kw)
    self.proj = _param(normal, (d, c.embed_dim), ("embed", None), rngs, param_dtype)

  def __call__(self, pixels_bhwc: Array) -> Array:
    """Normalised (B, image_size, image_size, 3) pixels -> (B, embed_dim), not L2-normalised."""
    c = self.config
    if pixels_bhwc.shape[-3:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"CLIP image tower expects (B, {c.image_size}, {c.image_size}, 3) pixels, "
                       f"got {pixels_bhwc.shape}; run clip.preprocess first")
    x = self.patch_embed(vit.images_to_patches(pixels_bhwc, c.patch_size))
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(x.dtype)
    x = sharding.activation_constraint(x, ("batch", "length", "act_embed"), COMPONENT)
    x = self.encoder(self.ln_pre(x))
    return self.ln_post(x[:, 0]) @ self.proj[...].astype(x.dtype)


class CLIPTextTower(nnx.Module):

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    c = config
    self.config = c
    d = c.text_width
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = _param(nnx.initializers.normal(0.02), (c.vocab_size, d),
                                  ("vocab", "embed"), rngs, param_dtype)
    self.pos_embedding = _param(nnx.initializers.normal(0.01), (c.context_length, d),
                                ("pos", "embed"), rngs, param_dtype)
    self.encoder = vit.Encoder(c.text_layers, d, c.text_mlp_dim, c.text_heads, act=c.activation,
                               eps=c.layer_norm_eps, component=COMPONENT, **kw)
    self.ln_final = vit.layer_norm(d, c.layer_norm_eps, **kw)
    self.proj = _param(nnx.initializers.normal(d ** -0.5), (d, c.embed_dim), ("embed", None), rngs,
                       param_dtype)
    self.dtype = dtype

  def __call__(self, tokens_bt: Array) -> Array:
    """(B, T) token ids, T <= context_length -> (B, embed_dim), not L2-normalised."""
    c = self.config
    t = tokens_bt.shape[-1]
    if t > c.context_length:
      raise ValueError(f"CLIP text of {t} tokens exceeds context_length {c.context_length}")
    x = jnp.take(self.token_embedding[...], tokens_bt, axis=0)
    x = (x + self.pos_embedding[:t]).astype(self.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    x = self.ln_final(self.encoder(x, causal))
    if c.eos_token_id is None:
      eot = jnp.argmax(tokens_bt, axis=-1)
    else:
      eot = jnp.argmax(tokens_bt == c.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return pooled @ self.proj[...].astype(x.dtype)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nnx.Module):
  """Both towers and the learned temperature (`logit_scale`, stored as its log like PyTorch)."""

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.visual = CLIPVisionTower(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text = CLIPTextTower(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), param_dtype), out_sharding=())

  def encode_image(self, pixels_bhwc: Array, *, normalize: bool = True) -> Array:
    """Preprocessed pixels (see `preprocess`) -> (B, embed_dim) float32 embeddings."""
    x = self.visual(pixels_bhwc)
    return l2_normalize(x) if normalize else x.astype(jnp.float32)

  def encode_text(self, tokens_bt: Array, *, normalize: bool = True) -> Array:
    x = self.text(tokens_bt)
    return l2_normalize(x) if normalize else x.astype(jnp.float32)

  def __call__(self, pixels_bhwc: Array, tokens_bt: Array) -> Array:
    """Image-text logits (B_image, B_text), scaled by exp(logit_scale)."""
    img, txt = self.encode_image(pixels_bhwc), self.encode_text(tokens_bt)
    return jnp.exp(self.logit_scale[...]) * img @ txt.T
