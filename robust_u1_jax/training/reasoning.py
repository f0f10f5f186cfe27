"""Stage III, joint reasoning: cross-entropy on the answer of
`[corrupted image (VAE + ViT)] [question + options + instruction] [recovered image (VAE + ViT)]
[answer]`, training the understanding side (DESIGN section 5).

The recovered image comes from the current (frozen) recovery path, generated on the fly inside the
step with the same sampler as inference: its pixels are re-encoded by the VAE and patchified for
the ViT in-graph, so the host only ships a placeholder for that image's patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import sampling
from robust_u1_jax.data import transforms
from robust_u1_jax.models import sequence
from robust_u1_jax.models import vit as vit_lib
from robust_u1_jax.models.bagel import BagelConfig
from robust_u1_jax.training import flow_matching, rl, sft
from robust_u1_jax.training.state import TrainState, apply_gradients

# Trainable parameters of stage III: the understanding expert, its head and the ViT connector.
UNDERSTANDING_PARAMS = (r"^language_model\.layers\.\d+\.und\.", r"^language_model\.final_norm\.und\.",
                        r"^language_model\.embed_tokens\.", r"^language_model\.lm_head\.",
                        r"^connector\.")
RECOVERED_SEGMENT = 2  # ViT segment id of the recovered image (the corrupted one is 1)
LENGTH_BUCKET = 64  # rows are padded to a multiple of this many tokens


def _ids(batch: Mapping[str, np.ndarray], field: str) -> list[list[int]]:
  return [list(ids[:n]) for ids, n in zip(batch[f"{field}_ids"], batch[f"{field}_lengths"])]


def reasoning_blocks(corrupted_vae, corrupted_vit, question_ids, answer_ids) -> list:
  h, w = corrupted_vae.shape[:2]
  placeholder = np.zeros(corrupted_vit.shape, np.uint8)  # replaced in-graph by the recovery
  return [sequence.Latent(h, w, image=0), sequence.Vit(sft.vit_input(corrupted_vit)),
          sequence.Text(question_ids), sequence.Latent(h, w, image=1),
          sequence.Vit(sft.vit_input(placeholder)), sequence.Text(answer_ids)]


def reasoning_rows(batch: Mapping[str, np.ndarray], config: BagelConfig,
                   markers: sequence.Markers, instruction_ids: Sequence[int]):
  """Host side: (SequenceInputs, next-token labels (B, T) with -1 off the answer,
  RecoveryInputs for the on-the-fly recovery, corrupted VAE images (B, 1, H, W, 3))."""
  corrupted = batch["corrupted"]
  corrupted_vit = batch.get("corrupted_vit", corrupted)
  questions, answers = _ids(batch, "question"), _ids(batch, "answer")
  rows, lengths, answer_starts = [], [], []
  for i in range(len(corrupted)):
    blocks = reasoning_blocks(corrupted[i], corrupted_vit[i], questions[i], answers[i])
    rows.append([blocks])
    lengths.append(sequence.lengths(blocks, config))
    answer_starts.append(sequence.lengths(blocks[:-1], config)[0])
  seq_len, max_vit, max_latent = (max(x) for x in zip(*lengths))
  seq_len = -(-seq_len // LENGTH_BUCKET) * LENGTH_BUCKET  # few distinct shapes to compile
  inputs = sequence.build_rows(rows, config, markers, seq_len=seq_len, max_vit=max_vit,
                               max_latent=max_latent)
  labels = np.full((len(corrupted), seq_len), -1, np.int32)
  for i, (start, answer) in enumerate(zip(answer_starts, answers)):
    # Position p predicts token p + 1: every answer token after the first.
    labels[i, start:start + len(answer) - 1] = answer[1:]
  recovery = rl.recovery_inputs(corrupted, corrupted_vit, batch.get("clean", corrupted),
                                [instruction_ids] * len(corrupted), config, markers)
  return inputs, labels, recovery


def recover(model, recovery: rl.RecoveryInputs, settings: rl.RLSettings, key) -> jax.Array:
  """Recovered images in [0, 1] by the deterministic sampler (no gradient)."""
  velocity = rl.make_velocity_fn(model, recovery, settings)
  b = recovery.corrupted.shape[0]
  n = recovery.noisy.latent_seq_index.shape[1]
  x_init = jax.random.normal(key, (b, n, model.config.latent_channels))
  out = sampling.sample(velocity, x_init, sampling.timesteps(settings.num_steps,
                                                             settings.timestep_shift), key)
  h, w = recovery.corrupted.shape[2:4]
  return jax.lax.stop_gradient(rl.decode_tokens(model, out.x_final, h, w))


def with_recovered_patches(inputs, recovered_bhwc: jax.Array, vit_hw: tuple[int, int],
                           patch: int):
  """Writes the recovered image's ViT patches over the placeholder segment."""
  images = jax.image.resize(recovered_bhwc, (recovered_bhwc.shape[0],) + vit_hw + (3,),
                            "bilinear") * 2.0 - 1.0
  patches = vit_lib.images_to_patches(images, patch)
  segment = inputs.vit_segment_ids == RECOVERED_SEGMENT
  index = jnp.clip(jnp.cumsum(segment, axis=1) - 1, 0, patches.shape[1] - 1)
  gathered = jnp.take_along_axis(patches, index[..., None], axis=1)
  return inputs.replace(vit_patches=jnp.where(segment[..., None], gathered.astype(
      inputs.vit_patches.dtype), inputs.vit_patches))


def answer_loss(model, inputs, labels, corrupted, recovered) -> tuple[jax.Array, dict]:
  images = jnp.concatenate([corrupted.astype(jnp.float32) / 255.0, recovered[:, None]], axis=1)
  tokens = flow_matching.encode_images(model, images)
  latents = jnp.take_along_axis(tokens, inputs.latent_image_index[..., None], axis=1)
  hidden = model(inputs, latents, jnp.zeros(latents.shape[:2]))
  logits = model.text_logits(hidden)
  mask = labels >= 0
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  count = jnp.maximum(mask.sum(), 1)
  loss = jnp.sum(jnp.where(mask, nll, 0.0)) / count
  accuracy = jnp.sum(jnp.where(mask, jnp.argmax(logits, -1) == labels, False)) / count
  return loss, {"ce_loss": loss, "token_accuracy": accuracy}


def make_step(graphdef: nnx.GraphDef, tx, settings: rl.RLSettings,
              vit_rule: Mapping[str, int], ema_decay: float):
  """step(state, (inputs, labels, recovery)) -> (state, metrics).

  `vit_rule` is the data config's ViT resize rule: the recovered image goes to the ViT at the size
  the pipeline gave the corrupted one, derived from the (static) VAE image size.
  """

  def step(state: TrainState, batch) -> tuple[TrainState, dict[str, Any]]:
    inputs, labels, recovery = batch
    rng, key = jax.random.split(state.rng)
    model = nnx.merge(graphdef, state.params, state.frozen)
    recovered = recover(model, recovery, settings, key)
    vit_hw = transforms.bagel_size(*recovered.shape[1:3], **vit_rule)
    inputs = with_recovered_patches(inputs, recovered, vit_hw, model.config.vit.patch_size)

    def loss_fn(params):
      return answer_loss(nnx.merge(graphdef, params, state.frozen), inputs, labels,
                         recovery.corrupted, recovered)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, opt_metrics = apply_gradients(state.replace(rng=rng), grads, tx, ema_decay)
    return state, {"loss": loss, **metrics, **opt_metrics}

  return step


def build(ctx):
  """The reasoning stage for `trainer.train` (recoveries generated on the fly)."""
  from robust_u1_jax.data import tokenizer as tokenizer_lib
  from robust_u1_jax.training import trainer

  c = ctx.config
  if c.reason.recovered_images != "on_the_fly":
    raise ValueError(f"reason.recovered_images={c.reason.recovered_images!r}: only 'on_the_fly' "
                     "is implemented so far")
  instruction = tokenizer_lib.encode_text_block(ctx.tokenizer, c.instruction)
  settings = rl.RLSettings.inference(c.reason.recovery_steps)
  model_config = ctx.model.config
  vit_rule = transforms.resize_rule(c.data, "vit")

  def host_inputs(batch, rng):
    del rng
    return reasoning_rows(batch, model_config, ctx.markers, instruction)

  return trainer.StageSpec(
      trainable=UNDERSTANDING_PARAMS, host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, tx, settings, vit_rule,
                                               c.optimizer.ema_decay),
      samples_per_step=c.data.batch_size)
