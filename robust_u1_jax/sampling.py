"""Samplers shared by inference (`recover`, `answer`) and RL rollouts: one implementation each of
the timestep schedule, the Euler ODE step, the Flow-GRPO SDE step and its log-probability,
classifier-free guidance with BAGEL's `text_channel` renorm, and temperature sampling of text.

Conventions (docs/design.md#flow-matching-and-guidance): `x_t = (1 - t) x0 + t eps`, so t runs
from 1 (noise) to 0 (data) and the model predicts the velocity `v = eps - x0`. Latents are
token-major: (..., tokens, channels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)  # a Python float: importing starts no backend


def shift_timesteps(t: jax.Array, shift: float) -> jax.Array:
  """t' = s t / (1 + (s - 1) t): s > 1 spends more steps at high noise."""
  return shift * t / (1 + (shift - 1) * t)


def timesteps(num_steps: int, shift: float) -> jax.Array:
  """The `num_steps` points from 1 to 0 (inclusive) the sampler visits; num_steps - 1 moves."""
  if num_steps < 2:
    raise ValueError(f"num_steps must be >= 2 (got {num_steps}): the schedule includes both ends")
  return shift_timesteps(jnp.linspace(1.0, 0.0, num_steps), shift)


def euler_step(x: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
  """Deterministic ODE step from t to t_next < t."""
  return x + v * (t_next - t)


class SDEStep(NamedTuple):
  x_next: jax.Array
  mean: jax.Array  # the Gaussian's mean; the KL to a reference policy is taken between means
  std: jax.Array  # per-sample std of x_next (std_s * sqrt(-dt))
  log_prob: jax.Array  # (batch,), averaged over latent elements
  sigma: jax.Array  # per-sample noise scale std_s = a sqrt(s / (1 - s)), which the KL divides by


def sde_std(s: jax.Array, s_max: jax.Array, noise_level: float) -> jax.Array:
  """a sqrt(s / (1 - s)), with the s = 1 singularity moved to the schedule's second point."""
  return noise_level * jnp.sqrt(s / (1 - jnp.where(s >= 1.0, s_max, s)))


def sde_mean(x: jax.Array, v: jax.Array, s: jax.Array, s_next: jax.Array, std: jax.Array):
  """Mean of the Flow-GRPO reverse SDE step (same marginals as the ODE for any noise level)."""
  dt = s_next - s
  return x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """Log-density of x under N(mean, std^2), averaged over all but the leading (batch) axis."""
  std = jnp.broadcast_to(std, x.shape)
  logp = -((x - mean) ** 2) / (2 * std**2) - jnp.log(std) - LOG_SQRT_2PI
  return logp.reshape(x.shape[0], -1).mean(axis=-1)


def _per_sample(a: jax.Array, x: jax.Array) -> jax.Array:
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def sde_step(x: jax.Array, v: jax.Array, s: jax.Array, s_next: jax.Array, s_max: jax.Array,
             noise_level: float, key: jax.Array | None = None,
             x_next: jax.Array | None = None) -> SDEStep:
  """One stochastic step with its log-probability.

  With `key`, draws x_next; with `x_next` given (a recorded rollout), scores it under the current
  velocity instead — the policy-ratio computation of Flow-GRPO. s, s_next: scalars or (batch,).
  """
  s, s_next = _per_sample(s, x), _per_sample(s_next, x)
  std_s = sde_std(s, jnp.asarray(s_max, x.dtype), noise_level)
  mean = sde_mean(x, v, s, s_next, std_s)
  std = std_s * jnp.sqrt(s - s_next)
  if x_next is None:
    if key is None:
      raise ValueError("sde_step needs a PRNG key to sample, or x_next to score")
    x_next = mean + std * normal(key, x.shape, x.dtype)
  return SDEStep(x_next, mean, std, gaussian_log_prob(x_next, mean, std), std_s)


RENORM_TYPES = ("global", "channel", "text_channel")


def normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """Standard normal draws from one key, or from one key per row (B, 2)."""
  if is_per_row(key):
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)
  return jax.random.normal(key, shape, dtype)


def is_per_row(key: jax.Array) -> bool:
  """True for a batch of raw uint32 keys (B, 2): one per sample, so that a sample's draws do not
  depend on the batch it is in."""
  return key.ndim == 2 and key.dtype == jnp.uint32


def cfg_velocity(v: jax.Array, v_no_text: jax.Array | None, v_no_image: jax.Array | None,
                 text_scale: float | jax.Array, image_scale: float | jax.Array,
                 renorm_min: float = 0.0, renorm_type: str = "text_channel") -> jax.Array:
  """BAGEL's three-context classifier-free guidance of (B, N, C) velocities.

  `text_channel`: v_t = v_notext + s_t (v - v_notext), scaled per token by
  clamp(|v| / |v_t|, renorm_min, 1), then v = v_noimg + s_i (v_t - v_noimg).
  `global` / `channel`: both guidance terms first, then one renorm of the result against |v|, over
  each sample's whole latent (`global`) or per token (`channel`).
  As in BAGEL, guidance is on only while s_t > 1 (image guidance included), and image guidance
  only while s_i > 1. Scales may be traced (a CFG interval switches them per step); a branch that is
  None must have its scale statically at most 1.
  """
  if renorm_type not in RENORM_TYPES:
    raise ValueError(f"cfg renorm_type {renorm_type!r} is unknown; allowed: {RENORM_TYPES}")
  if v_no_text is None:
    if not isinstance(text_scale, (int, float)) or text_scale > 1.0:
      raise ValueError("text guidance (text_scale > 1) needs the velocity without text")
    return v
  image_on = v_no_image is not None
  if not image_on and (not isinstance(image_scale, (int, float)) or image_scale > 1.0):
    raise ValueError("image guidance (image_scale > 1) needs the velocity without images")
  v_text = v_no_text + text_scale * (v - v_no_text)
  if renorm_type == "text_channel":
    v_text = v_text * _renorm(_norm(v), _norm(v_text), renorm_min)
    out = v_text
    if image_on:
      out = jnp.where(image_scale > 1.0, v_no_image + image_scale * (v_text - v_no_image), v_text)
  else:
    out = v_text
    if image_on:
      out = jnp.where(image_scale > 1.0, v_no_image + image_scale * (v_text - v_no_image), v_text)
    if renorm_type == "global":
      norm = lambda x: jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=(-2, -1), keepdims=True), 1e-30))
    else:
      norm = _norm
    out = out * _renorm(norm(v), norm(out), renorm_min)
  return jnp.where(text_scale > 1.0, out, v)


def _renorm(norm_v: jax.Array, norm_guided: jax.Array, renorm_min: float) -> jax.Array:
  return jnp.clip(norm_v / (norm_guided + 1e-8), renorm_min, 1.0)


def _norm(x: jax.Array) -> jax.Array:
  """Per-token L2 norm whose gradient stays finite at zero (a fresh velocity head outputs 0)."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-30))


class Rollout(NamedTuple):
  """What a Flow-GRPO update needs from one sampling run (window steps only)."""
  x_final: jax.Array  # (B, N, C) clean latent estimate at t = 0
  window_x: jax.Array  # (W, B, N, C) latents entering each stochastic step
  window_x_next: jax.Array  # (W, B, N, C) latents leaving it
  window_t: jax.Array  # (W,) step start times
  window_t_next: jax.Array  # (W,)
  window_log_prob: jax.Array  # (W, B) log-probs under the sampling policy
  window_mean: jax.Array  # (W, B, N, C)


VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_bnc, t_b) -> v_bnc


def _move_keys(key: jax.Array, num_moves: int) -> jax.Array:
  """One key per move (M, ...), from one key or one per row (B, 2) -> (M, B, 2)."""
  if is_per_row(key):
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num_moves))(key), 0, 1)
  return jax.random.split(key, num_moves)


def _move(velocity: VelocityFn, x: jax.Array, schedule: jax.Array, i: jax.Array,
          step_key: jax.Array, window_start: jax.Array, window_size: int, noise_level: float):
  """Move i of the schedule from x: (x_next, its SDE transition, whether it is a window step)."""
  t, t_next = schedule[i], schedule[i + 1]
  v = velocity(x, jnp.full((x.shape[0],), t, x.dtype))
  in_window = (i >= window_start) & (i < window_start + window_size)
  sde = sde_step(x, v, t, t_next, schedule[1], noise_level, key=step_key)
  return jnp.where(in_window, sde.x_next, euler_step(x, v, t, t_next)), sde, in_window


def sample(velocity: VelocityFn, x_init: jax.Array, schedule: jax.Array, key: jax.Array, *,
           window_start: jax.Array | int = 0, window_size: int = 0,
           noise_level: float = 0.7) -> Rollout:
  """Runs the sampler over `schedule` (from timesteps()); steps in
  [window_start, window_start + window_size) are SDE steps whose transitions are recorded, the rest
  are Euler steps. window_size 0 is plain ODE sampling. jit-friendly: one lax.scan over steps.
  `key`: one key, or one per row (B, 2).
  """
  num_moves = schedule.shape[0] - 1
  batch = x_init.shape[0]
  keys = _move_keys(key, num_moves)
  window_start = jnp.asarray(window_start, jnp.int32)

  def body(carry, inputs):
    x, rec = carry
    i, step_key = inputs
    x_next, sde, in_window = _move(velocity, x, schedule, i, step_key, window_start, window_size,
                                   noise_level)
    if window_size:
      slot = jnp.clip(i - window_start, 0, window_size - 1)
      write = lambda buf, val: jnp.where(in_window, buf.at[slot].set(val), buf)
      rec = dict(x=write(rec["x"], x), x_next=write(rec["x_next"], x_next),
                 t=write(rec["t"], schedule[i]), t_next=write(rec["t_next"], schedule[i + 1]),
                 log_prob=write(rec["log_prob"], sde.log_prob), mean=write(rec["mean"], sde.mean))
    return (x_next, rec), None

  w = max(window_size, 1)
  rec0 = dict(x=jnp.zeros((w,) + x_init.shape, x_init.dtype),
              x_next=jnp.zeros((w,) + x_init.shape, x_init.dtype),
              t=jnp.zeros((w,), x_init.dtype), t_next=jnp.zeros((w,), x_init.dtype),
              log_prob=jnp.zeros((w, batch), x_init.dtype),
              mean=jnp.zeros((w,) + x_init.shape, x_init.dtype))
  (x_final, rec), _ = jax.lax.scan(body, (x_init, rec0), (jnp.arange(num_moves), keys))
  return Rollout(x_final, rec["x"], rec["x_next"], rec["t"], rec["t_next"], rec["log_prob"],
                 rec["mean"])


def sample_move(velocity: VelocityFn, x: jax.Array, schedule: jax.Array, key: jax.Array,
                i: jax.Array, *, window_start: jax.Array | int = 0, window_size: int = 0,
                noise_level: float = 0.7) -> jax.Array:
  """x after move `i` (traced) of `sample`'s run, from x after the moves before it: the same
  move, key included, so a host that runs the moves one program call at a time (to show them as
  they happen: a progress bar) ends where `sample` does. Each call is a program of its own, which
  JAX's persistent cache keeps; a host callback inside `sample`'s scan would make the whole
  recovery a program the cache refuses, compiled again on every run."""
  keys = _move_keys(key, schedule.shape[0] - 1)
  return _move(velocity, x, schedule, i, keys[i], jnp.asarray(window_start, jnp.int32),
               window_size, noise_level)[0]


def sample_token(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
  """Greedy at temperature 0, otherwise a draw from softmax(logits / temperature)."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1)
  return jax.random.categorical(key, logits / temperature, axis=-1)
