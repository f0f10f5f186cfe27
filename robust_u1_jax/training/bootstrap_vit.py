"""Bootstrap, part 3: the Bagel's own ViT trained contrastively on the world's images and captions.

BAGEL reads images through SigLIP, a ViT pretrained contrastively on image-text pairs. The tiny
Bagel's ViT starts from random weights, and trained only by the base's answer loss it reads
colours and little else, so the base learns to answer from its VAE tokens instead; those pass
through the generation expert, which SFT and RL then train, and the answers erode (measured:
configs/demo.py, `answer_vae_dropout`). This part is the stand-in for SigLIP's pretraining: the
Bagel's SigLIP tower (`vit_model`, at the data's ViT size), its features mean-pooled over the
image's patches and projected by a linear head, against a CLIP text tower (`clip.model`) on the
world's captions (`bootstrap_clip.caption_tokens`), with `bootstrap_clip.info_nce`. The head and
the text tower are dropped: the trained ViT is written into the model of `init_from` (the VAE
part's), the model directory the base part starts from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import pixels, sharding
from robust_u1_jax.models import clip as clip_lib
from robust_u1_jax.models import layers, siglip
from robust_u1_jax.training import bootstrap_clip, run_setup
from robust_u1_jax.training.stage_spec import StageSpec
from robust_u1_jax.training.state import loss_step, merge_model

DATA_STAGE = bootstrap_clip.DATA_STAGE  # clean images with their captions
COMPONENTS = {"vit_model": "vit", "*": "clip"}


class ImageTextPair(nnx.Module):
  """The Bagel's ViT with a pooling head, and a CLIP text tower: embeddings of one space."""

  def __init__(self, vit_config: siglip.SiglipConfig, text_config: clip_lib.CLIPConfig, *,
               rngs: nnx.Rngs):
    self.vit_model = siglip.SiglipVisionTower(vit_config, rngs=rngs)
    self.head = layers.dense(vit_config.hidden_size, text_config.embed_dim, ("embed", None),
                             rngs=rngs)
    self.text = clip_lib.CLIPTextTower(text_config, rngs=rngs)
    # CLIP's initial temperature 1 / 0.07, stored as its log.
    self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32), out_sharding=())

  def encode_image(self, patches_bnp: jax.Array, position_ids_bn: jax.Array,
                   segment_ids_bn: jax.Array) -> jax.Array:
    """`vit_inputs` -> (B, E) float32 unit vectors: the mean of the ViT's features over each
    image's own patches."""
    patches_bnp = pixels.to_float(patches_bnp, model_range=True)
    features_bnd = self.vit_model(patches_bnp, position_ids_bn, segment_ids_bn)  # padding: 0
    pooled_bd = features_bnd.sum(1) / (segment_ids_bn > 0).sum(1, keepdims=True)
    return clip_lib.l2_normalize(self.head(pooled_bd))

  def encode_text(self, tokens_bt: jax.Array) -> jax.Array:
    return clip_lib.l2_normalize(self.text(tokens_bt))


def embed(model: ImageTextPair, images, tokens_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`bootstrap_clip.embed`'s contract; `images`: `vit_inputs`."""
  return model.encode_image(*images), model.encode_text(tokens_bt)


def vit_inputs(batch: dict, config: siglip.SiglipConfig
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Host side: the batch's images at the ViT size (clean: the bootstrap data is never corrupted)
  as (B, N) patches (uint8), position ids and segment ids (1 on an image's own patches, 0 on the
  canvas's padding), each image patchified as every stage's ViT blocks are (`siglip.patchify`)."""
  images, hw = batch["corrupted_vit"], batch["corrupted_vit_hw"]
  p = config.patch_size
  n = (images.shape[1] // p) * (images.shape[2] // p)
  patches = np.zeros((len(images), n, config.patch_dim), np.uint8)
  positions, segments = np.zeros((2, len(images), n), np.int32)
  for i, (image, (h, w)) in enumerate(zip(images, hw)):
    own, position_ids = siglip.patchify(image[:h, :w], p, config.max_patches_per_side)
    patches[i, :len(own)], positions[i, :len(own)], segments[i, :len(own)] = own, position_ids, 1
  return patches, positions, segments


def make_step(graphdef: nnx.GraphDef, tx, *, ema_decay: float, max_logit_scale: float):
  """step(state, (*vit_inputs, caption tokens)) -> (state, metrics)."""

  def loss_fn(params, frozen, batch, key):
    del key  # the contrastive loss draws nothing
    *images, tokens = batch
    model = merge_model(graphdef, params, frozen)
    img, txt = embed(model, images, tokens)
    return bootstrap_clip.info_nce(img, txt, tokens, model.logit_scale[...], max_logit_scale)

  return loss_step(loss_fn, tx, ema_decay)


def make_save(ctx):
  """save(workdir, graphdef, state, config): `init_from`'s model with the trained ViT, as the
  trainer's model directory."""
  model = ctx.model  # loaded now: the trainer saves inside its mesh context, where it cannot be

  def save(workdir, graphdef, state, config):
    params = state.ema if state.ema is not None else state.params
    pair = merge_model(graphdef, params, state.frozen)
    nnx.update(model.vit_model, nnx.state(pair.vit_model))
    run_setup.write_model(model, workdir, config, recovers=False)  # a ViT: no recovery

  return save


def build(ctx):
  """The contrastive ViT stage for `trainer.train`: trains an ImageTextPair around a fresh ViT of
  the Bagel's shapes (the ViT `init_from` holds has never been trained), saves the Bagel."""
  c = ctx.config
  text_config = bootstrap_clip.caption_model_config(c.clip.model)
  vit_config = ctx.model_config.vit
  model = sharding.create_sharded(
      lambda: ImageTextPair(vit_config, text_config, rngs=nnx.Rngs(c.seed)), COMPONENTS,
      ctx.mesh)

  def host_inputs(batch, rng):
    del rng
    return (*vit_inputs(batch, vit_config),
            bootstrap_clip.caption_batch(batch["caption_text"], text_config))

  return StageSpec(
      trainable=(r".",), host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, tx, ema_decay=c.optimizer.ema_decay,
                                               max_logit_scale=c.clip.max_logit_scale),
      samples_per_step=c.data.batch_size,
      evaluate=bootstrap_clip.make_eval(ctx, text_config, embed,
                                        lambda batch: vit_inputs(batch, vit_config)),
      model=model,
      save=make_save(ctx), data_stage=DATA_STAGE)
