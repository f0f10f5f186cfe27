"""SigLIP NaViT vision tower and the BAGEL connector (the understanding path's image encoder).

NaViT packing: several images of different sizes share one sequence row. Each image contributes
its patches (row-major), each patch flattened as (row, column, channel); a patch at grid cell
(h, w) has position id `h * S + w` with S = `max_patches_per_side` (70 in BAGEL), which indexes a
learned S x S position table, so any image up to S x S patches needs no interpolation. Segment ids
(1, 2, ... per image, 0 for padding) restrict attention to patches of the same image.

The connector maps ViT features to the LLM width (Linear, GELU-tanh, Linear) and adds the fixed 2-D
sin-cos `vit_pos_embed` at the same position ids.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import files, sharding
from robust_u1_jax.models import attention as attention_lib
from robust_u1_jax.models import layers
from robust_u1_jax.models import vit

Array = jax.Array
COMPONENT = "vit"


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  hidden_size: int = 1152
  mlp_dim: int = 4304
  num_heads: int = 16
  num_layers: int = 26
  patch_size: int = 14
  max_patches_per_side: int = 70
  layer_norm_eps: float = 1e-6
  activation: str = "gelu_tanh"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"SiglipConfig: hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")
    vit.activation(self.activation)  # validates the name

  @property
  def patch_dim(self) -> int:
    return 3 * self.patch_size * self.patch_size

  @classmethod
  def so400m(cls) -> "SiglipConfig":
    """SigLIP so400m/14 as used by BAGEL: 26 of its 27 layers, 70 x 70 positions."""
    return cls()

  @classmethod
  def tiny(cls) -> "SiglipConfig":
    return cls(hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2, patch_size=8,
               max_patches_per_side=8)

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any] | str, *, drop_last_layer: bool,
                     max_patches_per_side: int | None = None) -> "SiglipConfig":
    """From a transformers SigLIP (vision) config dict or a config.json path.

    Args:
      config: the dict, or a path to `vit_config.json` / `config.json` (a full SiglipConfig's
        `vision_config` is used).
      drop_last_layer: BAGEL's `vit_config.json` states 27 layers but the model removes the last
        one before loading weights: pass True for a BAGEL checkpoint, False for a plain SigLIP.
      max_patches_per_side: defaults to `image_size // patch_size` (980 // 14 = 70 for BAGEL).
    """
    source = "config"
    if isinstance(config, str):
      source = config
      config = files.read_json_object(config)
    config = dict(config.get("vision_config", config))

    def field(key, kind, default=files.REQUIRED):
      return files.json_field(config, key, source, kind, default)

    patch = field("patch_size", int)
    layers_ = field("num_hidden_layers", int) - (1 if drop_last_layer else 0)
    if max_patches_per_side is None:
      if "image_size" not in config:
        raise files.UnreadableFile(f"{source}: no image_size; pass max_patches_per_side "
                                   "explicitly")
      max_patches_per_side = field("image_size", int) // patch
    hidden, heads = field("hidden_size", int), field("num_attention_heads", int)
    if hidden % heads:  # the file's field names (SiglipConfig's own check names its own)
      raise files.UnreadableFile(f"{source}: hidden_size {hidden} is not a multiple of "
                                 f"num_attention_heads {heads}")
    with files.naming(source):  # an unknown activation
      return cls(
          hidden_size=hidden, mlp_dim=field("intermediate_size", int),
          num_heads=heads, num_layers=layers_, patch_size=patch,
          max_patches_per_side=int(max_patches_per_side),
          layer_norm_eps=field("layer_norm_eps", float, 1e-6),
          activation=vit.activation_from_hf(field("hidden_act", str, "gelu_pytorch_tanh")))


# ---------------------------------------------------------------------------------------------
# Input preparation (numpy or jax, no model state).


def patchify(image_hw3, patch_size: int, max_patches_per_side: int):
  """One (H, W, 3) image, sides multiples of p -> (patches (N, 3*p*p), position ids (N,)).

  Position ids are `h * S + w` over the image's patch grid, row-major, as in BAGEL.
  """
  if image_hw3.ndim != 3 or image_hw3.shape[-1] != 3:
    raise ValueError(f"patchify expects one (H, W, 3) image, got shape {image_hw3.shape}")
  h, w = image_hw3.shape[0] // patch_size, image_hw3.shape[1] // patch_size
  if h > max_patches_per_side or w > max_patches_per_side:
    raise ValueError(f"image of {image_hw3.shape[0]}x{image_hw3.shape[1]} pixels has {h}x{w} "
                     f"patches; at most {max_patches_per_side} per side are supported")
  patches = vit.images_to_patches(image_hw3, patch_size)
  position_ids = (np.arange(h)[:, None] * max_patches_per_side + np.arange(w)[None, :]).reshape(-1)
  return patches, position_ids.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Modules.


class SiglipVisionTower(nnx.Module):
  """Patch embedding (Linear over flattened patches) + learned positions + encoder + post-LN."""

  def __init__(self, config: SiglipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: str = "none", attention: str = "auto", rngs: nnx.Rngs):
    """`remat`: the encoder's rematerialisation policy by name (`layers.remat_policy`);
    `attention`: its attention kernel (`attention.IMPLEMENTATIONS`). A run's `remat` and
    `attention` fields set them with the LLM's (`bagel.Bagel`)."""
    self.config = config
    c = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.patch_embed = layers.dense(c.patch_dim, c.hidden_size, ("patch", "embed"), **kw)
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("pos", "embed"))
    self.pos_embedding = nnx.Param(
        init(rngs.params(), (c.max_patches_per_side ** 2, c.hidden_size), param_dtype))
    self.encoder = vit.Encoder(
        c.num_layers, c.hidden_size, c.mlp_dim, c.num_heads, act=c.activation,
        eps=c.layer_norm_eps, component=COMPONENT, remat=remat, attention=attention, **kw)
    self.post_ln = vit.layer_norm(c.hidden_size, c.layer_norm_eps, **kw)

  def __call__(self, patches_bnp: Array, position_ids_bn: Array, segment_ids_bn: Array) -> Array:
    """(B, N, 3*p*p) patches -> (B, N, hidden) features; padded positions (segment 0) are zero."""
    if patches_bnp.shape[-1] != self.config.patch_dim:
      raise ValueError(f"patches have {patches_bnp.shape[-1]} values, the model expects "
                       f"3 * {self.config.patch_size}^2 = {self.config.patch_dim}")
    x = self.patch_embed(patches_bnp)
    x = x + jnp.take(self.pos_embedding[...], position_ids_bn, axis=0).astype(x.dtype)
    x = sharding.activation_constraint(x, ("batch", "length", "act_embed"), COMPONENT)
    # Each image one bidirectional block, described per token (as the fused kernels take it);
    # padding attends nothing, and its features are zeroed below.
    x = self.encoder(x, attention_lib.PackedMask.from_segments(segment_ids_bn))
    x = self.post_ln(x)
    return jnp.where((segment_ids_bn > 0)[..., None], x, 0).astype(x.dtype)


class Connector(nnx.Module):
  """ViT features -> LLM width: fc1, GELU(tanh), fc2, plus the fixed 2-D sin-cos `vit_pos_embed`."""

  def __init__(self, vit_hidden: int, llm_hidden: int, max_patches_per_side: int, *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.dense(vit_hidden, llm_hidden, ("embed", "mlp"), **kw)
    self.fc2 = layers.dense(llm_hidden, llm_hidden, ("mlp", "embed"), **kw)
    self.llm_hidden = llm_hidden
    self.max_patches_per_side = max_patches_per_side

  def __call__(self, x_bnd: Array, position_ids_bn: Array) -> Array:
    h = self.fc2(jax.nn.gelu(self.fc1(x_bnd), approximate=True))
    table = _sincos_table(self.llm_hidden, self.max_patches_per_side)
    return h + jnp.take(jnp.asarray(table, h.dtype), position_ids_bn, axis=0)


@functools.lru_cache(maxsize=4)
def _sincos_table(dim: int, grid: int) -> np.ndarray:
  # Built once per shape in numpy (not per trace); the checkpoint never needs to carry it.
  return layers.sincos_2d_table(dim, grid)
