"""One run setup: the mesh, tokenizer, image markers and model of a run, built one way.

`make_context(config)` is the constructor `trainer.train`, the recovery cache
(`recovery_cache.build`) and the AOT check (`benchmarks/aot.py`, with an abstract model) all use,
so the three agree on the model a config means. The model's config is worked out first, without
weights (`model_config`: a preset sized to the tokenizer, or the config stored with `init_from`),
and checked against the tokenizer (`tokenizer_dir`: the one saved with `init_from`'s model unless
data.tokenizer_dir names another) and the data config's copies of its patch sizes before anything
is built.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from robust_u1_jax import config_lib, files, sharding
from robust_u1_jax.data import sequence
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.models import bagel as bagel_lib
from robust_u1_jax.training.stage_spec import RunContext

# The tiny preset's vocabulary is the tokenizer's, never below this (a few spare ids).
MIN_TINY_VOCAB = 64
# A folder holding one of these holds a tokenizer (`tokenizer.load_tokenizer`).
TOKENIZER_FILES = frozenset({"tokenizer.json", "vocab.json"})


def markers(tokenizer) -> sequence.Markers:
  """The token ids around image blocks, from the tokenizer's special tokens."""
  special = tokenizer_lib.special_token_ids(tokenizer)
  return sequence.Markers(special["vision_start"], special["vision_end"], special["endoftext"])


def model_source(config: ml_collections.ConfigDict) -> str:
  """`init_from` as a model path: an earlier stage's workdir means its `model/`."""
  source = config.init_from
  if source != "random" and os.path.isdir(os.path.join(source, "model")):
    return os.path.join(source, "model")
  return source


def init_files(config: ml_collections.ConfigDict, *, relative: bool = True) -> str:
  """The model `init_from` names, by its files (a digest of their paths within it, sizes and
  times): a resumed run whose base is now another model is told apart from one whose base was
  moved whole. `relative=False`: by their absolute paths, so a moved copy differs too. 'random'
  for random weights, which the seed decides."""
  source = model_source(config)
  if source == "random":
    return "random"
  return files.files_digest([os.path.abspath(source)], relative=relative)


def _overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(dtype=jnp.dtype(config.compute_dtype), param_dtype=jnp.dtype(config.param_dtype),
              remat=config.remat, attention=config.get("attention", "auto"))


def model_config(config: ml_collections.ConfigDict, tokenizer) -> bagel_lib.BagelConfig:
  """The BagelConfig the run trains, read without loading weights: for `init_from='random'` the
  preset `config.model` (the tiny one sized to the tokenizer), else the config stored with the
  model `init_from` names (a BAGEL directory, an Orbax checkpoint, an earlier stage's workdir)."""
  source = model_source(config)
  if source == "random":
    if config.model not in bagel_lib.PRESETS:
      raise config_lib.ConfigError(
          f"config field model = {config.model!r} is invalid: allowed "
          f"{', '.join(bagel_lib.PRESETS)} (the presets of models/bagel.py)")
    vocab = max(len(tokenizer), MIN_TINY_VOCAB) if config.model == "tiny" else None
    return bagel_lib.preset(config.model, vocab, **_overrides(config))
  from robust_u1_jax.checkpoints import bagel_dir, orbax_io  # only when reading a model's files

  if orbax_io.is_orbax_model(source):
    return orbax_io.read_orbax_config(source, **_overrides(config))
  if os.path.isfile(os.path.join(source, bagel_dir.LLM_CONFIG)):
    # As the weights will be read (`bagel_dir.load_model_dir`): BAGEL's llm_config.json leaves
    # out QK-norm and the generation expert, which its tensors' names settle, and a directory
    # this project wrote adds its image-side fields in robust_u1_config.json.
    keys = bagel_dir.open_model_files(source).keys()
    return bagel_dir.read_config(source, keys=keys, **_overrides(config))
  why = orbax_io.not_a_model(source)
  if os.path.isdir(os.path.join(source, "checkpoints")):  # an earlier stage, stopped
    raise FileNotFoundError(f"config field init_from = {config.init_from!r}: {why}")
  raise FileNotFoundError(
      f"config field init_from = {config.init_from!r} is neither 'random' nor the workdir of an "
      f"earlier stage (its model/), and {why}")


def _saved_tokenizer_dir(config: ml_collections.ConfigDict) -> str | None:
  """The tokenizer folder beside init_from's model, if it has one."""
  source = model_source(config)
  if source != "random" and os.path.isdir(source) and TOKENIZER_FILES & set(os.listdir(source)):
    return source
  return None


def _model_description(config: ml_collections.ConfigDict) -> str:
  """The run's model as an error line names it."""
  if model_source(config) == "random":
    return f"the preset model={config.model!r}"
  return f"the model of init_from={config.init_from!r}"


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  """The run's tokenizer folder: `data.tokenizer_dir` when set, else the one saved beside
  init_from's model, else the built-in world's. A model's token ids are its own tokenizer's: the
  built-in tokenizer is rebuilt from the world's texts whenever they change, and a BAGEL
  directory carries Qwen2's, so continuing from a model with any other would feed it other ids
  (or ids past its vocabulary, whose embeddings read as NaN)."""
  return (config.data.tokenizer_dir or _saved_tokenizer_dir(config)
          or tokenizer_lib.default_tokenizer_dir())


def check_tokenizer_fits_model(config: ml_collections.ConfigDict, tokenizer,
                               mc: bagel_lib.BagelConfig) -> None:
  """Refuses a tokenizer with ids past the model's vocabulary (their embeddings would read as
  NaN at the first step), and a `data.tokenizer_dir` that reads text other than the tokenizer
  saved with init_from's model: its special tokens (the image markers, BAGEL's bos / eos) first,
  then its ordinary tokens' ids and its merges."""
  where = _model_description(config)
  if len(tokenizer) > mc.llm.vocab_size:
    raise config_lib.ConfigError(
        f"the tokenizer in {tokenizer_dir(config)} has {len(tokenizer)} tokens, more than the "
        f"vocab_size {mc.llm.vocab_size} of {where}; set --config.data.tokenizer_dir to the "
        "tokenizer the model was trained with")
  saved = _saved_tokenizer_dir(config)
  if (saved is None and not config.data.tokenizer_dir and model_source(config) != "random"
      and len(tokenizer) != mc.llm.vocab_size):
    # The built-in tokenizer stands in: right for a model built with it (its vocabulary is the
    # tokenizer's), wrong for BAGEL's (Qwen2's 152k ids) copied without its tokenizer files.
    raise config_lib.ConfigError(
        f"{where} has no tokenizer files beside it (tokenizer.json, or vocab.json and "
        f"merges.txt), and its vocabulary ({mc.llm.vocab_size:,} ids) is not the built-in "
        f"tokenizer's ({len(tokenizer):,}); copy the tokenizer it was trained with beside it, or "
        "set --config.data.tokenizer_dir")
  if (not config.data.tokenizer_dir or saved is None
      or os.path.abspath(saved) == os.path.abspath(config.data.tokenizer_dir)):
    return  # the model's own tokenizer
  ours = tokenizer_lib.special_token_ids(tokenizer)
  saved_tokenizer = tokenizer_lib.load_tokenizer(saved)
  try:
    theirs = tokenizer_lib.special_token_ids(saved_tokenizer)
  except KeyError:  # a saved tokenizer without BAGEL's special tokens: nothing to compare
    return
  differ = [f"{name} {ours[name]} (saved: {theirs[name]})" for name in ours
            if name != "pad" and ours[name] != theirs[name]]  # padding is never read
  fix = "leave data.tokenizer_dir empty to read with the model's own"
  field = f"config field data.tokenizer_dir = {config.data.tokenizer_dir!r}"
  if differ:
    raise config_lib.ConfigError(
        f"{field} gives the special tokens other ids than the tokenizer saved with {where}: "
        f"{', '.join(differ)}; {fix}")
  difference = tokenizer_lib.reading_difference(tokenizer, saved_tokenizer,
                                                  "the saved one")
  if difference:
    raise config_lib.ConfigError(
        f"{field} reads text other than the tokenizer saved with {where}: {difference}; {fix}")


def check_data_fits_model(config: ml_collections.ConfigDict, mc: bagel_lib.BagelConfig,
                          prefixes: Sequence[str] = ("data", "eval_data")) -> None:
  """Refuses a data config whose `vit_patch` / `vae_stride` differ from the model's ViT patch
  size and pixels per latent token: the pipeline sizes images (and packing counts tokens) with
  the data fields, the model cuts them with its own, so a mismatch would cut images wrongly."""
  where = _model_description(config)
  for prefix in prefixes:
    d = config.get(prefix)
    if d is None:
      continue
    for field, value, model_field, model_value in (
        ("vit_patch", d.vit_patch, "vit.patch_size", mc.vit.patch_size),
        ("vae_stride", d.vae_stride, "latent_downsample (VAE downsample x latent_patch_size)",
         mc.latent_downsample)):
      if value != model_value:
        raise config_lib.ConfigError(
            f"config field {prefix}.{field} = {value!r} does not match {model_field} = "
            f"{model_value} of {where}; set --config.{prefix}.{field}={model_value}")


def init_model(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               mc: bagel_lib.BagelConfig) -> bagel_lib.Bagel:
  """The run's model with its weights, on `mesh`: `mc` initialised from `config.seed` for
  `init_from='random'`, else loaded (a BAGEL/Robust-U1 model directory, an Orbax model
  checkpoint, or an earlier stage's workdir)."""
  source = model_source(config)
  if source == "random":
    # Built outside any mesh context: parameters get their shardings from the explicit rules in
    # `sharding`, and the logical names must not be read as mesh axes.
    return sharding.create_sharded(lambda: bagel_lib.Bagel(mc, rngs=nnx.Rngs(config.seed)),
                                   bagel_lib.COMPONENTS, mesh)
  from robust_u1_jax.checkpoints import orbax_io  # heavy imports only when loading weights

  for note in (guidance_note(config), instruction_note(config), untrained_note(config)):
    if note:
      print(note, file=sys.stderr, flush=True)
  o = _overrides(config)
  return orbax_io.load_pretrained(source, mesh=mesh, dtype=o["dtype"],
                                  param_dtype=o["param_dtype"], remat=o["remat"],
                                  attention=o["attention"], progress=True)


def _trained_with(config: ml_collections.ConfigDict, side_file: str) -> str | None:
  """init_from's model folder where it holds `side_file` (what it was trained with), else None."""
  source = model_source(config)
  if source == "random" or not os.path.isfile(os.path.join(source, side_file)):
    return None
  return source


def guidance_note(config: ml_collections.ConfigDict) -> str | None:
  """A note when the run recovers at other guidance scales than the model `init_from` names was
  trained to (its guidance.json): a reasoning stage from the demo's RL model (1.5 / 1.5) would
  recover at configs/reason.py's 4 / 2 without a word, and write 4 / 2 into its own model."""
  from robust_u1_jax.checkpoints.bagel_dir import GUIDANCE_FILE
  from robust_u1_jax.inference import recovery as recovery_lib

  source = _trained_with(config, GUIDANCE_FILE)
  if source is None:
    return None
  model = recovery_lib.Guidance.for_model_dir(source)
  g = config.guidance
  if (model.text_scale, model.image_scale) == (g.text_scale, g.image_scale):
    return None
  return (f"note: init_from's model recovers at guidance {model.text_scale:g} / "
          f"{model.image_scale:g} (text / image, its {GUIDANCE_FILE}), this run at "
          f"{g.text_scale:g} / {g.image_scale:g}; give --config.guidance.text_scale="
          f"{model.text_scale:g} --config.guidance.image_scale={model.image_scale:g} to keep "
          "the model's")


def instruction_note(config: ml_collections.ConfigDict) -> str | None:
  """A note when the run recovers by another instruction than the one the model `init_from` names
  was trained with (its instruction.json): RL from an SFT model trained with its own
  `--config.instruction` would otherwise train the default's recoveries without a word."""
  from robust_u1_jax.checkpoints.bagel_dir import INSTRUCTION_FILE
  from robust_u1_jax.inference import recovery as recovery_lib

  source = _trained_with(config, INSTRUCTION_FILE)
  if source is None or "instruction" not in config:
    return None
  model = recovery_lib.instruction_of_model(source)
  if model == config.instruction:
    return None
  return (f"note: init_from's model recovers by the instruction {model!r} (its "
          f"{INSTRUCTION_FILE}), this run by {config.instruction!r}; give "
          f"--config.instruction={shlex.quote(model)} to keep the model's")


def untrained_note(config: ml_collections.ConfigDict) -> str | None:
  """A note when a stage that samples the model's recoveries in its step (RL; reasoning with
  recoveries made on the fly) starts from a model that never learned to recover (the demo's vae
  or vit part, its no_recovery.json): its recoveries are noise, and RL's rewards barely move."""
  from robust_u1_jax.inference import recovery as recovery_lib

  source = model_source(config) if config_lib.samples_recoveries(config) else "random"
  stage = None if source == "random" else recovery_lib.untrained_stage(source)
  if stage is None:
    return None
  return (f"note: init_from's model is {stage}'s, which trains no recovery: the "
          f"{config.stage} stage's recoveries from it are noise; give an SFT or RL model (the "
          f"demo's: {recovery_lib.demo_parts(source, ('sft', 'rl'))})")


def abstract_model(mc: bagel_lib.BagelConfig, mesh: jax.sharding.Mesh) -> bagel_lib.Bagel:
  """The model with `ShapeDtypeStruct(shape, dtype, sharding)` parameters: nothing allocated."""
  from robust_u1_jax.checkpoints import bagel_dir

  return bagel_dir.abstract_bagel(mc, mesh)


def make_context(config: ml_collections.ConfigDict, *, devices: Sequence[Any] | None = None,
                 abstract: bool = False) -> RunContext:
  """The run's RunContext: mesh over `devices` (default all), tokenizer, markers, model config
  (checked against the data config) and the model, built on first use: with its weights, or
  shape-only when `abstract` (the AOT check)."""
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
  except ValueError as e:  # the devices are known only now: `--check_config` cannot tell
    raise config_lib.ConfigError(f"config field {e}; set --config.mesh.<axis> (one axis may be "
                                 "-1: the devices left)") from None
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir(config))
  mc = model_config(config, tokenizer)
  check_tokenizer_fits_model(config, tokenizer, mc)
  check_data_fits_model(config, mc)
  build = (lambda: abstract_model(mc, mesh)) if abstract else (
      lambda: init_model(config, mesh, mc))
  return RunContext(config, mesh, build, tokenizer, markers(tokenizer), model_config=mc)


def write_model(model: bagel_lib.Bagel, workdir: str, config: ml_collections.ConfigDict, *,
                recovers: bool = True) -> None:
  """A run's final model as `workdir/model`, the form later stages' `init_from`,
  `convert --to hf`, `recover` and `answer` read: an Orbax checkpoint with the tokenizer files,
  the run's image resize rules and, where the run trained the model to recover (`recovers`), its
  recoveries' guidance and instruction beside it. The demo's vae and vit parts train no
  recovery: a guidance.json there said 4 / 2, and the base part from them noted that it recovered
  at other guidance."""
  from robust_u1_jax.checkpoints import orbax_io
  from robust_u1_jax.inference import images as images_lib
  from robust_u1_jax.inference import recovery as recovery_lib

  def write_beside(folder: str) -> None:
    images_lib.ImageRules.from_data_config(config.data).save(folder)
    if recovers:
      recovery_lib.Guidance.from_config(config.guidance).save(folder)
      recovery_lib.save_instruction(folder, config.get("instruction") or recovery_lib.INSTRUCTION)
    else:  # `recover` and `answer` say its output is noise
      recovery_lib.save_no_recovery(folder, config.stage)

  orbax_io.save_orbax(model, os.path.join(workdir, "model"), tokenizer_dir=tokenizer_dir(config),
                      overwrite=True, write_beside=write_beside)
