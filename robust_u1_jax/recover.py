r"""Recovers corrupted images with a trained recovery model.

Your own images, with a BAGEL / Robust-U1 model directory, an Orbax model checkpoint (`convert`)
or a stage's workdir:

  python -m robust_u1_jax.recover --model /tmp/robust_u1/sft --image photo.png
  python -m robust_u1_jax.recover --model /disks/Robust-U1 --image photos/ --out restored/ \
      --dtype bfloat16 --mesh fsdp=-1 --sde

A file is recovered to --out (default: `<stem>_recovered.png` beside it). A folder's files (not
its subfolders) are recovered into the folder --out (default: `<folder>_recovered`) as
`<stem>.png`, grouped by VAE size into batches of --batch; images already there are skipped, so a
re-run resumes. Images come out at their VAE size (BAGEL's resize rule of the model). Image i of a
folder's sorted listing draws its noise (that of --sde's step included) from
fold_in(PRNGKey(--seed), i), so batching and resuming do not change it. An unreadable image or an
unusable model directory is one `error:` line: exit status 2 (a folder goes on with its other
images, lists the failures and exits with 1). An image with a side below the smallest the model's
resize rule accepts (one VAE stride or ViT patch, 16 pixels for BAGEL) is refused, as training
skips it. --out is checked before the model loads (a missing folder is created).

Precompute the reasoning stage's recoveries (reason.recovered_images=cache): every record the run
will read in its steps, recovered by the model in `init_from`, as PNGs in a cache directory:

  python -m robust_u1_jax.recover --config configs/reason.py:tiny \
      --config.init_from=/tmp/rl --cache_dir /tmp/recovered
  python -m robust_u1_jax.train --config configs/reason.py:tiny --workdir /tmp/reason \
      --config.init_from=/tmp/rl --config.reason.recovered_images=cache \
      --config.reason.recovery_cache=/tmp/recovered

Re-running resumes: images already in the cache are skipped. The config's files and the cache
folder (created if missing; a file or a read-only folder is refused) are checked before any model
is built.
"""

from __future__ import annotations

from robust_u1_jax import cli  # first: its quiet environment is set before jax loads

import math
import os
import sys
import time
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

from robust_u1_jax import config_lib

EXIT_BAD_INPUT = 2  # an unreadable image or an unusable model directory
EXIT_SOME_FAILED = 1  # folder mode: some images could not be recovered
DTYPES = ("float32", "bfloat16")
# Flags of one mode only: refused in the other, so a mistyped command does not silently do less.
CACHE_ONLY = ("cache_dir",)
USER_ONLY = ("model", "image", "out", "prompt", "batch", "seed", "sde", "cfg_text", "cfg_img",
             "shift", "dtype", "mesh", "tokenizer")


class InputError(cli.Error):
  """An input the command cannot use; the message starts with the path (or flag) at fault."""


# -- flags ----------------------------------------------------------------------------------------
# Defined when run as a program (or by `run`), so importing this module (tests, `answer`) never
# collides with another entry module's --config / --image / --out.


def define_model_flags(values: flags.FlagValues) -> None:
  """The flags that load a model: shared with `answer`."""
  flags.DEFINE_string(
      "model", None, "BAGEL / Robust-U1 model directory (ema.safetensors or model.safetensors, "
      "ae.safetensors, llm_config.json, vit_config.json, tokenizer files), an Orbax model "
      "checkpoint (`convert`), or a stage's workdir (its model/).", flag_values=values)
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
  """The recovery sampler's settings beyond its step count: shared with `answer`."""
  flags.DEFINE_float("cfg_text", 4.0, "Text guidance scale (BAGEL's cfg_text_scale).",
                     flag_values=values)
  flags.DEFINE_float("cfg_img", 2.0, "Image guidance scale (BAGEL's cfg_img_scale).",
                     flag_values=values)
  flags.DEFINE_float("shift", 3.0, "Timestep shift of the schedule.", flag_values=values)
  flags.DEFINE_bool("sde", False, "The released Robust-U1 sampler: one stochastic step (index 3, "
                    "noise level 0.7) among the Euler steps; needs --steps >= 5.",
                    flag_values=values)


def define_flags(values: flags.FlagValues = flags.FLAGS,
                 sys_argv: Sequence[str] | None = None) -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Cache mode: reasoning stage config, path.py:variant.", flag_values=values,
      lock_config=True, sys_argv=None if sys_argv is None else list(sys_argv))
  flags.DEFINE_string("cache_dir", None,
                      "Cache mode: cache directory (default: the config's reason.recovery_cache).",
                      flag_values=values)
  flags.DEFINE_integer(
      "steps", None, "With --model: sampling steps of each recovery (default 50). Cache mode: "
      "training steps to cover (default 0: the config's total_steps).", flag_values=values)
  define_model_flags(values)
  flags.DEFINE_string("image", None, "A corrupted image, or a folder of them.", flag_values=values)
  flags.DEFINE_string(
      "out", None, "Output image (a file in) or folder (a folder in); default: "
      "<stem>_recovered.png beside the image, or <folder>_recovered.", flag_values=values)
  define_sampler_flags(values)
  flags.DEFINE_string("prompt", None, "Instruction (default: the one the SFT stage trains with, "
                      "inference/recovery.py INSTRUCTION).", flag_values=values)
  flags.DEFINE_integer("seed", 0, "Seed of the noise.", flag_values=values)
  flags.DEFINE_integer("batch", 8, "Images of one size recovered together (folder mode).",
                       flag_values=values)


# -- helpers shared with `answer` -----------------------------------------------------------------


def read_image(path: str, min_side: int = 0) -> np.ndarray:
  """uint8 RGB pixels of an image file, through the one decoder training uses; InputError for a
  file that is missing, no image, or has a side below `min_side`."""
  from robust_u1_jax.data import transforms

  try:
    return transforms.read_image(path, min_side=min_side)
  except transforms.BadImageError as e:
    raise InputError(str(e)) from None


def model_rules(model: str):
  """The resize rules of the model `model` (a directory or a stage's workdir), read without
  loading it; InputError for a path that is no model directory."""
  from robust_u1_jax.inference import engine as engine_lib
  from robust_u1_jax.inference import images as images_lib

  try:
    return images_lib.ImageRules.for_model_dir(engine_lib.resolve_model_dir(model))
  except (OSError, ValueError) as e:
    text = str(e)
    raise InputError(f"--model {text}" if text.startswith(model) else text) from None


def min_side(rules) -> int:
  """The smallest image side a model takes (data.min_image_side's default)."""
  from robust_u1_jax.data import transforms

  return transforms.default_min_side(rules.vae_stride, rules.vit_stride)


def write_image(path: str, image: np.ndarray) -> None:
  """Writes atomically (a temporary file, then a rename): an interrupted run leaves no half image
  that a resumed run would take for done. The format follows the extension."""
  from PIL import Image

  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.tmp{os.getpid()}")
  try:
    Image.fromarray(image).save(tmp, format=image_format(path))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def make_dirs(path: str, flag: str = "--out") -> None:
  """Creates the folder `path` if missing and checks it can be written (cli.PathError)."""
  cli.output_dir(path, flag)


def image_format(path: str) -> str:
  return cli.image_format(path)


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


def make_sampler(values: flags.FlagValues, steps: int):
  from robust_u1_jax.inference import recovery

  try:
    return recovery.Sampler(
        num_steps=steps, shift=values.shift,
        guidance=recovery.Guidance(text_scale=values.cfg_text, image_scale=values.cfg_img),
        sde_step=recovery.RELEASED_SDE_STEP if values.sde else -1)
  except ValueError as e:
    raise InputError(f"sampler: {e}") from None


def load_engine(values: flags.FlagValues):
  """The model of --model; InputError naming the file for a directory that cannot be used."""
  from robust_u1_jax.inference import engine

  mesh = make_mesh(values.mesh)
  try:
    return engine.Engine.load(values.model, dtype=values.dtype, mesh=mesh,
                              tokenizer_dir=values.tokenizer, progress=values.progress)
  except (OSError, ValueError) as e:  # ModelError and CheckpointError are ValueErrors
    raise InputError(str(e)) from None


def image_keys(seed: int, indices: Sequence[int]):
  """(B, 2) keys, image i's from (seed, i): its noise does not depend on its batch."""
  import jax
  import jax.numpy as jnp

  base = jax.random.PRNGKey(seed)
  return jnp.stack([jax.random.fold_in(base, i) for i in indices])


def error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)


# -- user mode: files and folders -----------------------------------------------------------------


def _recover_file(values: flags.FlagValues, sampler, instruction: str) -> int:
  path = values.image
  name = f"{os.path.splitext(os.path.basename(path))[0]}_recovered.png"
  out = values.out or os.path.join(os.path.dirname(path), name)
  if os.path.isdir(out):
    out = os.path.join(out, name)
  # A bad image, --model or --out fails before the model loads.
  image = read_image(path, min_side(model_rules(values.model)))
  cli.output_file(out, "--out", image=True, create=False)  # created once there is a recovery
  engine = load_engine(values)
  vae_image = engine.rules.prepare(image)[0]
  recovered, _ = engine.recover([vae_image], sampler=sampler, keys=image_keys(values.seed, [0]),
                                instruction=instruction)
  make_dirs(os.path.dirname(os.path.abspath(out)))
  try:
    write_image(out, recovered[0])
  except OSError as e:
    raise InputError(f"{out}: {e.strerror or e}") from None
  h, w = recovered.shape[1:3]
  print(f"wrote {out} ({w}x{h})", flush=True)
  return 0


def output_names(names: Sequence[str]) -> dict[str, str]:
  """Input file name -> output file name: `<stem>.png`, or `<name>.png` where stems collide."""
  stems: dict[str, int] = {}
  for name in names:
    stem = os.path.splitext(name)[0]
    stems[stem] = stems.get(stem, 0) + 1
  return {n: f"{os.path.splitext(n)[0] if stems[os.path.splitext(n)[0]] == 1 else n}.png"
          for n in names}


def _recover_folder(values: flags.FlagValues, sampler, instruction: str) -> int:
  import tqdm

  folder = values.image.rstrip(os.sep) or values.image
  out_dir = values.out or f"{os.path.abspath(folder)}_recovered"
  if os.path.abspath(out_dir) == os.path.abspath(folder):
    raise InputError(f"--out {out_dir}: the input folder itself; give another folder")
  t0 = time.perf_counter()
  # Hidden files are left out: an interrupted write's temporary file is one of them.
  names = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
  outputs = output_names(names)
  rules = model_rules(values.model)
  make_dirs(out_dir)
  skipped = [n for n in names if os.path.exists(os.path.join(out_dir, outputs[n]))]
  failed: dict[str, str] = {}

  def fail(name: str, message: str) -> None:
    failed[name] = message
    tqdm.tqdm.write(f"error: {message}", file=sys.stderr)

  # Pass 1 decodes every pending image once to learn its VAE size (and find the bad ones before
  # the model loads); pass 2 decodes a batch at a time, so a large folder never sits in memory.
  groups: dict[tuple[int, int], list[int]] = {}
  pending = [i for i, n in enumerate(names) if n not in skipped]
  for i in tqdm.tqdm(pending, desc="reading", unit="image", disable=not values.progress,
                     dynamic_ncols=True):
    try:
      image = read_image(os.path.join(folder, names[i]), min_side(rules))
    except InputError as e:
      fail(names[i], str(e))
      continue
    groups.setdefault(rules.vae_size(*image.shape[:2]), []).append(i)

  written = 0
  if groups:
    engine = load_engine(values)
    bar = tqdm.tqdm(total=sum(map(len, groups.values())), desc="recovering", unit="image",
                    disable=not values.progress, dynamic_ncols=True)
    for size, members in groups.items():
      for start in range(0, len(members), values.batch):
        chunk = members[start:start + values.batch]
        batch, images = [], []
        for i in chunk:
          path = os.path.join(folder, names[i])
          try:
            vae_image = engine.rules.prepare(read_image(path, min_side(rules)))[0]
          except InputError as e:  # changed since pass 1
            fail(names[i], str(e))
            continue
          if vae_image.shape[:2] != size:
            fail(names[i], f"{path}: changed while being recovered")
            continue
          batch.append(i)
          images.append(vae_image)
        if batch:
          recovered, _ = engine.recover(images, sampler=sampler,
                                        keys=image_keys(values.seed, batch),
                                        instruction=instruction)
          for i, image in zip(batch, recovered):
            out = os.path.join(out_dir, outputs[names[i]])
            try:
              write_image(out, image)
              written += 1
            except OSError as e:
              fail(names[i], f"{out}: {e.strerror or e}")
        bar.update(len(chunk))
    bar.close()
  summary = (f"{out_dir}: {written} written, {len(skipped)} skipped (already there), "
             f"{len(failed)} failed")
  if failed:
    summary += f" ({', '.join(failed)})"
  print(f"{summary} in {time.perf_counter() - t0:.1f} s", flush=True)
  return EXIT_SOME_FAILED if failed else 0


def _recover_images(values: flags.FlagValues) -> int:
  from robust_u1_jax.inference import recovery

  missing = [f"--{n}" for n in ("model", "image") if not values[n].value]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}")
  if values.batch < 1:
    raise app.UsageError(f"--batch must be >= 1, got {values.batch}")
  try:
    sampler = make_sampler(values, 50 if values.steps is None else values.steps)
    instruction = recovery.INSTRUCTION if values.prompt is None else values.prompt
    if os.path.isdir(values.image):
      return _recover_folder(values, sampler, instruction)
    return _recover_file(values, sampler, instruction)
  except cli.Error as e:  # InputError, and cli.PathError of --out
    error(str(e))
    return EXIT_BAD_INPUT


# -- cache mode: the reasoning stage's recoveries -------------------------------------------------


def _build_cache(values: flags.FlagValues) -> int:
  from robust_u1_jax.training import recovery_cache

  config = config_lib.validate(values.config)
  if "reason" not in config:
    raise app.UsageError(f"--config is a {config.stage!r} config; recoveries are precomputed for "
                         "the reasoning stage (configs/reason.py)")
  directory = values.cache_dir or config.reason.recovery_cache
  if not directory:
    raise app.UsageError("give --cache_dir or --config.reason.recovery_cache")
  # Checked before any model is built. The cache is what this writes, so the stage's own check
  # of reason.recovery_cache (an existing folder) does not apply here.
  config_lib.check_inputs(config, recovery_cache=False)
  make_dirs(directory, "--cache_dir" if values.cache_dir else "reason.recovery_cache")
  counts = recovery_cache.build(config, directory, steps=values.steps or 0,
                                progress=values.progress)
  print(f"{directory}: {counts['written']} recoveries written, {counts['skipped']} already there",
        flush=True)
  return 0


def _run(values: flags.FlagValues) -> int:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  cache_mode = values["config"].value is not None
  if cache_mode == bool(values["model"].value):
    raise app.UsageError("give --model (recover images) or --config (the reasoning stage's "
                         "recovery cache)")
  stray = [f"--{n}" for n in (USER_ONLY if cache_mode else CACHE_ONLY) if values[n].present]
  if stray:
    raise app.UsageError(f"{', '.join(stray)}: only used with "
                         f"{'--model' if cache_mode else '--config'}")
  return _build_cache(values) if cache_mode else _recover_images(values)


def own_flags(argv: Sequence[str], define) -> flags.FlagValues:
  """`argv` (program name first) parsed into a flag set of its own, defined by `define(values)`:
  for callers in one process (tests), where the global flags may hold another entry point's."""
  values = flags.FlagValues()
  define(values)
  rest = values(list(argv))
  if len(rest) > 1:
    raise app.UsageError(f"unexpected arguments: {rest[1:]}")
  return values


def run(argv: Sequence[str]) -> int:
  """The command line `argv`, on flags of its own (`own_flags`)."""
  return _run(own_flags(argv, lambda values: define_flags(values, sys_argv=argv)))


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return _run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
