"""Train state as one pytree, and the optimizer built from a config.

The model's graph definition stays outside the state (static under jit); the state holds the
trainable parameters, the frozen rest, the optimizer state, an EMA of the trainable parameters, the
step and the RNG key, so `step(state, batch) -> (state, metrics)` is a pure function and the whole
state is one Orbax item.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from robust_u1_jax.training import lora as lora_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # trainable subset (with LoRA: the LoRA factors, see lora.py)
  frozen: nnx.State  # everything else the model holds (with LoRA: the whole base model)
  opt_state: Any
  ema: nnx.State | None
  rng: jax.Array
  # Frozen states a step reads besides the model: the RL reference policy, the reward model.
  aux: dict[str, Any] = flax.struct.field(default_factory=dict)


# What a checkpoint holds of a TrainState: what training changes. `frozen` (the whole base model
# under LoRA, the understanding expert, ViT and VAE otherwise) and `aux` (the RL reference, the
# reward model) are built again from the config on resume, as at the start: a checkpoint of a
# 7B LoRA run is its factors and their optimizer state, not 30 GB of base weights again.
SAVED_FIELDS = ("step", "params", "opt_state", "ema", "rng")


def saved_part(state: TrainState) -> dict[str, Any]:
  """The fields of `state` a checkpoint holds (`SAVED_FIELDS`)."""
  return {name: getattr(state, name) for name in SAVED_FIELDS}


def trainable_filter(patterns: Sequence[str]):
  """An nnx filter selecting parameters whose dotted path matches any regex in `patterns`."""
  compiled = [re.compile(p) for p in patterns]

  def select(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    dotted = ".".join(str(p) for p in path)
    return any(r.search(dotted) for r in compiled)

  return select


def split_model(model: nnx.Module, patterns: Sequence[str]):
  """(graphdef, trainable, frozen); raises if the patterns select nothing (a typo in a config)."""
  graphdef, params, frozen = nnx.split(model, trainable_filter(patterns), ...)
  if not jax.tree.leaves(params):
    raise ValueError(f"trainable patterns {list(patterns)} select no parameter of the model")
  return graphdef, params, frozen


def merge_model(graphdef, params: nnx.State, frozen: nnx.State) -> nnx.Module:
  """The model a step runs: `nnx.merge(graphdef, params, frozen)`, or, when the trainer runs LoRA
  (`graphdef` a `lora.LoraGraphDef`, `params` the LoRA factors, `frozen` the whole base model),
  the model with the merged weights W + scale * A @ B. Steps call this instead of `nnx.merge`."""
  if isinstance(graphdef, lora_lib.LoraGraphDef):
    return graphdef.merge_model(params, frozen)
  return nnx.merge(graphdef, params, frozen)


def learning_rate_schedule(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The learning rate at each optimizer update: linear warmup to `learning_rate`, then cosine
  decay to `end_learning_rate`.

  `total_steps` and `o.warmup_steps` count gradient steps (what a trainer step makes); with
  `o.grad_accum_steps = k` the optimizer updates once every k of them, so the schedule runs over
  ceil(total_steps / k) updates with ceil(warmup_steps / k) of warmup: the same function of the
  trainer step whatever k is, and a run of k micro-batches per update follows the schedule of a
  run with k times the batch and 1/k of the steps.
  """
  k = o.grad_accum_steps
  updates = -(-total_steps // k)
  warmup = min(-(-o.warmup_steps // k), max(updates - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else o.learning_rate, peak_value=o.learning_rate,
      warmup_steps=warmup, decay_steps=max(updates, warmup + 1),
      end_value=o.end_learning_rate)


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW (after global-norm clipping) on `learning_rate_schedule(o, total_steps)`; with
  `o.grad_accum_steps = k > 1`, wrapped in `optax.MultiSteps`: each call averages the gradient
  into an accumulator, every k-th applies the average (the inner optimizer, its step count and so
  the schedule see updates only); the others return zero updates."""
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay))
  tx = optax.chain(*parts)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx


def has_updated(opt_state: Any) -> jax.Array | bool:
  """Whether the optimizer step that produced `opt_state` changed the parameters: always without
  accumulation, on every k-th gradient step with it (optax.MultiSteps)."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.mini_step == 0  # reset to 0 by the k-th call, which applied the update
  return True


def create_state(params: nnx.State, frozen: nnx.State, tx: optax.GradientTransformation,
                 rng: jax.Array, ema: bool, aux: dict[str, Any] | None = None,
                 param_shardings: Any = None) -> TrainState:
  """A fresh state. Under jit, pass `param_shardings` (the params' shardings): every part of the
  optimizer state shaped like the parameters (Adam moments, accumulated gradients) and the EMA are
  constrained to them; XLA would otherwise replicate these zeros on every device."""
  opt_state = tx.init(params)
  ema_params = jax.tree.map(jnp.copy, params) if ema else None
  if param_shardings is not None:
    opt_state = like_params(opt_state, params, param_shardings)
    ema_params = like_params(ema_params, params, param_shardings)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                    opt_state=opt_state, ema=ema_params, rng=rng, aux=aux or {})


def like_params(tree: Any, params: nnx.State, param_shardings: Any) -> Any:
  """Constrains each subtree of `tree` with the parameters' tree structure to their shardings."""
  structure = jax.tree.structure(params)
  same = lambda x: jax.tree.structure(x) == structure

  def constrain(x):
    if not same(x):
      return x
    return jax.tree.map(jax.lax.with_sharding_constraint, x, param_shardings)

  return jax.tree.map(constrain, tree, is_leaf=same)


def apply_gradients(state: TrainState, grads: nnx.State, tx: optax.GradientTransformation,
                    ema_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
  """One gradient step: `tx` (make_optimizer's) updates the parameters, or with accumulation
  banks `grads` until its k-th step; the EMA follows the updates. `state.step` counts gradient
  steps."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema is not None:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    updated = has_updated(opt_state)
    if updated is not True:
      # The EMA averages the parameters of each optimizer update, so it moves only when they
      # did: with accumulation once per k gradient steps, as in a run of k-fold batches.
      ema = jax.tree.map(lambda new, old: jnp.where(updated, new, old), ema, state.ema)
  metrics = {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def loss_step(loss_fn, tx: optax.GradientTransformation, ema_decay: float):
  """step(state, batch) -> (state, metrics): one gradient step (`apply_gradients`: an optimizer
  update, or every k-th with accumulation) on `loss_fn(params, frozen, batch, key) -> (loss,
  metrics)`, the key split off the state's stream.
  The supervised stages' step; RL builds its own (rollout, then several updates)."""

  def step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    rng, key = jax.random.split(state.rng)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.frozen, batch, key)
    state, opt_metrics = apply_gradients(state.replace(rng=rng), grads, tx, ema_decay)
    return state, {"loss": loss, **metrics, **opt_metrics}

  return step
