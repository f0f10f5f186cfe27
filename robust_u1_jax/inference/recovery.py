"""Recovery sampling: a corrupted image (+ the instruction) -> a generated clean image.

The one implementation every user shares: the `recover` CLI and the conversation's image step,
evaluation grids, the reasoning stage's recoveries (on the fly or cached) and the RL rollouts, which
add an SDE window and score it again under the policy (`velocity_fn` is what they differentiate).

BAGEL's image-editing defaults (docs/design.md#flow-matching-and-guidance): 50 steps, timestep
shift 3, text guidance 4, image guidance 2, guidance on over the whole schedule, `text_channel`
renorm with minimum 0. The three guidance branches are answered by one batched model call per
step against their caches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import config_lib, files, sampling
from robust_u1_jax.checkpoints.bagel_dir import (GUIDANCE_FILE, INSTRUCTION_FILE,
                                                 NO_RECOVERY_FILE, SideFileError)
from robust_u1_jax.data import packing, sequence
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.inference import context as context_lib
from robust_u1_jax.models import bagel as bagel_lib
from robust_u1_jax.models import kv_cache
from robust_u1_jax.models.kv_cache import KVCache

Array = jax.Array
INSTRUCTION = tokenizer_lib.RECOVERY_INSTRUCTION  # the paper's, as the data pipeline writes it


@dataclasses.dataclass(frozen=True)
class Guidance:
  """BAGEL's `cfg_text_scale`, `cfg_img_scale`, `cfg_interval`, `cfg_renorm_min/type`."""
  text_scale: float = 4.0
  image_scale: float = 2.0
  interval: tuple[float, float] = (0.0, 1.0)  # guided while interval[0] < t <= interval[1]
  renorm_min: float = 0.0
  renorm_type: str = "text_channel"

  def __post_init__(self):
    # BAGEL's sampler reads any scale <= 1 as unguided; here 1 says it, and below 1 is a mistake.
    for name, flag in (("text_scale", "cfg_text"), ("image_scale", "cfg_img")):
      if not getattr(self, name) >= 1.0:
        raise ValueError(f"guidance {name} (--{flag}) {getattr(self, name)}: a scale is >= 1 "
                         "(1: no guidance)")
    if self.renorm_type not in sampling.RENORM_TYPES:
      raise ValueError(f"cfg renorm type {self.renorm_type!r} is unknown; allowed: "
                       f"{', '.join(sampling.RENORM_TYPES)}")
    lo, hi = self.interval
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f"cfg interval {self.interval} must satisfy 0 <= low <= high <= 1")

  @classmethod
  def from_config(cls, g) -> Guidance:
    """From a config's `guidance` block (config_defaults.get_guidance_config)."""
    return cls(text_scale=g.text_scale, image_scale=g.image_scale, renorm_min=g.renorm_min,
               renorm_type=g.renorm_type)

  @classmethod
  def for_model_dir(cls, path: str) -> Guidance:
    """The guidance a model was trained with (`guidance.json` beside it), else BAGEL's."""
    file = os.path.join(path, GUIDANCE_FILE)
    if not os.path.isfile(file):
      return cls()
    try:
      values = files.read_json_object(file, "guidance fields")
      return cls(**{k: tuple(v) if k == "interval" else v for k, v in values.items()})
    except (TypeError, ValueError) as e:
      raise SideFileError.of(file, e) from None

  def save(self, path: str) -> None:
    with open(os.path.join(path, GUIDANCE_FILE), "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=1)

  @classmethod
  def of_model(cls, model_dir: str, text_scale: float | None = None,
               image_scale: float | None = None) -> Guidance:
    """The model's guidance (`for_model_dir`) with the scales given in place of its own; None keeps
    the model's (`recover --cfg_text / --cfg_img`, the evaluation's cfg_text / cfg_img)."""
    given = {"text_scale": text_scale, "image_scale": image_scale}
    return dataclasses.replace(cls.for_model_dir(model_dir),
                               **{k: v for k, v in given.items() if v is not None})

  @property
  def uses_no_text(self) -> bool:
    return self.text_scale > 1.0

  @property
  def uses_no_image(self) -> bool:
    # As in BAGEL, image guidance only acts together with text guidance.
    return self.text_scale > 1.0 and self.image_scale > 1.0


NO_GUIDANCE = Guidance(text_scale=1.0, image_scale=1.0)


def instruction_of_model(path: str) -> str:
  """The instruction a model was trained to recover by (`instruction.json` beside it: a run's
  `config.instruction`), else the paper's. The answer loop's prompt holds it too, as the
  training's question prompts and reasoning records do."""
  file = os.path.join(path, INSTRUCTION_FILE)
  if not os.path.isfile(file):
    return INSTRUCTION
  try:
    values = files.read_json(file)
    text = values.get("instruction") if isinstance(values, dict) else None
    if not isinstance(text, str) or not text.strip():
      raise ValueError('not {"instruction": "<a text>"}')
    return text
  except (TypeError, ValueError) as e:
    raise SideFileError.of(file, e) from None


def untrained_stage(path: str) -> str | None:
  """'the <stage> stage' of a model whose stage trained no recovery (`no_recovery.json` beside it,
  naming the stage; 'a stage' where it names none), else None."""
  file = os.path.join(path, NO_RECOVERY_FILE)
  if not os.path.isfile(file):
    return None
  try:
    return f"the {files.read_json(file)['stage']} stage"
  except (OSError, ValueError, TypeError, KeyError):
    return "a stage"


def demo_parts(path: str, parts: Sequence[str]) -> str:
  """'A or B' of the demo's `parts` beside the model at `path` where it is one of a demo's parts
  (runs/demo/vae/model), else of runs/demo's."""
  demo = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  beside = [os.path.join(demo, part) for part in parts]
  if not all(os.path.isdir(p) for p in beside):
    beside = [f"runs/demo/{part}" for part in parts]
  return " or ".join(beside)


def untrained_note(path: str) -> str | None:
  """A note for a model whose stage trained no recovery, else None: what it draws and writes is
  noise."""
  stage = untrained_stage(path)
  if stage is None:
    return None
  return (f"note: {path} is the model of {stage}, which trains no recovery: its language model "
          "never learned to recover an image or to answer, so what it draws and writes is noise; "
          f"give a later stage's model (the demo's: {demo_parts(path, ('rl', 'reason'))})")


def save_no_recovery(path: str, stage: str) -> None:
  with open(os.path.join(path, NO_RECOVERY_FILE), "w") as f:
    json.dump({"stage": stage}, f, indent=1)


def save_instruction(path: str, instruction: str) -> None:
  with open(os.path.join(path, INSTRUCTION_FILE), "w") as f:
    json.dump({"instruction": instruction}, f, indent=1)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Euler sampling over the shifted schedule; optionally one stochastic step (the released
  Robust-U1 sampler: an SDE step at index 3 with noise level 0.7)."""
  num_steps: int = 50
  shift: float = 3.0
  guidance: Guidance = Guidance()
  sde_step: int = -1  # index of the stochastic step; -1: deterministic
  sde_noise_level: float = 0.7

  @classmethod
  def from_config(cls, config, num_steps: int) -> Sampler:
    """A stage's sampler: `num_steps` Euler steps at the run's guidance (`config.guidance`)."""
    return cls(num_steps=num_steps, guidance=Guidance.from_config(config.guidance))

  def __post_init__(self):
    if self.num_steps < 2:
      raise ValueError(f"recovery steps must be >= 2, got {self.num_steps}")
    if not (math.isfinite(self.shift) and self.shift > 0):  # 0 or less: NaN or negative times
      raise ValueError(f"timestep shift must be > 0, got {self.shift}")
    if not -1 <= self.sde_step < self.num_steps - 1:
      raise ValueError(f"sde_step {self.sde_step} is outside the {self.num_steps - 1} moves "
                       "(-1 turns it off)")


RELEASED_SDE_STEP = 3


# -- inputs ---------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RecoveryInputs:
  """Everything the sampler needs for a batch of corrupted images of one size (host-built)."""
  full: bagel_lib.SequenceInputs  # [VAE, ViT, text] context
  no_text: bagel_lib.SequenceInputs  # [VAE, ViT]
  no_image: bagel_lib.SequenceInputs  # [text]
  noisy: bagel_lib.SequenceInputs  # the generation block alone
  corrupted: Array  # (B, 1, H, W, 3) uint8, VAE size
  clean: Array  # (B, H, W, 3) uint8, the reward's reference


def size_groups(samples: Sequence[Mapping[str, Any]]) -> list[list[int]]:
  """Indices of the samples, grouped by (VAE, ViT) image size: one recovery batch each."""
  groups: dict[tuple, list[int]] = {}
  for i, s in enumerate(samples):
    key = (s["corrupted"].shape, s.get("corrupted_vit", s["corrupted"]).shape)
    groups.setdefault(key, []).append(i)
  return list(groups.values())


def recovery_inputs(samples: Sequence[Mapping[str, Any]], config: bagel_lib.BagelConfig,
                    markers: sequence.Markers, instruction_ids: Sequence[int] | None = None
                    ) -> RecoveryInputs:
  """Numpy rows of the three guidance contexts and the noisy block, for samples of one size.

  A sample is a dict: 'corrupted' (uint8, VAE size), optionally 'corrupted_vit' (ViT size;
  default: the VAE-size image) and 'clean' (the reward's reference; default: corrupted), and
  'instruction_ids' unless `instruction_ids` is given for all.
  """
  sizes = sorted({(s["corrupted"].shape[:2], s.get("corrupted_vit", s["corrupted"]).shape[:2])
                  for s in samples})
  if len(sizes) > 1:
    raise config_lib.ConfigError(
        f"recovery sampling batches images of one size, got (VAE, ViT) sizes {sizes}: for a "
        "source of many sizes set data.crop_square=True and data.vae_min_side = "
        "data.vae_max_side (the RL stage), or precompute recoveries (the reasoning stage's "
        "reason.recovered_images=cache)")
  if instruction_ids is not None:
    samples = [{**s, "instruction_ids": instruction_ids} for s in samples]

  def rows(**use):
    return context_lib.rows([sequence.recovery_blocks(
        s["corrupted"], s.get("corrupted_vit", s["corrupted"]), s["instruction_ids"],
        target=False, **use) for s in samples], config, markers)

  corrupted = np.stack([s["corrupted"] for s in samples])
  noisy = context_lib.noisy_rows(*corrupted.shape[1:3], len(samples), config, markers)
  return RecoveryInputs(full=rows(), no_text=rows(use_text=False),
                        no_image=rows(use_vit=False, use_vae=False), noisy=noisy,
                        corrupted=corrupted[:, None],
                        clean=np.stack([s.get("clean", s["corrupted"]) for s in samples]))



def batch_recovery_inputs(batch: Mapping[str, Any], config: bagel_lib.BagelConfig,
                          markers: sequence.Markers, instruction_ids: Sequence[int] | None = None
                          ) -> RecoveryInputs:
  """`recovery_inputs` of an unpacked pipeline batch (one sample per row)."""
  if sequence.is_packed(batch):
    raise ValueError("recovery sampling takes unpacked batches: set data.token_budget=0")
  samples = [row[0] for row in packing.batch_samples(batch)]
  return recovery_inputs(samples, config, markers, instruction_ids)

# -- guided velocity ------------------------------------------------------------------------------

VelocityFn = Callable[[Array, Array], Array]  # (x_bnc, t_b) -> v_bnc


class SamplerContexts(NamedTuple):
  """What a guided velocity reads besides the model: the three contexts' caches (None for a
  branch the guidance does not use) and the noisy block's rows."""
  full: KVCache
  no_text: KVCache | None
  no_image: KVCache | None
  noisy: bagel_lib.SequenceInputs


def guided_velocity(model: bagel_lib.Bagel, full: KVCache, no_text: KVCache | None,
                    no_image: KVCache | None, noisy: bagel_lib.SequenceInputs,
                    guidance: Guidance) -> VelocityFn:
  """v(x_t, t) of the noisy block against cached contexts, guided: the branches in use answer in
  one model call (their caches stacked along the batch)."""
  # A gradient of the guided velocity (Flow-GRPO's log-probs) reaches the full context's
  # branch only, as Flow-GRPO detaches its unconditional prediction: the branches without text
  # or image are the same weights, and differentiated they would pull the update back by
  # (scale - 1) times their own (docs/design.md, "Flow-GRPO"). Their caches are constants too,
  # so the backward pass leaves their prefills alone.
  caches = ([full] + [jax.lax.stop_gradient(no_text)] * guidance.uses_no_text
            + [jax.lax.stop_gradient(no_image)] * guidance.uses_no_image)
  branches = len(caches)
  cache = kv_cache.concatenate(caches) if branches > 1 else full
  tiled = jax.tree.map(lambda x: jnp.concatenate([x] * branches, axis=0), noisy)
  lo, hi = guidance.interval

  def velocity(x_bnc: Array, t_b: Array) -> Array:
    v_all = model.denoise_velocity(cache, tiled, jnp.concatenate([x_bnc] * branches),
                                   jnp.concatenate([t_b] * branches))
    v = jnp.split(v_all, branches)
    if branches == 1:
      return v[0]
    v = [v[0]] + [jax.lax.stop_gradient(u) for u in v[1:]]  # see `caches` above
    guided = ((t_b > lo) & (t_b <= hi))[:, None, None]
    text_scale = jnp.where(guided, guidance.text_scale, 1.0)
    image_scale = jnp.where(guided, guidance.image_scale, 1.0)
    return sampling.cfg_velocity(v[0], v[1], v[2] if branches == 3 else None, text_scale,
                                 image_scale if branches == 3 else 1.0, guidance.renorm_min,
                                 guidance.renorm_type)

  return velocity


def velocity_fn(model: bagel_lib.Bagel, inputs: RecoveryInputs, guidance: Guidance, *,
                repeat: int = 1, posterior_key: Array | None = None) -> VelocityFn:
  """Prefills the guidance contexts of `inputs` once (each row's context serving `repeat`
  samples in a row) and returns their guided velocity."""
  return guided_velocity(model, *contexts(model, inputs, guidance, repeat=repeat,
                                          posterior_key=posterior_key), guidance)


def contexts(model: bagel_lib.Bagel, inputs: RecoveryInputs, guidance: Guidance, *,
             repeat: int = 1, posterior_key: Array | None = None) -> SamplerContexts:
  """The prefilled guidance contexts of `inputs` and their noisy block (`velocity_fn`'s), as data
  a program can return: `guided_velocity(model, *contexts, guidance)` is their velocity."""
  cond = context_lib.encode_images(model, inputs.corrupted, posterior_key)

  def context(rows: bagel_lib.SequenceInputs) -> KVCache:
    cache = model.init_cache(rows.token_kind.shape[0], rows.token_kind.shape[1])
    cache = context_lib.prefill(model, cache, rows, context_lib.gather_latents(cond, rows))
    return kv_cache.repeat_rows(cache, repeat) if repeat > 1 else cache

  no_text = context(inputs.no_text) if guidance.uses_no_text else None
  no_image = context(inputs.no_image) if guidance.uses_no_image else None
  noisy = jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=0), inputs.noisy)
  return SamplerContexts(context(inputs.full), no_text, no_image, noisy)


# The streams a recovery draws from its key. fold_in(key, i) is split(key, n)[i] (threefry, as
# jax_threefry_partitionable computes it), so the steps' keys must not be split from the key
# itself: the stochastic step at index 0 drew the initial noise again, and at index 1 the VAE
# posterior's key.
_NOISE_STREAM, POSTERIOR_STREAM, STEPS_STREAM = 0, 1, 2


def stream_key(key: Array, stream: int) -> Array:
  """`key`'s stream `stream` (one of the constants above): one key, or one per row (B, 2)."""
  fold = jax.vmap(jax.random.fold_in, (0, None)) if sampling.is_per_row(key) else jax.random.fold_in
  return fold(key, stream)


def initial_noise(key: Array, batch: int, shape: tuple[int, ...]) -> Array:
  """x at t = 1: from one key, or from one key per row (B, 2) so that a sample's noise does not
  depend on its batch."""
  return sampling.normal(stream_key(key, _NOISE_STREAM), (batch,) + shape, jnp.float32)


def sample_latents(velocity: VelocityFn, x_init: Array, sampler: Sampler, key: Array
                   ) -> sampling.Rollout:
  """Runs `sampler` from x_init (Euler, plus its stochastic step if it has one)."""
  return sampling.sample(velocity, x_init, sampling.timesteps(sampler.num_steps, sampler.shift),
                         key, window_start=max(sampler.sde_step, 0),
                         window_size=int(sampler.sde_step >= 0),
                         noise_level=sampler.sde_noise_level)


def sample_move(velocity: VelocityFn, x: Array, sampler: Sampler, key: Array, i: Array) -> Array:
  """x after move `i` of `sample_latents`' run, from x after the moves before it
  (`sampling.sample_move`): moves called one by one end where `sample_latents` does."""
  return sampling.sample_move(velocity, x, sampling.timesteps(sampler.num_steps, sampler.shift),
                              key, i, window_start=max(sampler.sde_step, 0),
                              window_size=int(sampler.sde_step >= 0),
                              noise_level=sampler.sde_noise_level)


def recovery_start(model: bagel_lib.Bagel, inputs: RecoveryInputs, sampler: Sampler,
                   key: Array, *, x_init: Array | None = None, posterior_key: Array | None = None
                   ) -> tuple[SamplerContexts, Array, Array]:
  """`recover` up to its sampler: (the prefilled contexts, x at t = 1, the steps' key)."""
  ctx = contexts(model, inputs, sampler.guidance, posterior_key=posterior_key)
  if x_init is None:
    shape = (inputs.noisy.latent_seq_index.shape[1], model.config.latent_channels)
    x_init = initial_noise(key, inputs.corrupted.shape[0], shape)
  return ctx, x_init, stream_key(key, STEPS_STREAM)


def recover(model: bagel_lib.Bagel, inputs: RecoveryInputs, sampler: Sampler, key: Array, *,
            x_init: Array | None = None, posterior_key: Array | None = None
            ) -> tuple[Array, Array]:
  """(latent tokens (B, N, C), recovered images in [0, 1] (B, H, W, 3)); no gradient.

  `key`: one key, or one per image (B, 2); it draws the initial noise unless `x_init` is given,
  and the stochastic step's noise. `posterior_key` None encodes the corrupted image by the
  posterior mean, else by a sample.
  """
  contexts_, x_init, steps_key = recovery_start(model, inputs, sampler, key, x_init=x_init,
                                                posterior_key=posterior_key)
  velocity = guided_velocity(model, *contexts_, sampler.guidance)
  latents = sample_latents(velocity, x_init, sampler, steps_key).x_final
  h, w = inputs.corrupted.shape[2:4]
  images = context_lib.decode_latents(model, latents, h, w)
  return jax.lax.stop_gradient(latents), jax.lax.stop_gradient(images)
