"""Stage II, Flow-GRPO on the recovery sampler: rollout, rewards, advantages and the policy update
in one jitted step (DESIGN section 5).

Per corrupted image the step draws G recoveries. The three CFG contexts (full; without text;
without images) are prefilled once per image and shared by its group; the sampler runs Euler
steps except a window of W stochastic SDE steps, whose transitions are scored again under the
current policy for the PPO-clip ratio. The context is recomputed inside the loss because its
clean-latent tokens pass through the generation expert being trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import sampling
from robust_u1_jax.data import packing
from robust_u1_jax.models import bagel as bagel_lib
from robust_u1_jax.models import sequence
from robust_u1_jax.training import flow_matching, grpo, host_batch, sft
from robust_u1_jax.training import rewards as rewards_lib
from robust_u1_jax.training.state import TrainState, apply_gradients, merge_model


@dataclasses.dataclass(frozen=True)
class RLSettings:
  group_size: int
  num_steps: int
  window_size: int
  noise_level: float
  timestep_shift: float
  cfg_text_scale: float
  cfg_img_scale: float
  cfg_renorm_min: float
  clip_low: float
  clip_high: float
  adv_clip: float
  beta: float
  ema_decay: float = 0.0

  @classmethod
  def inference(cls, num_steps: int) -> RLSettings:
    """Deterministic recovery with the paper's inference guidance (shift 3, s_t 4, s_i 2)."""
    return cls(group_size=1, num_steps=num_steps, window_size=0, noise_level=0.0,
               timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_renorm_min=0.0,
               clip_low=0.0, clip_high=0.0, adv_clip=0.0, beta=0.0)

  @classmethod
  def from_config(cls, rl, ema_decay: float = 0.0) -> RLSettings:
    return cls(rl.group_size, rl.num_steps, rl.window_size, rl.noise_level, rl.timestep_shift,
               rl.cfg_text_scale, rl.cfg_img_scale, rl.cfg_renorm_min, rl.clip_low, rl.clip_high,
               rl.adv_clip, rl.beta, ema_decay)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RecoveryInputs:
  """Everything the sampler needs for a batch of corrupted images (built on the host)."""
  full: bagel_lib.SequenceInputs  # [VAE, ViT, text] context
  no_text: bagel_lib.SequenceInputs  # [VAE, ViT]
  no_image: bagel_lib.SequenceInputs  # [text]
  noisy: bagel_lib.SequenceInputs  # the generation block alone
  corrupted: jax.Array  # (B, 1, H, W, 3) uint8, VAE size
  clean: jax.Array  # (B, H, W, 3) uint8, the reward's reference


def recovery_inputs(samples: Sequence[Mapping[str, Any]], config: bagel_lib.BagelConfig,
                    markers: sequence.Markers, instruction_ids: Sequence[int] | None = None
                    ) -> RecoveryInputs:
  """Host side: numpy rows of the three CFG contexts and the noisy block for samples of one size.

  A sample is a dict of `packing.batch_samples`: 'corrupted' (VAE size), optionally
  'corrupted_vit' and 'clean' (the reward's reference; default: corrupted), and
  'instruction_ids' unless `instruction_ids` is given for all.
  """
  sizes = sorted({(s["corrupted"].shape[:2], s.get("corrupted_vit", s["corrupted"]).shape[:2])
                  for s in samples})
  if len(sizes) > 1:
    raise ValueError(
        f"recovery sampling batches images of one size, got (VAE, ViT) sizes {sizes}: for a "
        "source of many sizes set data.crop_square=True and data.vae_min_side = "
        "data.vae_max_side (the RL stage), or precompute recoveries (the reasoning stage's "
        "reason.recovered_images=cache)")
  if instruction_ids is not None:
    samples = [{**s, "instruction_ids": instruction_ids} for s in samples]

  def rows(**use):
    per_image = [[sft.sample_blocks(s, None, target=False, **use)] for s in samples]
    seq_len, max_vit, max_latent = (max(x) for x in zip(
        *(sequence.lengths(r[0], config) for r in per_image)))
    return sequence.build_rows(per_image, config, markers, seq_len=seq_len, max_vit=max_vit,
                               max_latent=max_latent)

  corrupted = np.stack([s["corrupted"] for s in samples])
  h, w = corrupted.shape[1:3]
  noisy_blocks = [sequence.Latent(h, w, noisy=True)]
  seq_len, _, max_latent = sequence.lengths(noisy_blocks, config)
  noisy = sequence.build_rows([[noisy_blocks]] * len(samples), config, markers,
                              seq_len=seq_len, max_vit=0, max_latent=max_latent)
  return RecoveryInputs(full=rows(), no_text=rows(use_text=False),
                        no_image=rows(use_vit=False, use_vae=False), noisy=noisy,
                        corrupted=corrupted[:, None],
                        clean=np.stack([s.get("clean", s["corrupted"]) for s in samples]))


def batch_recovery_inputs(batch: Mapping[str, Any], config: bagel_lib.BagelConfig,
                          markers: sequence.Markers,
                          instruction_ids: Sequence[int] | None = None) -> RecoveryInputs:
  """`recovery_inputs` of an unpacked pipeline batch (one sample per row)."""
  if host_batch.is_packed(batch):
    raise ValueError("recovery sampling takes unpacked batches: set data.token_budget=0")
  samples = [row[0] for row in packing.batch_samples(batch)]
  return recovery_inputs(samples, config, markers, instruction_ids)


def _repeat(tree, times: int):
  return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), tree)


def _repeat_cache(cache, times: int):
  """Each row's context `times` times in a row: one prefill serves a whole group."""
  return cache.replace(k=jnp.repeat(cache.k, times, axis=1), v=jnp.repeat(cache.v, times, axis=1),
                       valid=jnp.repeat(cache.valid, times, axis=0),
                       next_position=jnp.repeat(cache.next_position, times, axis=0))


def make_velocity_fn(model: bagel_lib.Bagel, inputs: RecoveryInputs, s: RLSettings, *,
                     repeat: int = 1) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Prefills the CFG contexts once and returns the guided velocity v(x_t, t)."""
  cond = flow_matching.encode_images(model, inputs.corrupted)

  def context(rows: bagel_lib.SequenceInputs):
    latents = jnp.take_along_axis(cond, rows.latent_image_index[..., None], axis=1)
    cache = model.init_cache(rows.token_kind.shape[0], rows.token_kind.shape[1])
    cache = model.prefill(cache, rows, latents, jnp.zeros(latents.shape[:2]))
    return _repeat_cache(cache, repeat)

  caches = {"full": context(inputs.full)}
  if s.cfg_text_scale != 1.0:
    caches["no_text"] = context(inputs.no_text)
  if s.cfg_img_scale != 1.0:
    caches["no_image"] = context(inputs.no_image)
  noisy = _repeat(inputs.noisy, repeat)

  def velocity(x_bnc, t_b):
    v = {k: model.denoise_velocity(c, noisy, x_bnc, t_b) for k, c in caches.items()}
    return sampling.cfg_velocity(v["full"], v.get("no_text"), v.get("no_image"),
                                 s.cfg_text_scale, s.cfg_img_scale, s.cfg_renorm_min)

  return velocity


def decode_tokens(model: bagel_lib.Bagel, tokens_bnc: jax.Array, height: int, width: int
                  ) -> jax.Array:
  """Latent tokens -> images in [0, 1] (B, H, W, 3)."""
  d = model.config.vae.downsample
  z = bagel_lib.unpatchify_latents(tokens_bnc, height // d, width // d,
                                   model.config.latent_patch_size)
  return jnp.clip((model.vae.decode(z) + 1.0) / 2.0, 0.0, 1.0)


def window_start(key: jax.Array, s: RLSettings) -> jax.Array:
  """Uniform in [0, N/2 - W] (the stochastic window stays in the noisier half)."""
  high = max(s.num_steps // 2 - s.window_size, 0)
  return jax.random.randint(key, (), 0, high + 1)


class RLFunctions(NamedTuple):
  rollout: Callable  # (state, inputs, key) -> (Rollout, recovered images, clean images)
  policy_terms: Callable  # (params, frozen, inputs, Rollout) -> window SDEStep under `params`
  step: Callable  # (state, inputs) -> (state, metrics)


def make_step(graphdef: nnx.GraphDef, tx, s: RLSettings,
              reward_fn: Callable[[jax.Array, jax.Array, Any], Mapping[str, jax.Array]]):
  """step(state, RecoveryInputs) -> (state, metrics). `reward_fn(recovered, clean, aux)` reads the
  frozen reward models from `state.aux`."""
  return make_functions(graphdef, tx, s, reward_fn).step


def make_functions(graphdef: nnx.GraphDef, tx, s: RLSettings,
                   reward_fn: Callable[[jax.Array, jax.Array, Any], Mapping[str, jax.Array]]
                   ) -> RLFunctions:
  """The step and the two halves it is made of (for tests and analysis)."""
  schedule = sampling.timesteps(s.num_steps, s.timestep_shift)
  g = s.group_size

  def rollout(state: TrainState, inputs: RecoveryInputs, key):
    model = merge_model(graphdef, state.params, state.frozen)
    velocity = make_velocity_fn(model, inputs, s, repeat=g)
    b = inputs.clean.shape[0]
    n, c = inputs.noisy.latent_seq_index.shape[1], model.config.latent_channels
    k_init, k_win, k_sde = jax.random.split(key, 3)
    x_init = jax.random.normal(k_init, (b * g, n, c))
    out = sampling.sample(velocity, x_init, schedule, k_sde,
                          window_start=window_start(k_win, s), window_size=s.window_size,
                          noise_level=s.noise_level)
    h, w = inputs.clean.shape[1:3]
    recovered = decode_tokens(model, out.x_final, h, w)
    clean = jnp.repeat(inputs.clean, g, axis=0).astype(jnp.float32) / 255.0
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(recovered), clean

  def policy_terms(params, frozen, inputs, out: sampling.Rollout):
    model = merge_model(graphdef, params, frozen)
    velocity = make_velocity_fn(model, inputs, s, repeat=g)

    def one(x, x_next, t, t_next):
      v = velocity(x, jnp.full((x.shape[0],), t))
      return sampling.sde_step(x, v, t, t_next, schedule[1], s.noise_level, x_next=x_next)

    return jax.vmap(one)(out.window_x, out.window_x_next, out.window_t, out.window_t_next)

  def loss_fn(params, state: TrainState, inputs, out, advantages):
    steps = policy_terms(params, state.frozen, inputs, out)
    ref_mean = None
    if s.beta > 0:
      ref = policy_terms(state.aux["reference"], state.frozen, inputs, out)
      ref_mean = jax.lax.stop_gradient(ref.mean)
    adv = jnp.broadcast_to(advantages, out.window_log_prob.shape)
    # Window steps and samples flattened into one batch of transitions.
    flat = lambda x: x.reshape((-1,) + steps.mean.shape[2:])
    terms = grpo.flow_grpo_loss(
        steps.log_prob.reshape(-1), out.window_log_prob.reshape(-1), adv.reshape(-1),
        clip_low=s.clip_low, clip_high=s.clip_high, beta=s.beta, mean=flat(steps.mean),
        ref_mean=None if ref_mean is None else flat(ref_mean),
        std=flat(jnp.broadcast_to(steps.std, steps.mean.shape)))
    return terms.loss, terms

  def step(state: TrainState, inputs: RecoveryInputs):
    rng, key = jax.random.split(state.rng)
    out, recovered, clean = rollout(state, inputs, key)
    rewards = reward_fn(recovered, clean, state.aux)
    total = rewards["total"].reshape(-1, g)
    advantages = grpo.group_advantages(total, clip=s.adv_clip).reshape(-1)
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, inputs, out, advantages)
    state, opt_metrics = apply_gradients(state.replace(rng=rng), grads, tx, s.ema_decay)
    metrics = {"loss": loss, "policy_loss": terms.policy_loss, "kl": terms.kl,
               "clip_fraction": terms.clip_fraction, "approx_kl": terms.approx_kl,
               "log_prob_drift": terms.log_ratio_mean,
               "advantage_mean": advantages.mean(), "advantage_std": advantages.std(),
               "advantage_abs_max": jnp.abs(advantages).max(), **opt_metrics}
    for name, value in rewards.items():
      metrics[f"reward_{name}_mean"] = value.mean()
      metrics[f"reward_{name}_std"] = value.std()
    return state, metrics

  return RLFunctions(rollout, policy_terms, step)


def reward_fn_from_config(rl_config, clip_graphdef: nnx.GraphDef | None):
  """(recovered, clean, aux) -> rewards; the frozen CLIP tower's state rides in aux['clip']."""
  weights = dict(rl_config.reward_weights)

  def reward_fn(recovered, clean, aux):
    embed = None
    if clip_graphdef is not None:
      from robust_u1_jax.models import clip as clip_lib

      clip_model = nnx.merge(clip_graphdef, aux["clip"])
      embed = lambda images: clip_model.encode_image(
          clip_lib.preprocess(images, clip_model.config.image_size))
    return rewards_lib.build_rewards(weights, alpha=rl_config.clip_alpha, embed_image=embed)(
        recovered, clean)

  return reward_fn


def load_clip_tower(rl_config):
  """The frozen CLIP model of the semantic reward, from `rl.clip_checkpoint`."""
  from robust_u1_jax.checkpoints import clip_keys
  from robust_u1_jax.models import clip as clip_lib

  if not rl_config.clip_checkpoint:
    raise ValueError("rl.reward_weights.clip > 0 needs rl.clip_checkpoint: a CLIP ViT-B/32 "
                     ".safetensors file (open_clip or transformers naming)")
  configs = {"vit_b32": clip_lib.CLIPConfig.vit_b32, "tiny": clip_lib.CLIPConfig.tiny}
  model = clip_lib.CLIP(configs[rl_config.clip_model](), rngs=nnx.Rngs(0))
  clip_keys.load_clip(rl_config.clip_checkpoint, model)
  return nnx.split(model)


def build(ctx):
  """The Flow-GRPO stage for `trainer.train`."""
  from robust_u1_jax.training import evaluation, trainer

  c = ctx.config
  settings = RLSettings.from_config(c.rl, c.optimizer.ema_decay)
  aux, clip_graphdef = {}, None
  if c.rl.reward_weights.get("clip", 0.0) > 0:
    clip_graphdef, aux["clip"] = load_clip_tower(c.rl)
  reward_fn = reward_fn_from_config(c.rl, clip_graphdef)
  model_config = ctx.model.config

  def host_inputs(batch, rng):
    del rng  # the rollout's randomness lives in the train state's key
    return batch_recovery_inputs(batch, model_config, ctx.markers)

  return trainer.StageSpec(
      trainable=sft.GENERATION_PARAMS, host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, tx, settings, reward_fn),
      samples_per_step=c.data.batch_size * settings.group_size, aux=aux,
      reference=settings.beta > 0,
      evaluate=evaluation.make_recovery_eval(ctx, c.rl.eval_num_steps))
