"""The unified BAGEL model: one Qwen2 Mixture-of-Transformers over text, ViT and VAE-latent tokens.

A packed row of the LLM interleaves three kinds of tokens:
  text    token ids (the `<|vision_start|>` / `<|vision_end|>` markers around images included),
          embedded by `embed_tokens`; understanding expert;
  vit     SigLIP NaViT features of an image through the connector plus `vit_pos_embed`;
          understanding expert;
  latent  2x2 patches of normalised VAE latents: `vae2llm(x) + time_embedder(t) +
          latent_pos_embed`; generation expert. Clean conditioning images carry t = 0, noisy
          generation targets their flow time.
Each token says which kind it is and where its features come from (`source_index` into the row's
ViT or latent tokens), so the sequence is assembled with gathers of static shape, inside jit.
The velocity head `llm2vae` reads the generation tokens; `lm_head` the text tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import files as files_lib
from robust_u1_jax import pixels
from robust_u1_jax.models import attention, attention_mask, layers, qwen2_mot
from robust_u1_jax.models.kv_cache import KVCache
from robust_u1_jax.models.qwen2_mot import LLMConfig, Qwen2MoT
from robust_u1_jax.models.siglip import Connector, SiglipConfig, SiglipVisionTower
from robust_u1_jax.models.vae import AutoEncoder, VAEConfig

Array = jax.Array

TEXT, VIT, LATENT, PAD = 0, 1, 2, -1

# Rule set of sharding.RULES per top-level attribute of `Bagel`.
COMPONENTS = {"language_model": "llm", "vit_model": "vit", "connector": "vit", "vae": "vae",
              "*": "llm"}


@dataclasses.dataclass(frozen=True)
class BagelConfig:
  llm: LLMConfig
  vit: SiglipConfig
  vae: VAEConfig
  latent_patch_size: int = 2
  max_latent_size: int = 64  # latent patches per side: 64 x 16 px = 1024 px images at most

  @property
  def latent_channels(self) -> int:
    """Width of one latent token: a p x p patch of VAE channels."""
    return self.latent_patch_size ** 2 * self.vae.z_channels

  @property
  def latent_downsample(self) -> int:
    """Pixels per latent token along each side (VAE downsample x patch)."""
    return self.vae.downsample * self.latent_patch_size

  @classmethod
  def tiny(cls, **llm_overrides) -> BagelConfig:
    return cls(llm=LLMConfig.tiny(**llm_overrides), vit=SiglipConfig.tiny(), vae=VAEConfig.tiny(),
               max_latent_size=8)

  @classmethod
  def bagel_7b(cls, **llm_overrides) -> BagelConfig:
    return cls(llm=LLMConfig.bagel_7b(**llm_overrides), vit=SiglipConfig.so400m(),
               vae=VAEConfig.flux())

  @classmethod
  def bagel_1p5b(cls, **llm_overrides) -> BagelConfig:
    """BAGEL-7B's ViT and VAE around an LLM of Qwen2.5-1.5B's shapes (LLMConfig.bagel_1p5b)."""
    return cls(llm=LLMConfig.bagel_1p5b(**llm_overrides), vit=SiglipConfig.so400m(),
               vae=VAEConfig.flux())

  @classmethod
  def from_model_dir(cls, path: str, **llm_overrides) -> BagelConfig:
    """Reads `llm_config.json` and `vit_config.json` of a BAGEL / Robust-U1 model directory."""
    files = {name: os.path.join(path, name) for name in ("llm_config.json", "vit_config.json")}
    for name, file in files.items():
      if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: missing {name} (a BAGEL model directory holds "
                                "llm_config.json, vit_config.json, ema.safetensors, "
                                "ae.safetensors)")
    llm = LLMConfig.from_hf_config(files_lib.read_json_object(files["llm_config.json"]),
                                   source=files["llm_config.json"], **llm_overrides)
    vit = SiglipConfig.from_hf_config(files["vit_config.json"], drop_last_layer=True,
                                      max_patches_per_side=70)
    return cls(llm=llm, vit=vit, vae=VAEConfig.flux())


# Named model sizes, as a run config's `model` field names them.
PRESETS = {"tiny": BagelConfig.tiny, "bagel_1p5b": BagelConfig.bagel_1p5b,
           "bagel_7b": BagelConfig.bagel_7b}


def preset(name: str, vocab_size: int | None = None, **llm_overrides) -> BagelConfig:
  """The BagelConfig named `name` in PRESETS; `vocab_size` (when given) and `llm_overrides`
  (dtype, param_dtype, remat, ...) replace the preset's LLM fields."""
  if name not in PRESETS:
    raise ValueError(f"model preset {name!r} is unknown; allowed: {', '.join(PRESETS)}")
  if vocab_size:
    llm_overrides["vocab_size"] = vocab_size
  return PRESETS[name](**llm_overrides)


@functools.lru_cache(maxsize=8)
def _sincos_table(dim: int, grid: int) -> np.ndarray:
  return layers.sincos_2d_table(dim, grid)


@flax.struct.dataclass
class SequenceInputs:
  """One batch of packed rows, everything but the latent values (which depend on the step).

  Shapes: B rows of T tokens; Nv ViT patches and Nl latent tokens per row.
  """
  text_ids: Array  # (B, T) int32: ids at TEXT tokens, anything elsewhere
  token_kind: Array  # (B, T) int32: TEXT, VIT, LATENT or PAD
  source_index: Array  # (B, T) int32: index into the row's ViT or latent tokens
  positions: Array  # (B, T) int32 RoPE positions
  layout: attention_mask.Layout  # (B, T) fields for the packed mask
  vit_patches: Array  # (B, Nv, 3 p p) uint8 pixels (or float already in [-1, 1])
  vit_position_ids: Array  # (B, Nv) int32, h * S + w
  vit_segment_ids: Array  # (B, Nv) int32, 1.. per image, 0 padding
  latent_position_ids: Array  # (B, Nl) int32, h * max_latent_size + w
  latent_seq_index: Array  # (B, Nl) int32: where each latent token sits in the row
  # (B, Nl) int32: which token of the row's VAE-encoded images (stacked, all of one size) feeds
  # each latent token; training gathers the encoded latents with it.
  latent_image_index: Array
  # Static: at most this many understanding-expert tokens (TEXT and VIT) per row, the capacity of
  # that expert's buffer (`bound_experts` declares it); None: T. The generation expert's is Nl.
  max_und: int | None = flax.struct.field(pytree_node=False, default=None)

  def routing(self) -> qwen2_mot.Routing:
    """Each token to its expert (latent tokens: generation; padding: none), with capacities
    `max_und` and Nl."""
    kind = self.token_kind
    return qwen2_mot.route_tokens(kind == LATENT, kind != PAD, und_capacity=self.max_und,
                                  gen_capacity=min(self.latent_seq_index.shape[1], kind.shape[1]))


def bound_experts(inputs: SequenceInputs) -> SequenceInputs:
  """Host side (rows of numpy arrays): declares `max_und` = T - Nl when every row holds at most
  that many understanding tokens, so the two experts' buffers together are one row. Rows sized by
  a sample that fills its canvases always do, as do packed rows split by data.latent_budget (the
  packer fills each expert's share); packed rows without the split, whose latent slots are the
  whole row, keep None (both buffers a row)."""
  kind = np.asarray(inputs.token_kind)
  t, nl = kind.shape[1], inputs.latent_seq_index.shape[1]
  und = ((kind == TEXT) | (kind == VIT)).sum(axis=1)
  if nl < t and int(und.max(initial=0)) <= t - nl:
    return inputs.replace(max_und=t - nl)
  return inputs


class Bagel(nnx.Module):
  """Language model + SigLIP + connector + generation heads + (always frozen) FLUX VAE."""

  def __init__(self, config: BagelConfig, *, rngs: nnx.Rngs):
    self.config = c = config
    dtype, param_dtype = c.llm.dtype, c.llm.param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = c.llm.hidden_size
    self.language_model = Qwen2MoT(c.llm, rngs=rngs)
    self.vit_model = SiglipVisionTower(c.vit, remat=c.llm.remat, attention=c.llm.attention, **kw)
    self.connector = Connector(c.vit.hidden_size, hidden, c.vit.max_patches_per_side, **kw)
    self.time_embedder = layers.TimestepEmbedder(hidden, **kw)
    self.vae2llm = layers.dense(c.latent_channels, hidden, (None, "embed"), **kw)
    # Zero-initialised as in BAGEL: a fresh generation head predicts zero velocity.
    self.llm2vae = layers.dense(hidden, c.latent_channels, ("embed", None),
                                kernel_init=nnx.initializers.zeros_init(), **kw)
    self.vae = AutoEncoder(c.vae, param_dtype=param_dtype, rngs=rngs)

  # -- token embeddings ---------------------------------------------------------------------------

  def embed_latents(self, latents_bnc: Array, timesteps_bn: Array, position_ids_bn: Array) -> Array:
    b, n, _ = latents_bnc.shape
    time = self.time_embedder(timesteps_bn.reshape(-1)).reshape(b, n, -1)
    table = jnp.asarray(_sincos_table(self.config.llm.hidden_size, self.config.max_latent_size))
    pos = jnp.take(table, position_ids_bn, axis=0)
    x = self.vae2llm(latents_bnc.astype(self.config.llm.dtype))
    return x + time.astype(x.dtype) + pos.astype(x.dtype)

  def embed_vit(self, patches_bnp: Array, position_ids_bn: Array, segment_ids_bn: Array) -> Array:
    if patches_bnp.dtype == jnp.uint8:  # pixels as the data path ships them -> SigLIP's [-1, 1]
      patches_bnp = pixels.to_float(patches_bnp, model_range=True)
    features = self.vit_model(patches_bnp, position_ids_bn, segment_ids_bn)
    return self.connector(features, position_ids_bn)

  def embed_sequence(self, inputs: SequenceInputs, latents_bnc: Array | None,
                     timesteps_bn: Array | None) -> Array:
    """(B, T, hidden) input embeddings of packed rows (see the module docstring)."""
    self._check_inputs(inputs, latents_bnc, timesteps_bn)
    kind = inputs.token_kind
    x = self.language_model.embed(jnp.where(kind == TEXT, inputs.text_ids, 0))
    if inputs.vit_patches.shape[1]:
      vit = self.embed_vit(inputs.vit_patches, inputs.vit_position_ids, inputs.vit_segment_ids)
      x = jnp.where((kind == VIT)[..., None], _gather(vit, inputs.source_index).astype(x.dtype), x)
    if latents_bnc is not None and latents_bnc.shape[1]:
      lat = self.embed_latents(latents_bnc, timesteps_bn, inputs.latent_position_ids)
      x = jnp.where((kind == LATENT)[..., None], _gather(lat, inputs.source_index).astype(x.dtype),
                    x)
    return jnp.where((kind == PAD)[..., None], 0, x)

  def _check_inputs(self, inputs: SequenceInputs, latents_bnc: Array | None,
                    timesteps_bn: Array | None) -> None:
    """Shape checks at the model's door, static so free under jit: a row field of the wrong width
    or latents of the wrong size fail here, naming the field, instead of as a broadcast error in a
    gather or an attention layer far below."""
    chex.assert_rank(inputs.token_kind, 2, custom_message="SequenceInputs.token_kind (B, T)")
    b, t = inputs.token_kind.shape
    nv, nl = inputs.vit_patches.shape[1], inputs.latent_seq_index.shape[1]
    fields = {"text_ids": (b, t), "source_index": (b, t), "positions": (b, t),
              "vit_patches": (b, nv, self.config.vit.patch_dim), "vit_position_ids": (b, nv),
              "vit_segment_ids": (b, nv), "latent_position_ids": (b, nl),
              "latent_seq_index": (b, nl), "latent_image_index": (b, nl)}
    for name, shape in fields.items():
      chex.assert_shape(getattr(inputs, name), shape, custom_message=f"SequenceInputs.{name}")
    for f in dataclasses.fields(inputs.layout):
      chex.assert_shape(getattr(inputs.layout, f.name), (b, t),
                        custom_message=f"SequenceInputs.layout.{f.name}")
    if latents_bnc is not None:
      chex.assert_shape(latents_bnc, (b, nl, self.config.latent_channels),
                        custom_message="latents_bnc: one latent token per latent_seq_index")
      chex.assert_shape(timesteps_bn, (b, nl), custom_message="timesteps_bn")

  # -- training forward ---------------------------------------------------------------------------

  def __call__(self, inputs: SequenceInputs, latents_bnc: Array | None = None,
               timesteps_bn: Array | None = None) -> Array:
    """Final hidden states (B, T, hidden) over packed rows with the BAGEL mask."""
    x = self.embed_sequence(inputs, latents_bnc, timesteps_bn)
    # Described per token: the platform's fused kernel takes it without a (T, T) mask.
    mask = attention.PackedMask(inputs.layout)
    return self.language_model(x, inputs.positions, mask, inputs.routing())

  def velocity(self, hidden_btd: Array, latent_seq_index_bn: Array) -> Array:
    """Predicted velocity (B, Nl, latent_channels) at the latent tokens."""
    return self.llm2vae(_gather(hidden_btd, latent_seq_index_bn)).astype(jnp.float32)

  def text_logits(self, hidden_btd: Array) -> Array:
    return self.language_model.logits(hidden_btd).astype(jnp.float32)

  # -- KV-cached inference ------------------------------------------------------------------------

  def init_cache(self, batch: int, max_length: int) -> KVCache:
    return self.language_model.init_cache(batch, max_length)

  def prefill(self, cache: KVCache, inputs: SequenceInputs, latents_bnc: Array | None = None,
              timesteps_bn: Array | None = None) -> KVCache:
    """Appends context tokens (text, ViT and clean-latent blocks) to the cache.

    `inputs.positions` are offsets from the cache's next position (start at 0 for a new block
    run), so the same block inputs serve every CFG context.
    """
    x = self.embed_sequence(inputs, latents_bnc, timesteps_bn)
    positions = inputs.positions + cache.next_position[:, None]
    mask = attention_mask.packed_mask(inputs.layout)
    _, cache = self.language_model.extend(cache, x, positions, mask, inputs.routing(),
                                          valid_bt=inputs.token_kind != PAD)
    return cache

  def denoise_velocity(self, cache: KVCache, inputs: SequenceInputs, x_t_bnc: Array,
                       t_b: Array) -> Array:
    """Velocity of a noisy latent block (markers + latent tokens) against a cached context.

    The block attends the whole valid context of its row and itself bidirectionally (padding
    tokens attend nothing); the cache is left unchanged, so every denoising step reuses the one
    prefill.
    """
    n = x_t_bnc.shape[1]
    timesteps = jnp.broadcast_to(t_b[:, None], (t_b.shape[0], n))
    x = self.embed_sequence(inputs, x_t_bnc, timesteps)
    positions = inputs.positions + cache.next_position[:, None]
    # mask None: the valid tokens see each other and the valid context (an attention.KeyMask,
    # which splash takes without a (T, S) array); padding sees nothing.
    hidden, _ = self.language_model.extend(cache, x, positions, None, inputs.routing(),
                                           valid_bt=inputs.token_kind != PAD, write=False)
    return self.velocity(hidden, inputs.latent_seq_index)


def _gather(values_bnd: Array, index_bt: Array) -> Array:
  """values[b, index[b, t]] with out-of-range indices clamped (masked by the caller)."""
  index = jnp.clip(index_bt, 0, values_bnd.shape[1] - 1)
  return jnp.take_along_axis(values_bnd, index[..., None], axis=1)


# -- latents <-> tokens ---------------------------------------------------------------------------


def patchify_latents(z_bhwc: Array, p: int) -> Array:
  """(B, h, w, C) VAE latents -> (B, (h/p)(w/p), p p C) tokens, row-major, each (p, q, c) as
  BAGEL."""
  b, h, w, c = z_bhwc.shape
  x = z_bhwc.reshape(b, h // p, p, w // p, p, c)
  return jnp.einsum("bhpwqc->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify_latents(tokens_bnc: Array, h: int, w: int, p: int) -> Array:
  """Inverse of `patchify_latents` for a latent grid of h x w (VAE resolution)."""
  b, _, pc = tokens_bnc.shape
  c = pc // (p * p)
  x = tokens_bnc.reshape(b, h // p, w // p, p, p, c)
  return jnp.einsum("bhwpqc->bhpwqc", x).reshape(b, h, w, c)


def latent_position_ids(height: int, width: int, downsample: int, max_latent_size: int
                        ) -> np.ndarray:
  """h * max_latent_size + w over the latent-token grid of an image of height x width pixels."""
  gh, gw = height // downsample, width // downsample
  if gh > max_latent_size or gw > max_latent_size:
    raise ValueError(f"image {height}x{width} has a {gh}x{gw} latent grid; the model supports "
                     f"at most {max_latent_size} per side")
  hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  return (hh * max_latent_size + ww).reshape(-1).astype(np.int32)
