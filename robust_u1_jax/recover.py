r"""Recovers corrupted images with a trained recovery model.

Your own images, with a BAGEL / Robust-U1 model directory, an Orbax model checkpoint (`convert`)
or a stage's workdir:

  python -m robust_u1_jax.recover --model /tmp/robust_u1/sft --image photo.png
  python -m robust_u1_jax.recover --model /disks/Robust-U1 --image photos/ --out restored/ \
      --dtype bfloat16 --mesh fsdp=-1 --sde

A file is recovered to --out (default: `<stem>_recovered.png` beside it; a folder, existing or
ending in `/`, gets that name inside it). A folder's image files (named .png, .jpg, ...: not its
subfolders nor other files, which the summary lists) are recovered into
the folder --out (default: `<folder>_recovered`) as `<stem>.png`, grouped by VAE size into batches
of --batch; images already there are skipped, so a re-run resumes. Images come out at their VAE size
(BAGEL's resize rule of the model). Image i of a folder's sorted listing draws its noise (that of
--sde's step included) from fold_in(PRNGKey(--seed), i), so batching and resuming do not change it.
An unreadable image or an unusable model directory is one `error:` line: exit status 2 (a folder
goes on with its other images, lists the failures and exits with 1; a folder without image files is
refused). An image with a side below the smallest the model's resize rule accepts (one VAE stride or
ViT patch, 16 pixels for BAGEL) is refused, as training skips it. --out is checked before the model
loads (a missing folder is created).

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

import collections
import os
import sys
import time
from collections.abc import Callable, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from robust_u1_jax import config_inputs, config_lib, model_cli, signals

EXIT_SOME_FAILED = 1  # folder mode: some images could not be recovered
# Flags of one mode only: refused in the other, so a mistyped command does not silently do less.
CACHE_ONLY = ("cache_dir",)
USER_ONLY = ("model", "image", "out", "prompt", "batch", "seed", "sde", "cfg_text", "cfg_img",
             "shift", "dtype", "mesh", "tokenizer")


# -- flags ----------------------------------------------------------------------------------------
# Defined when run as a program (or by `run`), so importing this module (tests) never collides
# with another entry module's --config / --image / --out.


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
  model_cli.define_model_flags(values)
  flags.DEFINE_string("image", None, "A corrupted image, or a folder of them.", flag_values=values)
  flags.DEFINE_string(
      "out", None, "Output image (a file in) or folder (a folder in); default: "
      "<stem>_recovered.png beside the image, or <folder>_recovered.", flag_values=values)
  model_cli.define_sampler_flags(values)
  flags.DEFINE_string("prompt", None, "Instruction (default: the one the model was trained with, "
                      "its instruction.json; else the paper's).", flag_values=values)
  flags.DEFINE_integer("seed", 0, "Seed of the noise.", flag_values=values)
  flags.DEFINE_integer("batch", 8, "Images of one size recovered together (folder mode).",
                       flag_values=values)
  # The shared flags are defined in `model_cli`; without this --help would list them only in full.
  flags.adopt_module_key_flags(model_cli, flag_values=values)


# -- user mode: files and folders -----------------------------------------------------------------


def _recover_file(values: flags.FlagValues, sampler, instruction: str | None) -> int:
  path = values.image
  name = f"{os.path.splitext(os.path.basename(path))[0]}_recovered.png"
  out = values.out or os.path.join(os.path.dirname(path), name)
  if cli.names_folder(out):
    out = os.path.join(out, name)
  # A bad image, --model or --out fails before the model loads.
  image = model_cli.read_image(path, model_cli.model_rules(values.model).min_side)
  # Created once there is a recovery.
  cli.output_file(out, "--out", image=True, create=False, input_path=path)
  from robust_u1_jax.inference import engine as engine_lib

  engine = model_cli.load_engine(values, "recovering")
  recovered, _ = engine.recover([image], sampler=sampler,
                                keys=engine_lib.image_keys(values.seed, [0]),
                                instruction=instruction,
                                progress="recovering" if values.progress else None)
  cli.output_dir(os.path.dirname(os.path.abspath(out)), "--out")
  try:
    model_cli.write_image(out, recovered[0])
  except OSError as e:
    raise model_cli.InputError(f"{out}: {e.strerror or e}") from None
  h, w = recovered.shape[1:3]
  print(f"wrote {out} ({w}x{h})", flush=True)
  return 0


def output_names(names: Sequence[str]) -> dict[str, str]:
  """Input file name -> output file name: `<stem>.png`, or `<name>.png` where that could be
  another input's output: a stem shared (a.jpg, a.png), or another input's `<name>.png` (a.jpg
  beside a.jpg.png). Names are distinct, so the `<name>.png`s are; the `<stem>.png`s kept are
  of distinct stems and none is a `<name>.png`."""
  stems = collections.Counter(os.path.splitext(n)[0] for n in names)
  longs = {f"{n}.png" for n in names}
  out = {}
  for name in names:
    short = f"{os.path.splitext(name)[0]}.png"
    # Its own `<name>.png` is short only for a name without an extension, which keeps it.
    taken = stems[os.path.splitext(name)[0]] > 1 or (short in longs and short != f"{name}.png")
    out[name] = f"{name}.png" if taken else short
  return out


def _recover_folder(values: flags.FlagValues, sampler, instruction: str | None) -> int:
  import tqdm

  from robust_u1_jax import progress

  folder = values.image.rstrip(os.sep) or values.image
  out_dir = values.out or f"{os.path.abspath(folder)}_recovered"
  if os.path.abspath(out_dir) == os.path.abspath(folder):
    raise model_cli.InputError(f"--out {out_dir}: the input folder itself; give another folder")
  from robust_u1_jax.data import image_files

  cli.output_dir(out_dir, "--out", create=False,
                 of=f"the recoveries of the folder --image {values.image}")
  t0 = time.perf_counter()

  # Hidden files are left out: an interrupted write's temporary file is one of them. So are files
  # not named as images (notes, captions), as an image folder for training leaves them out.
  entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")),
                   key=lambda e: e.name)
  files = [e.name for e in entries if e.is_file()]
  names = [n for n in files if image_files.is_image_name(n)]
  others = [n for n in files if not image_files.is_image_name(n)]
  subfolders = [e.name + os.sep for e in entries if e.is_dir()]
  if not names:
    raise model_cli.InputError(
        f"--image {values.image}: a folder without image files to recover (looked for "
        f"{image_files.looked_for()}; its subfolders "
        "and hidden files are not read)")
  outputs = output_names(names)
  rules = model_cli.model_rules(values.model)
  cli.output_dir(out_dir, "--out")
  skipped = {n for n in names if os.path.exists(os.path.join(out_dir, outputs[n]))}
  failed: dict[str, str] = {}

  def fail(name: str, message: str) -> None:
    failed[name] = message
    tqdm.tqdm.write(f"error: {message}", file=sys.stderr)

  # Pass 1 decodes every pending image once to learn its VAE size (and find the bad ones before
  # the model loads); pass 2 decodes a batch at a time, so a large folder never sits in memory.
  groups: dict[tuple[int, int], list[int]] = {}
  pending = [i for i, n in enumerate(names) if n not in skipped]
  for i in progress.bar(pending, desc="reading", unit="image", disable=not values.progress,
                     dynamic_ncols=True):
    try:
      image = model_cli.read_image(os.path.join(folder, names[i]), rules.min_side)
    except model_cli.InputError as e:
      fail(names[i], str(e))
      continue
    groups.setdefault(rules.vae_size(*image.shape[:2]), []).append(i)

  try:
    with signals.sigterm_stops():  # SIGTERM, too, says what it keeps
      written = _recover_groups(values, sampler, instruction, folder, names, groups, rules,
                                lambda i: os.path.join(out_dir, outputs[names[i]]), fail)
  except KeyboardInterrupt:
    done = sum(os.path.exists(os.path.join(out_dir, outputs[names[i]]))
               for members in groups.values() for i in members)
    kept = (f"stopped after {done} written; they are kept, and the same command goes on with "
            "the rest" if done else
            "stopped before the first recovery was written; the same command starts again")
    print(f"{out_dir}: {kept}", flush=True)
    raise
  summary = (f"{out_dir}: {written} written, {len(skipped)} skipped (already there), "
             f"{len(failed)} failed")
  if failed:
    summary += f" ({', '.join(failed)})"
  if others:
    listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
    summary += f", {len(others)} left out (not named as images: {listed})"
  if subfolders:  # training reads an image folder recursively; this does not
    listed = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
    summary += f", {len(subfolders)} subfolder(s) not read ({listed}: give each as --image)"
  print(f"{summary} in {time.perf_counter() - t0:.1f} s", flush=True)
  return EXIT_SOME_FAILED if failed else 0


def _recover_groups(values: flags.FlagValues, sampler, instruction: str | None, folder: str,
                    names: Sequence[str], groups: dict[tuple[int, int], list[int]], rules,
                    out_path: Callable[[int], str], fail: Callable[[str, str], None]) -> int:
  """Recovers the images `groups` lists (by VAE size, indices into `names`) a batch at a time,
  writing image i to out_path(i); returns how many were written."""
  from robust_u1_jax import progress
  from robust_u1_jax.inference import engine as engine_lib

  if not groups:
    return 0
  written = 0
  total = sum(map(len, groups.values()))
  engine = model_cli.load_engine(values, f"recovering {total} image{'' if total == 1 else 's'}")
  bar = progress.bar(total=total, desc="recovering", unit="image", disable=not values.progress,
                  dynamic_ncols=True)
  for size, members in groups.items():
    for start in range(0, len(members), values.batch):
      chunk = members[start:start + values.batch]
      batch, images = [], []
      for i in chunk:
        path = os.path.join(folder, names[i])
        try:
          image = model_cli.read_image(path, rules.min_side)
        except model_cli.InputError as e:  # changed since pass 1
          fail(names[i], str(e))
          continue
        if rules.vae_size(*image.shape[:2]) != size:
          fail(names[i], f"{path}: changed while being recovered")
          continue
        batch.append(i)
        images.append(image)  # the engine brings it to its VAE size
      if batch:
        recovered, _ = engine.recover(images, sampler=sampler,
                                      keys=engine_lib.image_keys(values.seed, batch),
                                      instruction=instruction)
        for i, image in zip(batch, recovered):
          try:
            model_cli.write_image(out_path(i), image)
            written += 1
          except OSError as e:
            fail(names[i], f"{out_path(i)}: {e.strerror or e}")
      bar.update(len(chunk))
  bar.close()
  return written


def _recover_images(values: flags.FlagValues) -> int:
  missing = [f"--{n}" for n in ("model", "image") if not values[n].value]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}")
  if values.batch < 1:
    raise app.UsageError(f"--batch must be >= 1, got {values.batch}")
  # A bad input (model_cli.InputError, cli.PathError of --out) is reported by cli.run / cli.call.
  sampler = model_cli.make_sampler(values, 50 if values.steps is None else values.steps)
  # None: the model's own (its instruction.json, else the paper's).
  if os.path.isdir(values.image):
    return _recover_folder(values, sampler, values.prompt)
  return _recover_file(values, sampler, values.prompt)


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
  config_inputs.check_inputs(config, recovery_cache=False)
  cli.output_dir(directory, "--cache_dir" if values.cache_dir else "reason.recovery_cache")
  try:
    with signals.sigterm_stops():
      counts = recovery_cache.build(config, directory, steps=values.steps or 0,
                                    progress=values.progress)
  except KeyboardInterrupt:
    print(f"{directory}: stopped; the recoveries written are kept, and the same command resumes "
          "after them", flush=True)
    raise
  if counts["bad"]:
    print(counts["bad"], flush=True)
  repeated = (f", {counts['repeated']} read again (a bad record's replacement, another epoch)"
              if counts["repeated"] else "")
  print(f"{directory}: {counts['written']} recoveries written, {counts['skipped']} already there"
        f"{repeated}", flush=True)
  return 0


def _run(values: flags.FlagValues) -> int:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  cache_mode = values["config"].value is not None
  if cache_mode == bool(values["model"].value):
    raise app.UsageError(f"give {'one of --model and --config, not both' if cache_mode else 'one'}"
                         ": --model recovers images, --config precomputes the reasoning stage's "
                         "recovery cache")
  stray = [f"--{n}" for n in (USER_ONLY if cache_mode else CACHE_ONLY) if values[n].present]
  if stray:
    raise app.UsageError(f"{', '.join(stray)}: only used with "
                         f"{'--model' if cache_mode else '--config'}")
  return _build_cache(values) if cache_mode else _recover_images(values)


def run(argv: Sequence[str]) -> int:
  """The command line `argv` as the program runs it (`cli.call`: a bad input is one line and exit
  status 2), on flags of its own (`own_flags`)."""
  return cli.call(lambda argv: _run(model_cli.own_flags(
      argv, lambda values: define_flags(values, sys_argv=argv))), argv)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return _run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
