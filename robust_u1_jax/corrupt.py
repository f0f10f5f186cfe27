r"""Corrupt one image from the command line, or list the available corruptions.

  python -m robust_u1_jax.corrupt --list
  python -m robust_u1_jax.corrupt --image in.png --type fog --severity 3 --out fog.png
  python -m robust_u1_jax.corrupt --image in.png --type robust_r1/lens_flare --intensity 0.45 \
      --seed 1 --out flare.png
  python -m robust_u1_jax.corrupt --image in.png --type robust_r1_pipeline --out degraded.png
  python -m robust_u1_jax.corrupt --image in.png --type fog --severity 3 --out corrupted/

The image is read by the training pipeline's decoder (16-bit grey scaled, transparency composited
on white, EXIF orientation applied; a note on stderr says when it changed something). An image
with a side below --min_side is refused, as training skips it. A folder --out (existing, or
ending in `/`) gets `<stem>_<corruption>[_s<severity> | _<intensity>][_seed<seed>].png` inside
it, e.g. `in_fog_s3.png` (the seed named where it is not 0), and a note where that replaces a
file. A missing folder of --out is created. A bad input (an unknown name, an out-of-range level,
an unreadable or too small image, an unwritable --out) is one `error:` line and exit status 2.
"""

from robust_u1_jax import cli  # first: its quiet environment is set before jax loads

import difflib
import os
import re
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from robust_u1_jax.data import corruptions
from robust_u1_jax.data import transforms
from robust_u1_jax.inference import images

# The model's resize rule (BAGEL's) sets the default smallest side, as data.min_image_side does.
DEFAULT_MIN_SIDE = transforms.default_min_side(images.ImageRules.vae_stride,
                                               images.ImageRules.vit_stride)

_LIST = flags.DEFINE_bool("list", False, "Print every corruption name and its family, one a line.")
_IMAGE = flags.DEFINE_string("image", None, "Input image (any format PIL reads).")
_TYPE = flags.DEFINE_string(
    "type", None, "Corruption: qualified (imagenet_c/fog, robust_r1/lens_flare), short (fog), or "
    f"{corruptions.PIPELINE}.")
_SEVERITY = flags.DEFINE_integer("severity", None, "ImageNet-C severity 1..5.")
_INTENSITY = flags.DEFINE_float("intensity", None, "Robust-R1 intensity in [0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the jax.random key.")
_OUT = flags.DEFINE_string("out", None, "Output image path (format from the extension; a missing "
                           "folder is created), or a folder (existing, or ending in /) to write "
                           "<stem>_<corruption>[_s<severity> | _<intensity>][_seed<seed>].png "
                           "into (a note says where it replaces a file).")
_MIN_SIDE = flags.DEFINE_integer(
    "min_side", None, f"Refuse images with a side below this many pixels (default "
    f"{DEFAULT_MIN_SIDE}, from BAGEL's resize rule, as data.min_image_side; Robust-R1 "
    "degradations need at least 32).")


def list_lines() -> list[str]:
  lines = [f"{name}\t{family}" for name, family in corruptions.list_corruptions()]
  return lines + [f"{corruptions.PIPELINE}\trobust_r1/pipeline"]


def smallest_side(qualified: str, min_side: int | None = None) -> int:
  """The smallest image side `corrupt` accepts for a resolved corruption name."""
  side = DEFAULT_MIN_SIDE if min_side is None else min_side
  if qualified == corruptions.PIPELINE or qualified.startswith("robust_r1/"):
    from robust_u1_jax.data.corruptions import robust_r1_common

    side = max(side, robust_r1_common.MIN_SIDE)  # the Robust-R1 degradations' own limit
  return side


def output_name(image_path: str, qualified: str, severity=None, intensity=None,
                seed: int = 0) -> str:
  """The file name of a corruption written into a folder --out: `in_fog_s3.png`, and
  `in_fog_s3_seed2.png` for another seed than 0 (another draw of the same corruption)."""
  stem = os.path.splitext(os.path.basename(image_path))[0]
  level = (f"_s{severity}" if severity is not None
           else f"_{intensity:g}" if intensity is not None else "")
  return f"{stem}_{qualified.split('/')[-1]}{level}{f'_seed{seed}' if seed else ''}.png"


DARK = "dark_illumination"


def run(image_path: str, name: str, out_path: str, *, severity=None, intensity=None,
        seed: int = 0, min_side: int | None = None, say=None) -> tuple[str, np.ndarray]:
  """Reads `image_path` (the pipeline's decoder), corrupts it, writes `out_path` (into it, by
  `output_name`, where it is a folder); returns the path written and the corrupted image.
  `say(line)` gets the notes (what the decoder changed, a file replaced); the pipeline's drawn
  degradations are printed on stdout. Raises cli.Error, PathError or BadImageError for a bad
  input, before any corruption runs. `name` in any case (--type FOG is fog)."""
  say = say or print
  try:
    qualified, _ = corruptions.resolve(name.lower(), severity=severity, intensity=intensity)
  except corruptions.LevelError as e:
    raise cli.Error(f"--{e.level} {e.value}: not a level of {e.name}; allowed {e.allowed}"
                    ) from None
  except ValueError as e:
    if not str(e).startswith("unknown corruption"):  # a level missing, or of the other kind
      flags_named = re.sub(r"\b(an|a) (severity|intensity)\b", r"--\2", str(e))
      raise cli.Error(re.sub(r"(?<!-)\b(severity|intensity)\b", r"--\1", flags_named)) from None
    names = [n for line in list_lines() for n in (line.split("\t")[0],
                                                  line.split("\t")[0].split("/")[-1])]
    near = difflib.get_close_matches(name.lower(), sorted(set(names)), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise cli.Error(f"--type {name}: unknown corruption; {hint}`--list` prints every name"
                    ) from None
  if cli.names_folder(out_path):
    out_path = os.path.join(out_path,
                            output_name(image_path, qualified, severity, intensity, seed))
    if os.path.exists(out_path):  # a name of ours, not the user's: `photo.jpg` after `photo.png`
      say(f"note: replacing {out_path}")
  cli.output_file(out_path, "--out", image=True, input_path=image_path)
  side, asked = smallest_side(qualified, min_side), smallest_side("", min_side)
  # `corrupt` resizes nothing: its limits are training's, and the degradations' own.
  setting, why = (("--min_side", "training skips such an image") if side == asked else
                  (f"the Robust-R1 degradations' own, above --min_side {asked}",
                   "their kernels and warps are sized for no less"))
  notes: list[str] = []
  image = transforms.read_image(image_path, min_side=side, notes=notes, setting=setting, why=why)
  for note in notes:
    say(f"note: {image_path}: {note}")
  key = jax.random.key(seed)
  if qualified == corruptions.PIPELINE:  # with what the key drew, as the data preview labels it
    from robust_u1_jax.data.corruptions import robust_r1

    out, plan = robust_r1.apply_pipeline(image, key, intensity, return_plan=True)
    print("drew " + ", ".join(f"{stage} {step} {level:.2f}" for stage, step, level in plan))
    dark = [level for _, step, level in plan if step == DARK]
  else:
    out = corruptions.corrupt(image, qualified, key, severity=severity, intensity=intensity)
    dark = [intensity] if qualified.endswith("/" + DARK) else []
  if any(level >= 1 for level in dark):  # the result looks like a failed write
    say(f"note: {DARK} at intensity 1 multiplies the image by 1 - I^2 = 0, the release's "
        "formula: it is black but for what later degradations draw (the evaluation's 100 % is "
        "intensity 0.9)")
  out = np.asarray(out)
  Image.fromarray(out).save(out_path, format=cli.image_format(out_path))
  return out_path, out


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _LIST.value:
    print("\n".join(list_lines()))
    return 0
  missing = [f"--{f.name}" for f in (_IMAGE, _TYPE, _OUT) if f.value is None]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)} (or use --list)")
  if _MIN_SIDE.value is not None and _MIN_SIDE.value < 1:
    raise app.UsageError(f"--min_side must be >= 1, got {_MIN_SIDE.value}")
  path, out = run(_IMAGE.value, _TYPE.value, _OUT.value, severity=_SEVERITY.value,
                  intensity=_INTENSITY.value, seed=_SEED.value, min_side=_MIN_SIDE.value,
                  say=lambda line: print(line, file=sys.stderr))
  print(f"wrote {path} ({out.shape[1]}x{out.shape[0]})")
  return 0


if __name__ == "__main__":
  cli.run(main)
