"""The flags and helpers of the commands that run a model on a user's images (`recover`,
`answer`): loading the model (--model, --dtype, --mesh, --tokenizer), the recovery sampler's
settings, reading and writing images, and the one `error:` line with exit status 2 for an input
they cannot use.

Flags are defined by the entry modules (`define_model_flags`, `define_sampler_flags`) when run as
programs, or on a flag set of their own (`own_flags`), so importing this module defines nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
import numpy as np

from robust_u1_jax import cli, files

DTYPES = ("float32", "bfloat16")


class InputError(cli.Error):
  """An input the command cannot use; the message starts with the path (or flag) at fault."""


# -- flags ----------------------------------------------------------------------------------------


def define_model_flags(values: flags.FlagValues) -> None:
  """The flags that load a model."""
  flags.DEFINE_string(
      "model", None, "BAGEL / Robust-U1 model directory (ema.safetensors, model.safetensors or "
      "model_bf16.safetensors, ae.safetensors, llm_config.json, vit_config.json, tokenizer "
      "files), an Orbax model checkpoint (`convert`), or a stage's workdir (its model/).",
      flag_values=values)
  flags.DEFINE_enum("dtype", "float32", DTYPES,
                    "Parameter and compute dtype (bfloat16 halves the memory of a 7B model).",
                    flag_values=values)
  flags.DEFINE_string(
      "mesh", "", "Shard the parameters over devices: axis=size pairs, e.g. fsdp=-1 (all devices) "
      "or data=1,fsdp=4,tensor=2; unnamed axes are 1. Default: one device.", flag_values=values)
  flags.DEFINE_string("tokenizer", None,
                      "Tokenizer directory, when the model directory has no tokenizer files.",
                      flag_values=values)
  flags.DEFINE_bool("progress", True, "Show progress bars.", flag_values=values)


def define_sampler_flags(values: flags.FlagValues) -> None:
  """The recovery sampler's settings beyond its step count (each command has its own --steps)."""
  flags.DEFINE_float("cfg_text", None, "Text guidance scale (BAGEL's cfg_text_scale), >= 1 (1: "
                     "none). Default: the model's (guidance.json, written by training), else "
                     "BAGEL's 4.", flag_values=values)
  flags.DEFINE_float("cfg_img", None, "Image guidance scale (BAGEL's cfg_img_scale), >= 1 (1: "
                     "none). Default: the model's (guidance.json), else BAGEL's 2.",
                     flag_values=values)
  flags.DEFINE_float("shift", 3.0, "Timestep shift of the schedule.", flag_values=values)
  flags.DEFINE_bool("sde", False, "The released Robust-U1 sampler: one stochastic step (index 3, "
                    "noise level 0.7) among the Euler steps; needs --steps >= 5.",
                    flag_values=values)


# -- model, sampler and images -------------------------------------------------------------------


def read_image(path: str, min_side: int = 0) -> np.ndarray:
  """uint8 RGB pixels of an image file, through the one decoder training uses; InputError for a
  file that is missing, no image, or has a side below `min_side`."""
  from robust_u1_jax.data import transforms
  from robust_u1_jax.inference import images as images_lib

  try:
    return transforms.read_image(path, min_side=min_side, setting=images_lib.MIN_SIDE_SETTING)
  except transforms.BadImageError as e:
    raise InputError(str(e)) from None


def model_rules(model: str):
  """The resize rules of the model `model` (a directory or a stage's workdir), read without
  loading it; InputError for a path that is no model directory."""
  from robust_u1_jax.inference import images as images_lib

  return _beside_model(model, images_lib.ImageRules.for_model_dir)


def _beside_model(model: str, read: Callable[[str], Any]):
  """What `read` takes from the model directory of `model`; InputError naming the file."""
  from robust_u1_jax.inference import engine as engine_lib

  try:
    return read(engine_lib.resolve_model_dir(model))
  except (OSError, ValueError) as e:
    text = str(e)
    raise InputError(f"--model {text}" if text.startswith(model) else text) from None


def write_image(path: str, image: np.ndarray) -> None:
  """Writes atomically (a temporary file, then a rename): an interrupted run leaves no half image
  that a resumed run would take for done. The format follows the extension."""
  from PIL import Image

  with files.atomic_write(path) as f:
    Image.fromarray(image).save(f, format=cli.image_format(path))


def make_mesh(spec: str):
  """'fsdp=-1' or 'data=1,fsdp=4,tensor=2' -> a mesh (None for ''); unnamed axes are 1."""
  if not spec:
    return None
  import jax

  from robust_u1_jax import sharding

  sizes = dict.fromkeys(sharding.MESH_AXES, 1)
  for part in spec.split(","):
    axis, _, size = (s.strip() for s in part.partition("="))
    if axis not in sizes or not size.lstrip("-").isdigit():
      raise InputError(f"--mesh {spec!r}: expected axis=size pairs separated by commas, axes "
                       f"{', '.join(sharding.MESH_AXES)} (e.g. fsdp=-1)")
    sizes[axis] = int(size)
  devices = jax.devices()
  if -1 not in sizes.values():
    devices = devices[:math.prod(sizes.values())]  # fixed sizes may use fewer devices than exist
  try:
    return sharding.make_mesh(sizes, devices)
  except ValueError as e:
    raise InputError(f"--mesh {spec!r}: {e}") from None


MAX_STEPS = 10_000  # sampler steps: 200x the release's, past any use of a finer Euler path


def make_sampler(values: flags.FlagValues, steps: int):
  """The sampler of the flags; guidance not given is the model's (`guidance.json`)."""
  from robust_u1_jax.inference import recovery

  if steps < 2:
    raise InputError(f"--steps {steps}: a recovery takes at least 2 sampling steps")
  if steps > MAX_STEPS:  # else found as an out-of-memory blamed on the inputs, or a traceback
    raise InputError(f"--steps {steps}: at most {MAX_STEPS} (the release samples 50)")
  if values.sde and steps < recovery.RELEASED_SDE_STEP + 2:
    raise InputError(f"--sde --steps {steps}: the stochastic step is step "
                     f"{recovery.RELEASED_SDE_STEP + 1} of the recovery's moves, so --sde needs "
                     f"--steps >= {recovery.RELEASED_SDE_STEP + 2}")
  try:
    guidance = _beside_model(values.model, lambda path: recovery.Guidance.of_model(
        path, values.cfg_text, values.cfg_img))
    return recovery.Sampler(
        num_steps=steps, shift=values.shift, guidance=guidance,
        sde_step=recovery.RELEASED_SDE_STEP if values.sde else -1)
  except ValueError as e:
    raise InputError(f"sampler: {e}") from None


def load_engine(values: flags.FlagValues, work: str):
  """The model of --model; InputError naming the file for a directory that cannot be used.
  Once loaded, one line says so and names the `work` that begins: its first result waits for the
  compiles (18 s for the demo's model on 2 CPU cores, minutes for a 7B model), which a command
  otherwise spent with nothing on the terminal."""
  from robust_u1_jax.inference import engine
  from robust_u1_jax.inference import recovery as recovery_lib

  mesh = make_mesh(values.mesh)
  start = time.monotonic()
  try:
    loaded = engine.Engine.load(values.model, dtype=values.dtype, mesh=mesh,
                                tokenizer_dir=values.tokenizer, progress=values.progress)
  except (OSError, ValueError) as e:  # ModelError and CheckpointError are ValueErrors
    raise InputError(str(e)) from None
  print(f"loaded {values.model} in {time.monotonic() - start:.1f} s; {work} (a first run "
        "compiles the model's programs first)", flush=True)
  note = recovery_lib.untrained_note(engine.resolve_model_dir(values.model))
  if note:
    print(note, flush=True)
  return loaded


def own_flags(argv: Sequence[str], define) -> flags.FlagValues:
  """`argv` (program name first) parsed into a flag set of its own, defined by `define(values)`:
  for callers in one process (tests), where the global flags may hold another entry point's."""
  values = flags.FlagValues()
  define(values)
  rest = values(list(argv))
  if len(rest) > 1:
    raise app.UsageError(f"unexpected arguments: {rest[1:]}")
  return values
