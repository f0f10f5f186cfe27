"""Stage II, Flow-GRPO on the recovery sampler: rollout, rewards, advantages and the policy
updates in one jitted step (docs/design.md#flow-grpo).

Per corrupted image the step draws G recoveries with the inference package's sampler
(`inference/recovery.py`): the three CFG contexts are prefilled once per image and shared by its
group; the sampler runs Euler steps except a window of W stochastic SDE steps, whose transitions
are scored again under the current policy for the PPO-clip ratio. The context is recomputed
inside the loss because its clean-latent tokens pass through the generation expert being trained.

As in Flow-GRPO, one rollout feeds several optimizer updates: its B*G*W transitions (sample,
window step) are shuffled once per inner epoch and cut into mini-batches, one update each
(`rl.updates_per_rollout` updates over `rl.inner_epochs` passes). Every update after the first
scores transitions under parameters that have moved since the rollout, so the PPO ratio leaves 1
and the clip and the approximate KL act; with a single update the ratio is 1 up to rounding.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from robust_u1_jax import pixels
from robust_u1_jax import sampling
from robust_u1_jax.inference import context as context_lib
from robust_u1_jax.inference import recovery as recovery_lib
from robust_u1_jax.inference.recovery import RecoveryInputs
from robust_u1_jax.training import evaluation, grpo, sft
from robust_u1_jax.training import rewards as rewards_lib
from robust_u1_jax.training import state as state_lib
from robust_u1_jax.training.stage_spec import RunContext, StageSpec
from robust_u1_jax.training.state import TrainState, apply_gradients, merge_model


@dataclasses.dataclass(frozen=True)
class RLSettings:
  group_size: int
  num_steps: int
  window_size: int
  noise_level: float
  timestep_shift: float
  guidance: recovery_lib.Guidance
  clip_low: float
  clip_high: float
  adv_clip: float
  beta: float
  ema_decay: float = 0.0
  vae_posterior: str = "sample"
  # Optimizer updates per rollout = inner_epochs x mini-batches per epoch; each mini-batch holds
  # about B*G*W / (updates_per_rollout / inner_epochs) transitions. 1 and 1: today's single
  # update on every transition.
  updates_per_rollout: int = 1
  inner_epochs: int = 1

  @property
  def minibatches_per_epoch(self) -> int:
    return self.updates_per_rollout // self.inner_epochs

  @classmethod
  def from_config(cls, c) -> RLSettings:
    rl = c.rl
    guidance = recovery_lib.Guidance.from_config(c.guidance)
    return cls(rl.group_size, rl.num_steps, rl.window_size, rl.noise_level, rl.timestep_shift,
               guidance, rl.clip_low, rl.clip_high, rl.adv_clip, rl.beta,
               c.optimizer.ema_decay, c.vae_posterior, rl.updates_per_rollout, rl.inner_epochs)


def window_start(key: jax.Array, s: RLSettings) -> jax.Array:
  """Uniform in [0, N/2 - W] (the stochastic window stays in the noisier half)."""
  high = max(s.num_steps // 2 - s.window_size, 0)
  return jax.random.randint(key, (), 0, high + 1)


def rollout_vae_key(key: jax.Array) -> jax.Array:
  """The key a rollout drew its corrupted-image latent with (the fourth of its split)."""
  return jax.random.split(key, 4)[3]


def minibatch_masks(key: jax.Array, num_transitions: int, updates_per_rollout: int,
                    inner_epochs: int) -> jax.Array:
  """(updates_per_rollout, num_transitions) bool: the transitions each update takes, in order.

  Each inner epoch draws its own permutation from `key` and cuts the shuffled order into
  updates_per_rollout / inner_epochs contiguous mini-batches whose sizes differ by at most one, so
  every epoch takes every transition exactly once (sizes need not divide the transition count).
  """
  k = updates_per_rollout // inner_epochs

  def epoch(key):
    # A uniform permutation read as each transition's place in the shuffled order.
    position_t = jax.random.permutation(key, num_transitions)
    batch_t = position_t * k // num_transitions
    return batch_t[None, :] == jnp.arange(k)[:, None]  # (K, T)

  return jax.vmap(epoch)(jax.random.split(key, inner_epochs)).reshape(updates_per_rollout, -1)


class RLFunctions(NamedTuple):
  rollout: Callable  # (state, inputs, key) -> (Rollout, recovered images, clean images)
  # (params, frozen, inputs, Rollout, rollout_vae_key(key)) -> window SDEStep under `params`
  policy_terms: Callable
  # (state, inputs, Rollout, advantages (B*G,), vae_key, shuffle_key) -> (state, per-update
  # metrics, each (updates_per_rollout,)): the optimizer updates on one rollout
  updates: Callable
  step: Callable  # (state, inputs) -> (state, metrics)


def make_step(graphdef: nnx.GraphDef, tx, s: RLSettings,
              reward_fn: Callable[[jax.Array, jax.Array, Any], Mapping[str, jax.Array]]):
  """step(state, RecoveryInputs) -> (state, metrics). `reward_fn(recovered, clean, aux)` reads the
  frozen reward models from `state.aux`."""
  return make_functions(graphdef, tx, s, reward_fn).step


def make_functions(graphdef: nnx.GraphDef, tx, s: RLSettings,
                   reward_fn: Callable[[jax.Array, jax.Array, Any], Mapping[str, jax.Array]]
                   ) -> RLFunctions:
  """The step and the parts it is made of (for tests and analysis)."""
  schedule = sampling.timesteps(s.num_steps, s.timestep_shift)
  g = s.group_size

  def velocity_fn(model, inputs, vae_key):
    return recovery_lib.velocity_fn(model, inputs, s.guidance, repeat=g,
                                    posterior_key=context_lib.posterior_key(s.vae_posterior,
                                                                            vae_key))

  def rollout(state: TrainState, inputs: RecoveryInputs, key):
    model = merge_model(graphdef, state.params, state.frozen)
    k_init, k_win, k_sde, k_vae = jax.random.split(key, 4)
    velocity = velocity_fn(model, inputs, k_vae)
    b = inputs.clean.shape[0]
    n, c = inputs.noisy.latent_seq_index.shape[1], model.config.latent_channels
    x_init = jax.random.normal(k_init, (b * g, n, c))
    out = sampling.sample(velocity, x_init, schedule, k_sde,
                          window_start=window_start(k_win, s), window_size=s.window_size,
                          noise_level=s.noise_level)
    h, w = inputs.clean.shape[1:3]
    # One recovery of each image at a time (B images, sharded like the batch): the VAE decoder's
    # activations at full resolution are the rollout's largest buffers (16 images of 512 x 512
    # per chip decoded at once were about 50 GiB at G = 16 on v5p, docs/PERFORMANCE.md).
    x_gbnc = jnp.swapaxes(out.x_final.reshape((b, g) + out.x_final.shape[1:]), 0, 1)
    recovered_gb = jax.lax.map(lambda x: context_lib.decode_latents(model, x, h, w), x_gbnc)
    recovered = jnp.swapaxes(recovered_gb, 0, 1).reshape((b * g,) + recovered_gb.shape[2:])
    clean = pixels.to_float(jnp.repeat(inputs.clean, g, axis=0))
    return jax.lax.stop_gradient(out), jax.lax.stop_gradient(recovered), clean

  def policy_terms(params, frozen, inputs, out: sampling.Rollout, vae_key):
    """The window's steps scored under `params`, on the contexts the rollout saw (`vae_key`
    draws the same latent of the corrupted image)."""
    model = merge_model(graphdef, params, frozen)
    velocity = velocity_fn(model, inputs, vae_key)

    def one(x, x_next, t, t_next):
      v = velocity(x, jnp.full((x.shape[0],), t))
      return sampling.sde_step(x, v, t, t_next, schedule[1], s.noise_level, x_next=x_next)

    # The window's steps one after the other, each rematerialised: the forward keeps only each
    # step's inputs, and the backward recomputes one step's layers at a time (at G = 16 on v5p
    # one step's saved layer inputs are 10 GiB per chip, docs/PERFORMANCE.md).
    return jax.lax.map(jax.checkpoint(lambda a: one(*a)),
                       (out.window_x, out.window_x_next, out.window_t, out.window_t_next))

  def loss_fn(params, state: TrainState, inputs, out, advantages, vae_key, ref_mean,
              mask_t=None):
    # Every transition is scored and the mini-batch's are kept by `mask_t` (None: all). Gathering
    # the mini-batch instead would save the masked transitions' forward and backward passes, but
    # a mini-batch mixes samples and window steps, so it would need the group-repeated KV caches
    # gathered per sample inside the guided velocity; the mask keeps one static shape, the
    # contexts' one prefill per image, and exactly the mini-batch's gradient. The cost: every
    # update runs the forward and backward of all B*G*W transitions (W window steps against the
    # rollout's num_steps sampler steps, so small while updates_per_rollout is).
    steps = policy_terms(params, state.frozen, inputs, out, vae_key)
    adv = jnp.broadcast_to(advantages, out.window_log_prob.shape)
    # Window steps and samples flattened into one batch of transitions (window-major: the
    # layout minibatch_masks indexes).
    flat = lambda x: x.reshape((-1,) + steps.mean.shape[2:])
    terms = grpo.flow_grpo_loss(
        steps.log_prob.reshape(-1), out.window_log_prob.reshape(-1), adv.reshape(-1),
        clip_low=s.clip_low, clip_high=s.clip_high, beta=s.beta, mean=flat(steps.mean),
        ref_mean=None if ref_mean is None else flat(ref_mean),
        # The KL divides by the SDE's noise scale, not the step's std (grpo.mean_kl).
        std=flat(jnp.broadcast_to(steps.sigma, steps.mean.shape)), mask=mask_t)
    return terms.loss, terms

  def updates(state: TrainState, inputs: RecoveryInputs, out: sampling.Rollout,
              advantages: jax.Array, vae_key: jax.Array, shuffle_key: jax.Array):
    """updates_per_rollout optimizer updates on one rollout, each on its mini-batch of
    transitions scored under the parameters of that moment against the rollout's log-probs.
    The rollout stays on device; `vae_key` must be the rollout's own (rollout_vae_key), so
    every update sees the contexts the samples were drawn on."""
    num_transitions = out.window_log_prob.size
    masks = None
    if s.minibatches_per_epoch > 1:
      masks = minibatch_masks(shuffle_key, num_transitions, s.updates_per_rollout,
                              s.inner_epochs)
    # With one mini-batch per epoch every update takes every transition: no mask, so a single
    # update is the plain full-batch loss.
    ref_mean = None
    if s.beta > 0:  # the frozen reference's means: one forward for all the rollout's updates
      ref_mean = jax.lax.stop_gradient(
          policy_terms(state.aux["reference"], state.frozen, inputs, out, vae_key).mean)

    def one_update(state, mask_t):
      (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, state, inputs, out, advantages, vae_key, ref_mean, mask_t)
      state, opt_metrics = apply_gradients(state, grads, tx, s.ema_decay)
      return state, {**terms._asdict(), **opt_metrics}

    return jax.lax.scan(one_update, state, masks, length=s.updates_per_rollout)

  def step(state: TrainState, inputs: RecoveryInputs):
    # The rollout's key is split off first, as before mini-batches, so tests can redraw the
    # step's rollout from state.rng.
    rng, key = jax.random.split(state.rng)
    rng, shuffle_key = jax.random.split(rng)
    out, recovered, clean = rollout(state, inputs, key)
    rewards = reward_fn(recovered, clean, state.aux)
    total = rewards["total"].reshape(-1, g)
    advantages = grpo.group_advantages(total, clip=s.adv_clip).reshape(-1)
    new_state, per_update = updates(state, inputs, out, advantages, rollout_vae_key(key),
                                    shuffle_key)
    # state.step counts rollouts like the trainer's loop; the optimizer's own count (which the
    # learning-rate schedule reads) counts updates.
    state = new_state.replace(rng=rng, step=state.step + 1)
    mean = lambda name: per_update[name].mean()
    last = lambda name: per_update[name][-1]
    metrics = {"loss": mean("loss"), "policy_loss": mean("policy_loss"), "kl": mean("kl"),
               "clip_fraction": mean("clip_fraction"), "approx_kl": mean("approx_kl"),
               "log_prob_drift": mean("log_ratio_mean"), "grad_norm": mean("grad_norm"),
               "param_norm": last("param_norm"),
               # The last update is the most off-policy: where the clip and the KL show.
               "clip_fraction_last": last("clip_fraction"), "approx_kl_last": last("approx_kl"),
               "ratio_mean_last": last("ratio_mean"), "ratio_min_last": last("ratio_min"),
               "ratio_max_last": last("ratio_max"),
               "advantage_mean": advantages.mean(), "advantage_std": advantages.std(),
               "advantage_abs_max": jnp.abs(advantages).max()}
    for name, value in rewards.items():
      metrics[f"reward_{name}_mean"] = value.mean()
      metrics[f"reward_{name}_std"] = value.std()
    return state, metrics

  return RLFunctions(rollout, policy_terms, updates, step)


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


def load_clip_tower(rl_config, prefix: str = "rl.", mesh: jax.sharding.Mesh | None = None):
  """The frozen CLIP model of the semantic reward, from `rl.clip_checkpoint` in the shapes of
  `rl.clip_model` (`prefix`: how the config names the two fields, for the error lines). With
  `mesh`, its weights are placed on the mesh by the CLIP's sharding rules, as the policy's are:
  the train state holds both, and one jitted program takes them."""
  from robust_u1_jax import sharding
  from robust_u1_jax.checkpoints import clip_keys, key_table
  from robust_u1_jax.models import clip as clip_lib

  if not rl_config.clip_checkpoint:
    raise ValueError("rl.reward_weights.clip > 0 needs rl.clip_checkpoint: a CLIP ViT-B/32 "
                     ".safetensors file (open_clip or transformers naming)")
  configs = {"vit_b32": clip_lib.CLIPConfig.vit_b32, "tiny": clip_lib.CLIPConfig.tiny}
  create = lambda: clip_lib.CLIP(configs[rl_config.clip_model](), rngs=nnx.Rngs(0))
  model = create() if mesh is None else sharding.create_sharded(create, clip_lib.COMPONENT, mesh)
  try:
    clip_keys.load_clip(rl_config.clip_checkpoint, model)
  except key_table.CheckpointError as e:
    raise key_table.CheckpointError(
        f"{str(e).rstrip('.')}; {prefix}clip_model={rl_config.clip_model!r} reads a CLIP of "
        "its shapes ('vit_b32': ViT-B/32, 'tiny': the demo's "
        f"runs/demo/clip/model/clip.safetensors): set --config.{prefix}clip_model to the "
        "checkpoint's") from None
  return nnx.split(model)


def update_optimizer(c, tx):
  """The optimizer of the RL step. The trainer builds `tx` with its schedule (warmup, cosine
  decay) over total_steps optimizer updates, but this stage makes updates_per_rollout updates per
  trainer step: the schedule is rebuilt U-fold longer, warmup included, so the learning rate
  stays the same function of the trainer's step. Same transformation chain, so the optimizer
  state the trainer initialised with `tx` fits it."""
  u = c.rl.updates_per_rollout
  if u == 1:
    return tx
  o = c.optimizer.copy_and_resolve_references()
  o.warmup_steps = o.warmup_steps * u
  return state_lib.make_optimizer(o, c.total_steps * u)


def unread_clip_note(rl_config: ml_collections.ConfigDict) -> str | None:
  """A note when a CLIP checkpoint is given but its reward weighs 0 (the tiny variant's): the run
  would train on SSIM alone without a word."""
  if not rl_config.clip_checkpoint or rl_config.reward_weights.get("clip", 0.0) > 0:
    return None
  return (f"note: rl.clip_checkpoint = {rl_config.clip_checkpoint!r} is not read: "
          "rl.reward_weights.clip is 0, so the reward is SSIM alone; give "
          "--config.rl.reward_weights.clip=0.2 (the released weight) for the semantic reward")


def build(ctx: RunContext) -> StageSpec:
  """The Flow-GRPO stage (stage_spec.py's contract)."""
  c = ctx.config
  settings = RLSettings.from_config(c)
  aux, clip_graphdef = {}, None
  if c.rl.reward_weights.get("clip", 0.0) > 0:
    clip_graphdef, aux["clip"] = load_clip_tower(c.rl, mesh=ctx.mesh)
  elif note := unread_clip_note(c.rl):
    print(note, file=sys.stderr, flush=True)
  reward_fn = reward_fn_from_config(c.rl, clip_graphdef)
  model_config = ctx.model_config

  def host_inputs(batch, rng):
    del rng  # the rollout's randomness lives in the train state's key
    return recovery_lib.batch_recovery_inputs(batch, model_config, ctx.markers)

  return StageSpec(
      trainable=sft.GENERATION_PARAMS, host_inputs=host_inputs,
      make_step=lambda graphdef, tx: make_step(graphdef, update_optimizer(c, tx), settings,
                                               reward_fn),
      samples_per_step=c.data.batch_size * settings.group_size, aux=aux,
      reference=settings.beta > 0,
      evaluate=evaluation.make_recovery_eval(ctx, c.rl.eval_num_steps))
