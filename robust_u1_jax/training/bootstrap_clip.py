"""Bootstrap, part 2: a CLIP trained contrastively on the world's images and captions.

Flow-GRPO's semantic reward compares recovered and clean images in a CLIP image tower; the
released setup uses OpenAI's ViT-B/32, the built-in world trains its own (CLIPConfig.tiny) here.
Its text tower reads captions through `caption_tokens`: a word-level vocabulary of the world's
caption language in which a colour and shape ("red circle") or a quadrant ("top left") is one
token, so every caption fits the tiny tower's 12-token context without truncation, with the
end-of-text token the largest id (the tower pools at argmax of the ids, as OpenAI's does).

The model is saved as `workdir/model/clip.safetensors` in open_clip naming, which the RL stage's
`load_clip_tower` reads (rl.clip_checkpoint, rl.clip_model matching clip.model).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import sharding
from robust_u1_jax.checkpoints.clip_keys import CLIP_FILE
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.data import shapes
from robust_u1_jax.models import clip as clip_lib
from robust_u1_jax.training.stage_spec import StageSpec
from robust_u1_jax.training.state import TrainState, loss_step, merge_model

MODELS = {"tiny": clip_lib.CLIPConfig.tiny, "vit_b32": clip_lib.CLIPConfig.vit_b32}
DATA_STAGE = "pretrain"  # clean images with their captions
GRID_IMAGES = 8

# -- captions -> token ids -------------------------------------------------------------------------

PAD, SOT = 0, 1
_HALVES = ("left", "right", "top", "bottom")
_PHRASES = ([f"{c} {s}" for c in shapes.COLOR_NAMES for s in shapes.SHAPES]
            + list(shapes.NUMBER_WORDS) + list(shapes.QUADRANTS) + list(_HALVES)
            + list(shapes.BACKGROUNDS) + ["<unk>"])
TOKEN_IDS = {phrase: i + 2 for i, phrase in enumerate(_PHRASES)}
# Words that carry nothing the tokens above do not ("two red stars on the left" -> two, red star,
# left); "background" always follows its kind.
_STOP_WORDS = frozenset(("a", "an", "at", "the", "on", "and", "background"))
_SINGULAR = {**{s: s for s in shapes.SHAPES}, **{p: s for s, p in shapes.PLURALS.items()}}


def min_vocab_size() -> int:
  """Ids the caption vocabulary needs: padding, start, the phrases and end-of-text."""
  return len(TOKEN_IDS) + 3


def caption_tokens(caption: str, context_length: int, vocab_size: int) -> np.ndarray:
  """int32 (context_length,): start, the caption's phrase tokens, end-of-text (= vocab_size - 1),
  then padding; a caption longer than the context keeps its first phrases (open_clip's cut)."""
  words = re.findall(r"[a-z]+", caption.lower())
  ids, i = [], 0
  while i < len(words):
    w, nxt = words[i], words[i + 1] if i + 1 < len(words) else ""
    if w in shapes.COLORS and nxt in _SINGULAR:
      ids.append(TOKEN_IDS[f"{w} {_SINGULAR[nxt]}"])
      i += 2
      continue
    if w in ("top", "bottom") and nxt in ("left", "right"):
      ids.append(TOKEN_IDS[f"{w} {nxt}"])
      i += 2
      continue
    if w not in _STOP_WORDS:
      ids.append(TOKEN_IDS.get(w, TOKEN_IDS["<unk>"]))
    i += 1
  out = np.full(context_length, PAD, np.int32)
  row = [SOT, *ids[:context_length - 2], vocab_size - 1]
  out[:len(row)] = row
  return out


def caption_model_config(name: str) -> clip_lib.CLIPConfig:
  """CLIPConfig `name` (clip.model), checked to hold the caption vocabulary."""
  config = MODELS[name]()
  if config.vocab_size < min_vocab_size():
    raise ValueError(f"clip.model={name!r} has a vocabulary of {config.vocab_size}, fewer than "
                     f"the {min_vocab_size()} caption tokens")
  return config


def caption_batch(captions: Sequence[str], config: clip_lib.CLIPConfig) -> np.ndarray:
  return np.stack([caption_tokens(str(c), config.context_length, config.vocab_size)
                   for c in captions])


# -- loss, step ------------------------------------------------------------------------------------


def embed(model: clip_lib.CLIP, images_bhwc: jax.Array, tokens_bt: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
  """(B, E) L2-normalised image and caption embeddings of uint8 images and caption tokens."""
  img = model.encode_image(clip_lib.preprocess(images_bhwc, model.config.image_size))
  return img, model.encode_text(tokens_bt)


def contrastive_loss(model: clip_lib.CLIP, images_bhwc: jax.Array, tokens_bt: jax.Array,
                     max_logit_scale: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`info_nce` of the CLIP's embeddings."""
  img, txt = embed(model, images_bhwc, tokens_bt)
  return info_nce(img, txt, tokens_bt, model.logit_scale[...], max_logit_scale)


def info_nce(img_be: jax.Array, txt_be: jax.Array, tokens_bt: jax.Array, log_scale: jax.Array,
             max_logit_scale: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE over the batch of normalised embeddings. Identical captions (two scenes
  the caption language cannot tell apart) are all positives, so no pair is pushed apart for being
  the same text."""
  # open_clip clamps the learned temperature at 100 so the logits cannot blow up.
  scale = jnp.exp(jnp.minimum(log_scale, np.log(max_logit_scale)))
  logits = scale * img_be @ txt_be.T
  same = jnp.all(tokens_bt[:, None, :] == tokens_bt[None, :, :], axis=-1).astype(jnp.float32)
  targets = same / same.sum(axis=-1, keepdims=True)  # symmetric, so it serves both directions
  image_to_text = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))
  text_to_image = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=-1), axis=-1))
  accuracy = jnp.mean(jnp.take_along_axis(same, jnp.argmax(logits, axis=-1)[:, None], axis=1))
  return (image_to_text + text_to_image) / 2, {"retrieval_accuracy": accuracy,
                                               "logit_scale": scale}


def make_step(graphdef: nnx.GraphDef, tx, *, ema_decay: float, max_logit_scale: float):
  """step(state, (images (B, H, W, 3) uint8, caption tokens (B, T))) -> (state, metrics)."""

  def loss_fn(params, frozen, batch, key):
    del key  # the contrastive loss draws nothing
    images, tokens = batch
    return contrastive_loss(merge_model(graphdef, params, frozen), images, tokens,
                            max_logit_scale)

  return loss_step(loss_fn, tx, ema_decay)


# -- evaluation ------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _similarity(embed_fn, graphdef, params, frozen, images, tokens):
  img, txt = embed_fn(nnx.merge(graphdef, params, frozen), images, tokens)
  return img @ txt.T


def retrieval(similarity: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
  """Image -> caption (and caption -> image) top-1 accuracy, a retrieved caption identical to the
  image's own counting as right; chance: the mean fraction of captions that are right."""
  same = np.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)
  rows = np.arange(len(tokens))
  return {"eval_retrieval_accuracy": float(same[rows, similarity.argmax(1)].mean()),
          "eval_text_retrieval_accuracy": float(same[similarity.argmax(0), rows].mean()),
          "eval_retrieval_chance": float(same.mean(1).mean())}


def make_eval(ctx, model_config: clip_lib.CLIPConfig, embed_fn: Callable = embed,
              image_inputs: Callable[[dict], Any] = lambda batch: batch["clean"]) -> Callable:
  """evaluate(graphdef, state) -> ([query image, image of the retrieved caption] columns,
  retrieval metrics on the eval_data.batch_size first validation records); `embed_fn(model,
  image_inputs(batch), tokens)` embeds as `embed` does."""
  c = ctx.config
  data = pipeline_lib.make_pipeline(c.eval_data, seed=c.seed, tokenizer=ctx.tokenizer,
                                    stage=DATA_STAGE)
  batch = next(data)
  data.close()
  images, tokens = batch["clean"], caption_batch(batch["caption_text"], model_config)
  inputs = jax.tree.map(jnp.asarray, image_inputs(batch))

  def evaluate(graphdef, state):
    params = state.ema if state.ema is not None else state.params
    similarity = np.asarray(jax.device_get(_similarity(
        embed_fn, graphdef, params, state.frozen, inputs, jnp.asarray(tokens))))
    n = min(GRID_IMAGES, len(images))
    retrieved = similarity.argmax(1)[:n]
    columns = {"image": list(images[:n]),
               "retrieved caption's image": [images[j] for j in retrieved]}
    return columns, retrieval(similarity, tokens)

  return evaluate


# -- saving, stage ---------------------------------------------------------------------------------


def save(workdir: str, graphdef, state: TrainState, config) -> None:
  """`workdir/model/clip.safetensors` (EMA weights when kept), open_clip naming."""
  from robust_u1_jax.checkpoints import clip_keys
  from robust_u1_jax.checkpoints import tensor_files

  params = state.ema if state.ema is not None else state.params
  tensors = clip_keys.export_clip(merge_model(graphdef, params, state.frozen))
  if jax.process_index() == 0:
    path = os.path.join(workdir, "model")
    os.makedirs(path, exist_ok=True)
    tensor_files.save_safetensors(tensors, os.path.join(path, CLIP_FILE))
    print(f"CLIP ({config.clip.model}) written to {os.path.join(path, CLIP_FILE)}", flush=True)


def build(ctx):
  """The contrastive CLIP stage for `trainer.train`: trains a CLIP of its own, not the Bagel."""
  c = ctx.config
  model_config = caption_model_config(c.clip.model)
  model = sharding.create_sharded(
      lambda: clip_lib.CLIP(model_config, rngs=nnx.Rngs(c.seed)), clip_lib.COMPONENT, ctx.mesh)

  def host_inputs(batch, rng):
    del rng
    return batch["clean"], caption_batch(batch["caption_text"], model_config)

  return StageSpec(
      trainable=(r".",), host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, tx, ema_decay=c.optimizer.ema_decay,
                                               max_logit_scale=c.clip.max_logit_scale),
      samples_per_step=c.data.batch_size, evaluate=make_eval(ctx, model_config), model=model,
      save=save, data_stage=DATA_STAGE)
