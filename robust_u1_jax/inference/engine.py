"""A loaded model ready to recover images and hold conversations: the front door of inference.

`Engine.load` takes a BAGEL / Robust-U1 model directory as released, an Orbax model checkpoint
(`convert`), or a stage's workdir, on a device mesh (the parameters sharded over it, so a 7B model
runs on chips smaller than the model). Every model computation is a jitted function of
(graph definition, weights, ...), compiled once per shape: text blocks are padded to a few
bucket lengths and the caches grow by whole blocks of slots.

`Conversation` is BAGEL's `interleave_inference` state: the full context and the two guidance
contexts (`context.Contexts`), to which images and texts are added in order, and from which text
is decoded and images are generated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import progress as progress_lib
from robust_u1_jax.data import sequence
from robust_u1_jax.inference import context as context_lib
from robust_u1_jax.inference import images as images_lib
from robust_u1_jax.inference import recovery as recovery_lib
from robust_u1_jax.inference import text as text_lib
from robust_u1_jax.models import bagel as bagel_lib

Array = jax.Array
CONTEXT_SLOTS = 1024  # initial cache size; caches grow in blocks of 256 slots


class ModelError(ValueError):
  """A model directory that cannot be used: the message names the file or token."""


def check_rules_fit(rules: images_lib.ImageRules, config: bagel_lib.BagelConfig,
                    model_dir: str) -> None:
  """ModelError unless the largest image of `rules` fits the model's latent grid: a small model
  without its `image_rules.json` would get BAGEL's 1024-pixel rules."""
  side = rules.vae_max_side // config.latent_downsample
  if side > config.max_latent_size:
    source = (f"its {images_lib.RULES_FILE}"
              if os.path.isfile(os.path.join(model_dir, images_lib.RULES_FILE))
              else f"BAGEL's: there is no {images_lib.RULES_FILE} beside it")
    raise ModelError(
        f"{model_dir}: images up to {rules.vae_max_side} px (the image rules: {source}) make "
        f"{side} latent tokens a side, and the model takes at most {config.max_latent_size}; "
        f"copy the {images_lib.RULES_FILE} the model was trained with into {model_dir}")


def resolve_model_dir(path: str) -> str:
  """A stage's workdir stands for its `model/`."""
  if not path:
    raise ModelError("no model directory given (an empty path)")
  if not os.path.exists(path):
    raise ModelError(f"{path}: no such model directory")
  if not os.path.isdir(path):
    raise ModelError(f"{path}: not a directory (give a BAGEL / Robust-U1 model directory, an "
                     "Orbax model checkpoint or a stage's workdir)")
  from robust_u1_jax.checkpoints import orbax_io

  if os.path.isdir(os.path.join(path, "model")):
    path = os.path.join(path, "model")
  if not orbax_io.is_model(path):  # before its tokenizer is looked for, which it would lack too
    raise ModelError(orbax_io.not_a_model(path))
  return path


def load_tokenizer(model_dir: str, tokenizer_dir: str | None = None):
  """The tokenizer beside the model (or `tokenizer_dir`), with BAGEL's special tokens checked."""
  from robust_u1_jax.data import tokenizer as tokenizer_lib

  path = tokenizer_dir or model_dir
  files = set(os.listdir(path)) if os.path.isdir(path) else set()
  if not files & {"tokenizer.json", "vocab.json"}:
    raise ModelError(f"{path}: missing tokenizer.json (or vocab.json + merges.txt); copy the "
                     "tokenizer files of the model there or give their folder (--tokenizer DIR, "
                     "tokenizer_dir=)")
  tok = tokenizer_lib.load_tokenizer(path)
  try:
    tokenizer_lib.special_token_ids(tok)
  except KeyError as e:
    raise ModelError(f"{path}: {e.args[0]}") from None
  return tok


@dataclasses.dataclass
class Engine:
  graphdef: nnx.GraphDef
  weights: nnx.State
  config: bagel_lib.BagelConfig
  tokenizer: Any
  rules: images_lib.ImageRules
  mesh: jax.sharding.Mesh | None = None
  # The guidance the model was trained with (its guidance.json), which a sampler of its
  # recoveries takes: recovery.Sampler(num_steps=..., guidance=engine.guidance).
  guidance: recovery_lib.Guidance = dataclasses.field(default_factory=recovery_lib.Guidance)
  # The instruction it was trained to recover by (its instruction.json): `recover`'s default, and
  # the answer loop's restore request.
  instruction: str = recovery_lib.INSTRUCTION

  @classmethod
  def load(cls, path: str, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
           tokenizer_dir: str | None = None, progress: bool = False) -> Engine:
    from robust_u1_jax.checkpoints import orbax_io

    model_dir = resolve_model_dir(path)
    tokenizer = load_tokenizer(model_dir, tokenizer_dir)
    model = orbax_io.load_pretrained(model_dir, mesh=mesh, dtype=jnp.dtype(dtype),
                                     param_dtype=jnp.dtype(dtype), progress=progress)
    rules = images_lib.ImageRules.for_model_dir(model_dir)
    check_rules_fit(rules, model.config, model_dir)
    return cls.from_model(model, tokenizer, rules, mesh,
                          guidance=recovery_lib.Guidance.for_model_dir(model_dir),
                          instruction=recovery_lib.instruction_of_model(model_dir))

  @classmethod
  def from_model(cls, model: bagel_lib.Bagel, tokenizer, rules: images_lib.ImageRules,
                 mesh: jax.sharding.Mesh | None = None, *,
                 guidance: recovery_lib.Guidance | None = None,
                 instruction: str = recovery_lib.INSTRUCTION) -> Engine:
    graphdef, weights = nnx.split(model)
    return cls(graphdef, weights, model.config, tokenizer, rules, mesh,
               guidance or recovery_lib.Guidance(), instruction)

  @functools.cached_property
  def special(self) -> dict[str, int]:
    from robust_u1_jax.data import tokenizer as tokenizer_lib

    return tokenizer_lib.special_token_ids(self.tokenizer)

  @property
  def markers(self) -> sequence.Markers:
    return sequence.Markers(self.special["vision_start"], self.special["vision_end"],
                            self.special["endoftext"])

  def encode_block(self, text: str) -> list[int]:
    """`<|im_start|>text<|im_end|>` ids, BAGEL's text block."""
    return [self.special["im_start"], *self.tokenizer.encode(text, add_special_tokens=False),
            self.special["im_end"]]

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  def run(self, fn, *args, **static):
    """Calls a jitted function of this module on the engine's weights, inside its mesh."""
    if self.mesh is None:
      return fn(self.graphdef, self.weights, *args, **static)
    with jax.set_mesh(self.mesh):
      return fn(self.graphdef, self.weights, *args, **static)

  def generate_batch(self, blocks_per_row: Sequence[Sequence[sequence.Block]],
                     images_bkhwc: np.ndarray, *, max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0, posterior: str = "mean") -> list[list[int]]:
    """Text after each row's context, all rows in one batch (BAGEL's `gen_text` per row).

    Every row holds K images of one VAE size: `images_bkhwc` (B, K, H, W, 3) uint8, the row's
    `Latent(image=k)` blocks reading image k. Rows are padded to a multiple of 64 tokens (few
    shapes to compile). Returns each row's ids up to (without) `<|im_end|>`.
    """
    longest = max(sequence.lengths(b, *sequence.strides(self.config))[0] for b in blocks_per_row)
    rows = context_lib.rows(blocks_per_row, self.config, self.markers,
                            min_length=-(-longest // 64) * 64)
    key = jax.random.PRNGKey(seed)
    start = jnp.full((len(blocks_per_row),), self.special["im_start"], jnp.int32)
    out = jax.device_get(self.run(
        _prefill_and_generate, rows, jnp.asarray(images_bkhwc), start, key,
        max_new_tokens=max_new_tokens, temperature=float(temperature),
        stop_ids=(self.special["im_end"],), posterior=posterior))
    return [[int(t) for t in out.tokens[i, :max(int(out.length[i]) - (out.stop[i] >= 0), 0)]]
            for i in range(len(blocks_per_row))]

  def conversation(self, seed: int = 0, posterior: str = "sample") -> Conversation:
    return Conversation(self, jax.random.PRNGKey(seed), posterior)

  def recover(self, corrupted: Sequence[np.ndarray], *,
              sampler: recovery_lib.Sampler | None = None, keys: Array | None = None,
              instruction: str | None = None, posterior: str = "sample",
              progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Corrupted uint8 H x W x 3 images -> (recovered uint8 images at their VAE size (BAGEL's
    resize rule of the model), their latents). The images must share that size, which one batch
    takes.

    `sampler`: default, the release's 50 steps at the model's guidance (a sampler of your own
    takes it as `guidance=engine.guidance`; recovery.Sampler's default is BAGEL's). `keys` (B, 2):
    one per image, so an image's recovery does not depend on its batch; default, image i's
    `image_keys(0, [i])`. `instruction`: the text the model recovers by (default: the model's,
    `Engine.instruction`).
    `posterior`: 'sample' draws the corrupted image's VAE latents, as the release does; 'mean'
    takes their mean. `progress`: a bar of this name over the sampling steps, on stderr (None:
    no bar): the moves then run one program call each (`_sample_moves`), to the same result.
    """
    corrupted = self._at_vae_size(corrupted, "recover")
    context_lib.posterior_key(posterior, None)  # an unknown setting fails here, not in a compile
    sampler = sampler or recovery_lib.Sampler(guidance=self.guidance)
    keys = image_keys(0, range(len(corrupted))) if keys is None else keys
    if np.ndim(keys) != 2 or len(keys) != len(corrupted):
      raise ValueError(f"recover: keys of shape {np.shape(keys)} for {len(corrupted)} images; "
                       "give one key per image, (B, 2): image_keys(seed, range(B))")
    samples = [{"corrupted": image,
                "corrupted_vit": np.asarray(images_lib.vit_resize(
                    image, self.rules.vit_size(*image.shape[:2])))} for image in corrupted]
    inputs = recovery_lib.recovery_inputs(samples, self.config, self.markers,
                                          self.encode_block(instruction or self.instruction))
    if not progress:
      latents, images = self.run(_recover, inputs, keys, sampler=sampler, posterior=posterior)
      return np.asarray(images), np.asarray(latents)
    contexts, x_init, steps_key = self.run(_recovery_start, inputs, keys, sampler=sampler,
                                           posterior=posterior)
    latents = self._sample_moves(contexts, x_init, steps_key, sampler, progress)
    images = self.run(_decode, latents, size_hw=corrupted[0].shape[:2], quantize=True)
    return np.asarray(images), np.asarray(latents)

  def _sample_moves(self, contexts: recovery_lib.SamplerContexts, x: Array, key: Array,
                    sampler: recovery_lib.Sampler, name: str) -> Array:
    """The sampler's run as `recovery.sample_latents` makes it, one program call per move, with
    a bar over the steps: programs that JAX's persistent cache keeps (a host callback inside the
    sampler's scan would make the recovery a program it refuses, compiled again on every run).
    The bar opens once the first move is done, its compile behind it."""
    bar = None

    def moved():
      nonlocal bar
      if bar is None:
        # The schedule's points: the noise at t = 1 is the first, each move adds one.
        bar = progress_lib.bar(total=sampler.num_steps, initial=1, desc=name, unit="step",
                               dynamic_ncols=True)
      bar.update(1)

    try:
      return sample_moves(self.run, contexts, x, key, sampler, moved)
    finally:
      if bar is not None:
        bar.close()

  def round_trip(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 H x W x 3 images of one VAE size -> the VAE's own reconstructions of them at that
    size (posterior mean), uint8: what a recovery decoded by this VAE gets nearest to, given the
    clean image's latents."""
    images = np.stack(self._at_vae_size(images, "round_trip"))
    return np.asarray(self.run(_round_trip, jnp.asarray(images)))

  def _at_vae_size(self, images: Sequence[np.ndarray], where: str) -> list[np.ndarray]:
    """`images` (a list or a B x H x W x 3 array) checked and resized to their VAE size, which
    they must share: one batch is one compiled shape."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
      raise ValueError(f"{where}: takes a list of images (or a B x H x W x 3 array), got one "
                       f"image of shape {images.shape}: give [image]")
    images = [images_lib.check_image(image, where, self.rules.min_side) for image in images]
    if not images:
      raise ValueError(f"{where}: no images")
    images = [self.rules.at_vae_size(image) for image in images]
    sizes = sorted({image.shape[:2] for image in images})
    if len(sizes) > 1:
      raise ValueError(f"{where}: images of VAE sizes {sizes} in one batch; give each size "
                       "in its own call")
    return images

  def __repr__(self) -> str:  # the dataclass's would print every weight
    n = sum(x.size for x in jax.tree.leaves(self.weights))
    return (f"Engine({n:,} parameters, {self.config.llm.num_layers} LLM layers, images "
            f"up to {self.rules.vae_max_side} px, guidance {self.guidance.text_scale} / "
            f"{self.guidance.image_scale}, mesh {dict(self.mesh.shape) if self.mesh else None})")


def image_keys(seed: int, indices: Sequence[int]) -> Array:
  """(B, 2) keys, image i's from (seed, i): its noise does not depend on its batch."""
  base = jax.random.PRNGKey(seed)
  return jnp.stack([jax.random.fold_in(base, i) for i in indices])


class Conversation:
  """Images and texts in, in order; text and images out. One sample (batch of one)."""

  def __init__(self, engine: Engine, key: Array, posterior: str = "sample"):
    context_lib.posterior_key(posterior, key)  # validates the name
    self.engine, self.key, self.posterior = engine, key, posterior
    self.contexts = engine.run(_new_contexts, batch=1, length=CONTEXT_SLOTS)
    self.image_hw: tuple[int, int] | None = None  # the last input image's VAE size

  def _next_key(self) -> Array:
    self.key, key = jax.random.split(self.key)
    return key

  def _grow(self, tokens: int) -> None:
    self.contexts = self.contexts.grow(tokens)

  def _text_rows(self, ids: Sequence[int]):
    return context_lib.rows([[sequence.Text(list(ids))]], self.engine.config,
                            self.engine.markers, min_length=context_lib.text_bucket(len(ids)))

  def add_text(self, text: str) -> None:
    self.add_text_ids(self.engine.encode_block(text))

  def add_text_ids(self, ids: Sequence[int], *, generated: bool = False) -> None:
    rows = self._text_rows(ids)
    self._grow(rows.token_kind.shape[1])
    self.contexts = self.engine.run(_add_text, self.contexts, rows, generated=generated)

  def add_image(self, image: np.ndarray, *, generated: bool = False) -> np.ndarray:
    """Adds an image (VAE tokens, then ViT tokens) and returns it at its VAE size.

    A generated image (already at a VAE size) re-enters through the same resize as an input.
    """
    rules = self.engine.rules
    image = images_lib.check_image(image, "add_image", 0 if generated else rules.min_side)
    if generated:
      vae_image = image
      vit_image = np.asarray(images_lib.vit_resize(image, rules.vit_size(*image.shape[:2])))
    else:
      vae_image, vit_image = rules.prepare(image)
    rows = context_lib.rows([context_lib.image_blocks(vae_image, vit_image)], self.engine.config,
                            self.engine.markers)
    self._grow(rows.token_kind.shape[1])
    key = context_lib.posterior_key(self.posterior, self._next_key())
    self.contexts = self.engine.run(_add_image, self.contexts, rows, vae_image[None, None], key,
                                    generated=generated)
    if not generated:
      self.image_hw = vae_image.shape[:2]
    return vae_image

  def generate_text(self, *, max_new_tokens: int = 512, temperature: float = 0.0,
                    stop_ids: Sequence[int] = (), start: str = "im_start", keep: bool = False
                    ) -> tuple[list[int], int]:
    """(token ids before the stop token, the stop token or -1 when out of tokens).

    Feeds `start` (a special token's name), then decodes until a token of `stop_ids` (default:
    BAGEL's `<|im_end|>`). With `keep`, the fed tokens stay in the full context (the reasoner's
    way); otherwise the context is unchanged and `add_text_ids` puts the text in (BAGEL's).
    """
    special = self.engine.special
    stops = tuple(sorted(set(stop_ids) or {special["im_end"]}))
    self._grow(max_new_tokens + 1)
    first = jnp.full((1,), special[start], jnp.int32)
    out = self.engine.run(_generate_text, self.contexts.full, first, self._next_key(),
                          max_new_tokens=max_new_tokens, temperature=float(temperature),
                          stop_ids=stops)
    if keep:
      self.contexts = self.contexts.replace(full=out.cache)
    n, stop = int(out.length[0]), int(out.stop[0])
    ids = [int(t) for t in np.asarray(out.tokens[0, :n])]
    return (ids[:-1] if stop >= 0 else ids), stop

  def generate_image(self, size_hw: tuple[int, int] | None = None, *,
                     sampler: recovery_lib.Sampler | None = None,
                     x_init: Array | None = None,
                     progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, latent tokens) generated from the three contexts; default size: the last
    input image's VAE size; default sampler: the release's 50 steps at the model's guidance;
    `progress` as Engine.recover's."""
    sampler = sampler or recovery_lib.Sampler(guidance=self.engine.guidance)
    h, w = size_hw or self.image_hw or (None, None)
    if h is None:
      raise ValueError("generate_image needs a size: no input image to take it from")
    noisy = context_lib.noisy_rows(h, w, 1, self.engine.config, self.engine.markers)
    if x_init is None:
      n = noisy.latent_seq_index.shape[1]
      x_init = jax.random.normal(self._next_key(), (1, n, self.engine.config.latent_channels))
    key = self._next_key()
    if progress:
      contexts = recovery_lib.SamplerContexts(self.contexts.full, self.contexts.no_text,
                                              self.contexts.no_image, noisy)
      latents = self.engine._sample_moves(contexts, x_init, key, sampler, progress)
      image = self.engine.run(_decode, latents, size_hw=(h, w))
    else:
      latents, image = self.engine.run(_generate_image, self.contexts, noisy, x_init, key,
                                       sampler=sampler, size_hw=(h, w))
    return np.asarray(images_lib.quantize(image))[0], np.asarray(latents)


# -- jitted computations: (graphdef, weights, ...) with the graph definition static ---------------


@functools.partial(jax.jit, static_argnums=0, static_argnames=("batch", "length"))
def _new_contexts(graphdef, weights, *, batch: int, length: int) -> context_lib.Contexts:
  return context_lib.Contexts.create(nnx.merge(graphdef, weights), batch, length)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("generated",))
def _add_text(graphdef, weights, contexts, rows, *, generated: bool):
  model = nnx.merge(graphdef, weights)
  if generated:
    return contexts.add_generated_text(model, rows)
  return contexts.add_text(model, rows)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("generated",))
def _add_image(graphdef, weights, contexts, rows, image_11hwc, key, *, generated: bool):
  model = nnx.merge(graphdef, weights)
  latents = context_lib.gather_latents(context_lib.encode_images(model, image_11hwc, key), rows)
  if generated:
    return contexts.add_generated_image(model, rows, latents)
  return contexts.add_image(model, rows, latents)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("max_new_tokens", "temperature", "stop_ids"))
def _generate_text(graphdef, weights, cache, start, key, *, max_new_tokens, temperature,
                   stop_ids):
  return text_lib.generate(nnx.merge(graphdef, weights), cache, start, key,
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_ids=stop_ids)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampler", "size_hw"))
def _generate_image(graphdef, weights, contexts, noisy, x_init, key, *, sampler, size_hw):
  model = nnx.merge(graphdef, weights)
  g = sampler.guidance
  velocity = recovery_lib.guided_velocity(model, contexts.full, contexts.no_text,
                                          contexts.no_image, noisy, g)
  latents = recovery_lib.sample_latents(velocity, x_init, sampler, key).x_final
  return latents, context_lib.decode_latents(model, latents, *size_hw)


def sample_moves(run, contexts: recovery_lib.SamplerContexts, x: Array, key: Array,
                 sampler: recovery_lib.Sampler, moved=lambda: None) -> Array:
  """The sampler's moves from x, one `_sample_move` call each, waited for, `moved()` after each;
  `run(fn, *args, **static)` calls a program on the weights (`Engine.run`)."""
  for i in range(sampler.num_steps - 1):
    x = jax.block_until_ready(run(_sample_move, contexts, x, key, np.int32(i), sampler=sampler))
    moved()
  return x


def _posterior_keys(keys, posterior: str):
  if posterior != "sample":
    return None
  return recovery_lib.stream_key(keys, recovery_lib.POSTERIOR_STREAM)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampler", "posterior"))
def _recover(graphdef, weights, inputs, keys, *, sampler, posterior):
  latents, images = recovery_lib.recover(nnx.merge(graphdef, weights), inputs, sampler, keys,
                                         posterior_key=_posterior_keys(keys, posterior))
  return latents, images_lib.quantize(images)


# `_recover` in parts, for a bar over its steps (`Engine._sample_moves`): the start, one move per
# call, the decode.
@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampler", "posterior"))
def _recovery_start(graphdef, weights, inputs, keys, *, sampler, posterior):
  return recovery_lib.recovery_start(nnx.merge(graphdef, weights), inputs, sampler, keys,
                                     posterior_key=_posterior_keys(keys, posterior))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampler",))
def _sample_move(graphdef, weights, contexts, x, key, i, *, sampler):
  model = nnx.merge(graphdef, weights)
  velocity = recovery_lib.guided_velocity(model, *contexts, sampler.guidance)
  return recovery_lib.sample_move(velocity, x, sampler, key, i)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("size_hw", "quantize"))
def _decode(graphdef, weights, latents, *, size_hw, quantize=False):
  # Quantized in the decode's program as `_recover` does: the same rounding, fused the same way.
  images = context_lib.decode_latents(nnx.merge(graphdef, weights), latents, *size_hw)
  return images_lib.quantize(images) if quantize else images


@functools.partial(jax.jit, static_argnums=0)
def _round_trip(graphdef, weights, images_bhwc):
  model = nnx.merge(graphdef, weights)
  latents = context_lib.encode_images(model, images_bhwc[:, None])
  return images_lib.quantize(context_lib.decode_latents(model, latents, *images_bhwc.shape[1:3]))


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "max_new_tokens", "temperature", "stop_ids", "posterior"))
def _prefill_and_generate(graphdef, weights, rows, images_bkhwc, start, key, *, max_new_tokens,
                          temperature, stop_ids, posterior):
  model = nnx.merge(graphdef, weights)
  vae_key, text_key = jax.random.split(key)
  tokens = context_lib.encode_images(model, images_bkhwc,
                                     context_lib.posterior_key(posterior, vae_key))
  cache = model.init_cache(rows.token_kind.shape[0], rows.token_kind.shape[1] + max_new_tokens)
  cache = context_lib.prefill(model, cache, rows, context_lib.gather_latents(tokens, rows))
  return text_lib.generate(model, cache, start, text_key, max_new_tokens=max_new_tokens,
                           temperature=temperature, stop_ids=stop_ids)
