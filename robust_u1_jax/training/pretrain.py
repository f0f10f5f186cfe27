"""Bootstrap, part 4: the base model, the built-in world's stand-in for a pretrained BAGEL.

Everything but the VAE trains (the VAE comes frozen from part 1, `bootstrap_vae`; with
`pretrain.freeze_vit` the ViT comes frozen from the vit part too), on CLEAN images only, so the
model can describe and draw the world but has never seen a corruption. Each record of a batch
gives one row of each kind, in BAGEL's block formats (data/sequence.py):

  understanding  [VAE: image] [ViT: image] [prompt] [answer]: cross-entropy on the answer
                 (`reasoning.answer_loss`); the prompt is one of the world's multiple-choice
                 questions (answer: its Robust-R1 answer text, TYPE none) or the caption prompt
                 (answer: the record's caption), drawn per record. A question row may instead
                 take the reasoning stage's two-image layout with the clean image in both places,
                 [image] [question + recovery instruction] [image] [answer]
                 (`two_image_fraction`): the stand-in for BAGEL's interleaved multi-image
                 pretraining, without which the reasoning stage's [corrupted] [question]
                 [recovered] rows start from a layout the base has never answered in. With
                 `answer_vae_dropout` a one-image row leaves out the VAE tokens ([ViT] [prompt]
                 [answer], as BAGEL's understanding data), so the model learns to read the
                 image through the ViT: the VAE tokens pass through the generation expert,
                 which SFT and RL go on to train
  generation     flow matching (`flow_matching.flow_matching_loss`) of the image's latents:
                 [caption] [noisy image] (text to image), or `recovery_blocks` of the clean image
                 with the reconstruction instruction (the image from its own VAE and ViT tokens);
                 condition dropout as in SFT teaches the unconditional velocities of guidance

Both kinds go through the same model in one step; the loss is their weighted sum.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import pixels
from robust_u1_jax.data import answer_format, packing
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.data import sequence
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.inference import context as context_lib
from robust_u1_jax.inference import images as images_lib
from robust_u1_jax.inference import recovery as recovery_lib
from robust_u1_jax.models.bagel import BagelConfig
from robust_u1_jax.training import flow_matching, reasoning
from robust_u1_jax.training.stage_spec import StageSpec
from robust_u1_jax.training.state import loss_step, merge_model

# Every parameter but the VAE's, which stays bit for bit as part 1 wrote it; with
# `pretrain.freeze_vit` the ViT's too, as the vit part wrote it.
BASE_PARAMS = (r"^(?!vae\.)",)
BASE_PARAMS_FROZEN_VIT = (r"^(?!vae\.|vit_model\.)",)
DATA_STAGE = "pretrain"
GRID_IMAGES = 4
MAX_ANSWER_TOKENS = 96  # the world's answers are at most 77 tokens, its captions 38


# -- host side: blocks and rows --------------------------------------------------------------------


def pretrain_rows(batch: Mapping[str, Any], config: BagelConfig, markers: sequence.Markers,
                  rng: np.random.Generator, settings: Mapping[str, Any]):
  """Host side: an unpacked 'pretrain' pipeline batch -> (understanding SequenceInputs, their
  next-token labels (B, T) with -1 off the answers, their VAE images (B, K, H, W, 3): the clean
  image once, or twice with two-image rows (`two_image_fraction` > 0), generation
  SequenceInputs, their VAE images (B, 2, H, W, 3): the condition and the target, both the clean
  image, each encoded with its own posterior draw).

  Row shapes are fixed by the batch's padded text widths (data.text_pad_to fixes them for good),
  so the step compiles once.
  """
  size = sequence.canvas(batch, "clean")
  prompt, instruction = settings["caption_prompt_ids"], settings["instruction_ids"]
  # Without two-image rows no draw is spent on them, and rows keep their one-image shapes.
  two_images = settings["two_image_fraction"] > 0
  und, gen, answers = [], [], []
  for r, (sample,) in enumerate(packing.batch_samples(batch)):
    # No draw without the dropout, so the rows (and a run's data) stay as they were.
    use_vae = not settings["answer_vae_dropout"] or rng.uniform() >= settings["answer_vae_dropout"]
    if rng.uniform() < settings["caption_fraction"]:
      blocks = sequence.understanding_blocks(sample, prompt, sample["caption_ids"], size,
                                             use_vae=use_vae)
    elif two_images and rng.uniform() < settings["two_image_fraction"]:
      blocks = two_image_blocks(sample, size)
    else:
      blocks = sequence.understanding_blocks(sample, sample["question_ids"],
                                             sample["answer_ids"], size, use_vae=use_vae)
    answers.append((r, blocks))
    und.append([blocks])
    keep = rng.uniform(size=3) >= np.asarray(settings["dropout"])
    if rng.uniform() < settings["text_to_image_fraction"]:
      gen.append([sequence.text_to_image_blocks(sample, size, use_text=keep[0])])
    else:
      gen.append([sequence.reconstruction_blocks(sample, instruction, size, use_text=keep[0],
                                                 use_vit=keep[1], use_vae=keep[2])])
  widest = {k: v[0] for k, v in batch.items()}  # texts at the batch's padded width
  und_layouts = [
      sequence.understanding_blocks(widest, widest["question_ids"], widest["answer_ids"], size),
      sequence.understanding_blocks(widest, prompt, widest["caption_ids"], size)]
  if two_images:
    und_layouts.append(two_image_blocks(widest, size))
  und_bounds = sequence.max_lengths(und_layouts, config)
  gen_bounds = sequence.max_lengths([sequence.text_to_image_blocks(widest, size),
                                     sequence.reconstruction_blocks(widest, instruction, size)],
                                    config)
  und_images = ("clean", "clean") if two_images else ("clean",)
  und_inputs = sequence.build_rows(und, config, markers, seq_len=und_bounds[0],
                                   max_vit=und_bounds[1], max_latent=und_bounds[2],
                                   images_per_sample=len(und_images))
  labels = np.full((len(und), und_bounds[0]), -1, np.int32)
  for r, blocks in answers:
    sequence.write_labels(labels[r], 0, blocks, config, markers)
  gen_inputs = sequence.build_rows(gen, config, markers, seq_len=gen_bounds[0],
                                   max_vit=gen_bounds[1], max_latent=gen_bounds[2],
                                   images_per_sample=2)
  return (und_inputs, labels, sequence.image_stack(batch, und_images), gen_inputs,
          sequence.image_stack(batch, ("clean", "clean")))


def two_image_blocks(sample: Mapping[str, Any], canvas: tuple[int, int] | None
                     ) -> list[sequence.Block]:
  """The reasoning stage's layout (`sequence.reasoning_blocks`) of a question on the clean image
  alone: [VAE][ViT] of the image [question + recovery instruction] [VAE][ViT] of the image again
  (VAE image 1) [answer]. The instruction is there because the reasoning stage and the evaluation
  put it there: a base that never read it between the images answers worse after it (44.5 %
  against 28.1 % in that layout without and with it, 128 validation questions, 2026-12-02)."""
  clean = sample["clean"]
  return sequence.reasoning_blocks(
      {**sample, "corrupted": clean, "question_ids": sample["recovery_question_ids"]}, canvas,
      recovered_vit=sample.get("corrupted_vit", clean))


# -- the step --------------------------------------------------------------------------------------


def pretrain_loss(model, batch, key: jax.Array, *, understanding_weight: float,
                  generation_weight: float, timestep_shift: float, vae_posterior: str = "sample"
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the answer cross-entropy and the flow-matching loss of `pretrain_rows`."""
  und_inputs, labels, und_images, gen_inputs, gen_images = batch
  und_key, gen_key = jax.random.split(key)
  ce, ce_metrics = reasoning.answer_loss(model, und_inputs, labels, und_images,
                                         context_lib.posterior_key(vae_posterior, und_key))
  mse, fm_metrics = flow_matching.flow_matching_loss(model, gen_inputs, gen_images, gen_key,
                                                     timestep_shift, vae_posterior)
  return understanding_weight * ce + generation_weight * mse, {**ce_metrics, **fm_metrics}


def loss_weights(config) -> dict[str, Any]:
  """`pretrain_loss`'s keyword arguments from a stage config."""
  p = config.pretrain
  return {"understanding_weight": p.understanding_weight,
          "generation_weight": p.generation_weight, "timestep_shift": p.timestep_shift,
          "vae_posterior": config.vae_posterior}


def row_settings(config, tokenizer) -> dict[str, Any]:
  """`pretrain_rows`'s settings from a stage config."""
  p = config.pretrain
  return {"caption_prompt_ids": tokenizer_lib.encode_text_block(tokenizer, p.caption_prompt),
          "instruction_ids": tokenizer_lib.encode_text_block(tokenizer,
                                                             p.reconstruction_instruction),
          "caption_fraction": p.caption_fraction,
          "two_image_fraction": p.two_image_fraction,
          "answer_vae_dropout": p.answer_vae_dropout,
          "text_to_image_fraction": p.text_to_image_fraction,
          "dropout": (p.text_dropout, p.vit_dropout, p.vae_dropout)}


def make_step(graphdef: nnx.GraphDef, tx, *, ema_decay: float, **weights):
  """step(state, pretrain_rows(...)) -> (state, metrics): one update on both losses; `weights`
  are `pretrain_loss`'s keyword arguments (`loss_weights`)."""

  def loss_fn(params, frozen, batch, key):
    return pretrain_loss(merge_model(graphdef, params, frozen), batch, key, **weights)

  return loss_step(loss_fn, tx, ema_decay)


# -- evaluation ------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 6))
def _reconstruct(graphdef, params, frozen, inputs, x_init, key, sampler):
  model = nnx.merge(graphdef, params, frozen)
  return recovery_lib.recover(model, inputs, sampler, key, x_init=x_init)[1]


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _draw(graphdef, params, frozen, caption_rows, noisy, x_init, key, sampler, size_hw):
  """Images from captions: BAGEL's text-to-image contexts (the text; nothing, unconditional)."""
  model = nnx.merge(graphdef, params, frozen)
  contexts = context_lib.Contexts.create(model, x_init.shape[0], caption_rows.token_kind.shape[1])
  contexts = contexts.add_text(model, caption_rows)
  velocity = recovery_lib.guided_velocity(model, contexts.full, contexts.no_text,
                                          contexts.no_image, noisy, sampler.guidance)
  latents = recovery_lib.sample_latents(velocity, x_init, sampler, key).x_final
  return context_lib.decode_latents(model, latents, *size_hw)


def _option_count(question_text: str) -> int:
  return max(len(re.findall(r"^[A-Z]\. ", question_text, flags=re.MULTILINE)), 1)


def make_eval(ctx) -> Callable:
  """evaluate(graphdef, state) -> ([original, reconstruction, drawn from its caption] columns,
  metrics) on the first eval_data.batch_size validation records:

    eval_answer_accuracy   greedy answers to the multiple-choice questions (chance beside it)
    eval_caption_accuracy  greedy captions identical to the true ones
    eval_reconstruction_psnr  of the sampler's reconstructions of the first GRID_IMAGES images
  """
  from robust_u1_jax.inference import engine as engine_lib

  c = ctx.config
  p = c.pretrain
  config, markers, tok = ctx.model.config, ctx.markers, ctx.tokenizer
  data = pipeline_lib.make_pipeline(c.eval_data, seed=c.seed, tokenizer=tok, stage=DATA_STAGE)
  samples = [row[0] for row in packing.batch_samples(next(data))]
  data.close()
  prompt = tokenizer_lib.encode_text_block(tok, p.caption_prompt)
  instruction = tokenizer_lib.encode_text_block(tok, p.reconstruction_instruction)
  shown = samples[:GRID_IMAGES]
  h, w = shown[0]["clean"].shape[:2]
  # Understanding: every question, then every caption prompt, as one batch of rows.
  ask = [sequence.understanding_blocks(s, s["question_ids"], [], None)[:-1] for s in samples]
  ask += [sequence.understanding_blocks(s, prompt, [], None)[:-1] for s in samples]
  ask_images = np.stack([s["clean"] for s in samples] * 2)[:, None]
  recon = jax.tree.map(jnp.asarray, recovery_lib.recovery_inputs(
      [{"corrupted": s["clean"], "corrupted_vit": s["corrupted_vit"]} for s in shown], config,
      markers, instruction))
  captions = jax.tree.map(jnp.asarray, context_lib.rows(
      [[sequence.Text(s["caption_ids"])] for s in shown], config, markers))
  noisy = jax.tree.map(jnp.asarray, context_lib.noisy_rows(h, w, len(shown), config, markers))
  key = jax.random.PRNGKey(c.seed)
  x_init = jax.random.normal(key, (len(shown), noisy.latent_seq_index.shape[1],
                                   config.latent_channels))
  sampler = recovery_lib.Sampler.from_config(c, p.eval_num_steps)
  # Image guidance needs an image in the context: text to image guides by the text alone.
  draw_sampler = dataclasses.replace(
      sampler, guidance=dataclasses.replace(sampler.guidance, image_scale=1.0))

  def evaluate(graphdef, state):
    params = state.ema if state.ema is not None else state.params
    model = nnx.merge(graphdef, params, state.frozen)
    rules = images_lib.ImageRules.from_data_config(c.data)
    engine = engine_lib.Engine.from_model(model, tok, rules)
    texts = [engine.decode(ids) for ids in engine.generate_batch(
        ask, ask_images, max_new_tokens=MAX_ANSWER_TOKENS, seed=c.seed)]
    answers, said = texts[:len(samples)], texts[len(samples):]
    letters = [answer_format.parse_answer(t) for t in answers]
    truth = [str(s["answer_letter"]) for s in samples]
    reconstructed = np.asarray(jax.device_get(_reconstruct(
        graphdef, params, state.frozen, recon, x_init, key, sampler)))
    drawn = np.asarray(jax.device_get(_draw(graphdef, params, state.frozen, captions, noisy,
                                            x_init, key, draw_sampler, (h, w))))
    clean = pixels.to_float(np.stack([s["clean"] for s in shown]))
    mse = np.mean((reconstructed - clean) ** 2, axis=(1, 2, 3))
    for s, text in zip(shown, said):
      print(f"  caption {s['caption_text']!r} -> said {text!r}", flush=True)
    metrics = {
        "eval_answer_accuracy": float(np.mean([a == t for a, t in zip(letters, truth)])),
        "eval_answer_chance": float(np.mean([1 / _option_count(str(s["question_text"]))
                                             for s in samples])),
        "eval_answer_parsed": float(np.mean([a is not None for a in letters])),
        "eval_caption_accuracy": float(np.mean([t.strip() == str(s["caption_text"]).strip()
                                                for t, s in zip(said, samples)])),
        "eval_reconstruction_psnr": float(np.mean(10 * np.log10(1 / np.maximum(mse, 1e-10)))),
    }
    columns = {"image": [s["clean"] for s in shown], "reconstructed": list(reconstructed),
               "drawn from its caption": list(drawn)}
    return columns, metrics

  return evaluate


# -- the stage -------------------------------------------------------------------------------------


def build(ctx):
  """The base-model stage for `trainer.train`; init_from is the vit part's workdir (the VAE
  and ViT the earlier parts trained)."""
  c = ctx.config
  if c.init_from == "random":
    print("warning: pretrain from init_from='random' trains on an untrained VAE's latents; pass "
          "the bootstrap_vae stage's workdir as init_from", flush=True)
  model_config = ctx.model.config
  settings = row_settings(c, ctx.tokenizer)

  def host_inputs(batch, rng):
    return pretrain_rows(batch, model_config, ctx.markers, rng, settings)

  return StageSpec(
      trainable=BASE_PARAMS_FROZEN_VIT if c.pretrain.freeze_vit else BASE_PARAMS,
      host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, tx, ema_decay=c.optimizer.ema_decay,
                                               **loss_weights(c)),
      samples_per_step=c.data.batch_size, evaluate=make_eval(ctx), data_stage=DATA_STAGE)
