"""The jitted computations `bench recover` times (benchmarks/recover.py) and compiles for BAGEL-7B
(benchmarks/recover_7b.py): (graphdef, weights, ...) with the graph definition static, as
engine.py's are. The inference modules are imported inside them: `robust_u1_jax.sampling` starts
JAX's backends on import, before `--topology` could set the platform (recover.py)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from robust_u1_jax.data import sequence

if TYPE_CHECKING:
  from robust_u1_jax.inference import recovery as recovery_lib


def tokenizer_ids() -> tuple[sequence.Markers, list[int]]:
  """The repository's tokenizer: BAGEL's special tokens and the recovery instruction (12 ids;
  Qwen2's tokenizer makes it 14, which moves no figure here)."""
  from robust_u1_jax.data import tokenizer as tokenizer_lib
  from robust_u1_jax.inference import recovery as recovery_lib

  tok = tokenizer_lib.load_tokenizer()
  special = tokenizer_lib.special_token_ids(tok)
  return (sequence.Markers(special["vision_start"], special["vision_end"]),
          tokenizer_lib.encode_text_block(tok, recovery_lib.INSTRUCTION))


@functools.partial(jax.jit, static_argnums=0)
def contexts(graphdef, state, inputs: recovery_lib.RecoveryInputs):
  """The three guidance contexts prefilled, as `recovery.velocity_fn` prefills them."""
  from robust_u1_jax.inference import context as context_lib

  model = nnx.merge(graphdef, state)
  cond = context_lib.encode_images(model, inputs.corrupted)

  def context(rows):
    cache = model.init_cache(rows.token_kind.shape[0], rows.token_kind.shape[1])
    return context_lib.prefill(model, cache, rows, context_lib.gather_latents(cond, rows))

  return context(inputs.full), context(inputs.no_text), context(inputs.no_image), cond


@functools.partial(jax.jit, static_argnums=0)
def cached_step(graphdef, state, cache, noisy, x_bnc, t_b):
  return nnx.merge(graphdef, state).denoise_velocity(cache, noisy, x_bnc, t_b)


@functools.partial(jax.jit, static_argnums=0)
def uncached_step(graphdef, state, rows, clean_bnc, x_bnc, t_b):
  """The noisy block's velocity from one forward over context + block (packed mask): the clean
  image's latent tokens come first in the row, the noisy target's last."""
  model = nnx.merge(graphdef, state)
  n = x_bnc.shape[1]
  latents = jnp.concatenate([clean_bnc, x_bnc], axis=1)
  timesteps = jnp.concatenate([jnp.zeros(clean_bnc.shape[:2]),
                               jnp.broadcast_to(t_b[:, None], x_bnc.shape[:2])], axis=1)
  hidden = model(rows, latents, timesteps)
  return model.velocity(hidden, rows.latent_seq_index[:, -n:])


@functools.partial(jax.jit, static_argnums=(0, 6))
def batched_cfg(graphdef, state, full, no_text, no_image, noisy, guidance, x_bnc, t_b):
  from robust_u1_jax.inference import recovery as recovery_lib

  model = nnx.merge(graphdef, state)
  return recovery_lib.guided_velocity(model, full, no_text, no_image, noisy, guidance)(x_bnc, t_b)


@functools.partial(jax.jit, static_argnums=(0, 6))
def separate_cfg(graphdef, state, full, no_text, no_image, noisy, guidance, x_bnc, t_b):
  """The same guided velocity from three model calls, each against its own (unpadded) cache."""
  from robust_u1_jax import sampling

  model = nnx.merge(graphdef, state)
  v, v_no_text, v_no_image = (model.denoise_velocity(c, noisy, x_bnc, t_b)
                              for c in (full, no_text, no_image))
  lo, hi = guidance.interval
  guided = ((t_b > lo) & (t_b <= hi))[:, None, None]
  return sampling.cfg_velocity(v, v_no_text, v_no_image,
                               jnp.where(guided, guidance.text_scale, 1.0),
                               jnp.where(guided, guidance.image_scale, 1.0), guidance.renorm_min,
                               guidance.renorm_type)

