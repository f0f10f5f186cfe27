"""KV-cached contexts: images and texts in, in any order, with BAGEL's three guidance contexts.

A context is a `KVCache` row per sample. Blocks are built on the host (`data/sequence.py`:
`<|vision_start|>` + tokens + `<|vision_end|>` per image, with one shared RoPE position) and
appended by one prefill each, so text and images can follow one another and be decoded after.
An image enters as VAE tokens then ViT tokens, as BAGEL's `update_context_image` adds them.

Classifier-free guidance of image generation reads three contexts
(docs/design.md#flow-matching-and-guidance): the full one; `no_text` (BAGEL's `cfg_text` context:
the images, without the text that follows them) and `no_image` (BAGEL's `cfg_img` context: the
texts only). `Contexts` keeps the three side by side with
BAGEL's `interleave_inference` bookkeeping: a text goes into the full and text-only contexts after
the full one is copied to `no_text`; an image goes into the full context, which is then copied to
`no_text`.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import sampling as sampling_lib
from robust_u1_jax.data import sequence
from robust_u1_jax.inference import images as images_lib
from robust_u1_jax.models import bagel as bagel_lib
from robust_u1_jax.models import kv_cache, vae as vae_lib
from robust_u1_jax.models.kv_cache import KVCache

Array = jax.Array
POSTERIORS = ("sample", "mean")


def encode_images(model: bagel_lib.Bagel, images_bkhwc: Array, key: Array | None = None
                  ) -> Array:
  """K images per row -> (B, K * N, latent_channels) tokens, image-major; the VAE is frozen.

  `key` None takes the posterior mean; otherwise the latent is a posterior sample
  `mean + exp(logvar / 2) noise`, as BAGEL's `AutoEncoder.encode` draws it. `key` may be one key,
  or one per row (B, 2) so that a row's draw does not depend on its batch.
  """
  # The step's image stack is the input most easily shipped in the wrong layout (one image per
  # row without the K axis, channels first): name it here, not in the VAE's first convolution.
  chex.assert_rank(images_bkhwc, 5,
                   custom_message="images_bkhwc: K images per row, (B, K, H, W, 3)")
  chex.assert_axis_dimension(images_bkhwc, 4, 3, custom_message="images_bkhwc: RGB channels last")
  b, k, h, w, c = images_bkhwc.shape
  # One image slot at a time (every row's k-th image together): the encoder's float32 activations
  # at full resolution are then those of B images, not B * K. At K = 28 canvases of 512 x 512 per
  # row they set the 7B SFT step's peak on v5p-64 (docs/PERFORMANCE.md, "Memory").
  x_kbhwc = jnp.swapaxes(images_lib.to_model_range(images_bkhwc), 0, 1)
  mean, logvar = (jnp.swapaxes(m, 0, 1).reshape((b * k,) + m.shape[2:])
                  for m in jax.lax.map(model.vae.latent_dist, x_kbhwc))
  z = mean
  if key is not None:
    row_shape = (k,) + mean.shape[1:]
    noise = sampling_lib.normal(key, (b,) + row_shape, jnp.float32)
    std = jnp.exp(0.5 * jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0))
    z = mean + (std * noise.reshape(mean.shape)).astype(mean.dtype)
  tokens = bagel_lib.patchify_latents(vae_lib.normalize_latent(z, model.vae.config),
                                      model.config.latent_patch_size)
  return jax.lax.stop_gradient(tokens.reshape(b, k * tokens.shape[1], tokens.shape[2]))


def posterior_key(posterior: str, key: Array) -> Array | None:
  """The key `encode_images` takes for a `vae_posterior` setting ('sample' or 'mean')."""
  if posterior not in POSTERIORS:
    raise ValueError(f"vae_posterior {posterior!r} is unknown; allowed: {', '.join(POSTERIORS)}")
  return key if posterior == "sample" else None


def decode_latents(model: bagel_lib.Bagel, tokens_bnc: Array, height: int, width: int) -> Array:
  """Latent tokens of an image of height x width pixels -> images in [0, 1] (B, H, W, 3)."""
  d = model.config.vae.downsample
  z = bagel_lib.unpatchify_latents(tokens_bnc, height // d, width // d,
                                   model.config.latent_patch_size)
  return jnp.clip((model.vae.decode(z) + 1.0) / 2.0, 0.0, 1.0)


def prefill(model: bagel_lib.Bagel, cache: KVCache, rows: bagel_lib.SequenceInputs,
            latents_bnc: Array | None = None) -> KVCache:
  """Appends rows of context blocks (text, ViT and clean latent blocks) to the cache."""
  if latents_bnc is None:
    latents_bnc = jnp.zeros(rows.latent_position_ids.shape + (model.config.latent_channels,))
  return model.prefill(cache, rows, latents_bnc, jnp.zeros(latents_bnc.shape[:2]))


def gather_latents(tokens_bnc: Array, rows: bagel_lib.SequenceInputs) -> Array:
  """Each latent token of the rows, from the stacked encodings of the row's images."""
  chex.assert_equal_shape_prefix([tokens_bnc, rows.latent_image_index], 1,
                                 custom_message="encoded images and rows: one image stack per row")
  return jnp.take_along_axis(tokens_bnc, rows.latent_image_index[..., None], axis=1)


# -- host side: blocks -> rows --------------------------------------------------------------------


def rows(blocks_per_row: Sequence[Sequence[sequence.Block]], config: bagel_lib.BagelConfig,
         markers: sequence.Markers, *, min_length: int = 0) -> bagel_lib.SequenceInputs:
  """Numpy rows, one sample each, padded to the longest (and at least `min_length` tokens), each
  expert's buffer bounded by the rows' tokens (`bagel.bound_experts`): without the bound the
  understanding expert also ran over every latent token, which doubled a denoising step's
  matmuls (the noisy block is all latents but its two markers)."""
  seq_len, max_vit, max_latent = sequence.max_lengths(blocks_per_row, config)
  return bagel_lib.bound_experts(sequence.build_rows(
      [[b] for b in blocks_per_row], config, markers, seq_len=max(seq_len, min_length),
      max_vit=max_vit, max_latent=max_latent))


def noisy_rows(height: int, width: int, n: int, config: bagel_lib.BagelConfig,
               markers: sequence.Markers) -> bagel_lib.SequenceInputs:
  """`n` rows of one noisy latent block of an image's size: what every denoising step runs."""
  return rows([[sequence.Latent(height, width, noisy=True)]] * n, config, markers)


def image_blocks(vae_image: np.ndarray, vit_image: np.ndarray, *, vae: bool = True,
                 vit: bool = True) -> list[sequence.Block]:
  """An image as it enters a context: VAE tokens, then ViT tokens (uint8 images)."""
  out: list[sequence.Block] = []
  if vae:
    out.append(sequence.Latent(*vae_image.shape[:2]))
  if vit:
    out.append(sequence.Vit(sequence.vit_input(vit_image)))
  return out


def text_bucket(length: int) -> int:
  """Text rows are padded to a power of two (at least 16): few shapes to compile."""
  return max(16, 1 << max(0, length - 1).bit_length())


# -- the three guidance contexts ------------------------------------------------------------------


@flax.struct.dataclass
class Contexts:
  """The full context and the two guidance contexts of image generation, B rows each, all with
  the same number of cache slots (so one model call can answer all three)."""
  full: KVCache
  no_text: KVCache
  no_image: KVCache

  @classmethod
  def create(cls, model: bagel_lib.Bagel, batch: int, max_length: int) -> Contexts:
    cache = model.init_cache(batch, max_length)
    return cls(cache, cache, cache)

  def grow(self, min_free: int) -> Contexts:
    """Room for `min_free` more tokens in each (host side); all keep one size."""
    need = max(int(c.length) for c in (self.full, self.no_text, self.no_image)) + min_free
    return Contexts(*(c.grow(need - int(c.length)) for c in (self.full, self.no_text,
                                                               self.no_image)))

  def add_text(self, model, rows: bagel_lib.SequenceInputs) -> Contexts:
    """BAGEL's text input: `no_text` becomes the full context as it was before the text."""
    return Contexts(full=prefill(model, self.full, rows), no_text=self.full,
                    no_image=prefill(model, self.no_image, rows))

  def add_image(self, model, rows: bagel_lib.SequenceInputs, latents_bnc: Array) -> Contexts:
    """BAGEL's image input: into the full context, which `no_text` then copies."""
    full = prefill(model, self.full, rows, latents_bnc)
    return Contexts(full=full, no_text=full, no_image=self.no_image)

  def add_generated_image(self, model, rows: bagel_lib.SequenceInputs, latents_bnc: Array
                          ) -> Contexts:
    """The released reasoner's step after an image is generated: into full and `no_text`."""
    return Contexts(full=prefill(model, self.full, rows, latents_bnc),
                    no_text=prefill(model, self.no_text, rows, latents_bnc),
                    no_image=self.no_image)

  def add_generated_text(self, model, rows: bagel_lib.SequenceInputs) -> Contexts:
    """Generated text joins the full context only (BAGEL's thinking mode does the same)."""
    return self.replace(full=prefill(model, self.full, rows))

  def stacked(self, use_no_text: bool, use_no_image: bool) -> tuple[KVCache, int]:
    """(one cache of the branches in use, full first, then no_text, no_image; branch count)."""
    caches = [self.full] + [self.no_text] * use_no_text + [self.no_image] * use_no_image
    return kv_cache.concatenate(caches), len(caches)
