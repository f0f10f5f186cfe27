"""Corrupt one image from the command line, or list the available corruptions.

  python -m robust_u1_jax.corrupt --list
  python -m robust_u1_jax.corrupt --image in.png --type fog --severity 3 --out fog.png
  python -m robust_u1_jax.corrupt --image in.png --type robust_r1/lens_flare --intensity 0.45 \
      --seed 1 --out flare.png
  python -m robust_u1_jax.corrupt --image in.png --type robust_r1_pipeline --out degraded.png

An unknown name or an out-of-range level exits with status 1 and prints the valid values.
"""

import sys

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from robust_u1_jax.data import corruptions

_LIST = flags.DEFINE_bool("list", False, "Print every corruption name and its family, one a line.")
_IMAGE = flags.DEFINE_string("image", None, "Input image (any format PIL reads).")
_TYPE = flags.DEFINE_string(
    "type", None, "Corruption: qualified (imagenet_c/fog, robust_r1/lens_flare), short (fog), or "
    f"{corruptions.PIPELINE}.")
_SEVERITY = flags.DEFINE_integer("severity", None, "ImageNet-C severity 1..5.")
_INTENSITY = flags.DEFINE_float("intensity", None, "Robust-R1 intensity in [0, 1].")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the jax.random key.")
_OUT = flags.DEFINE_string("out", None, "Output image path (format from the extension).")


def list_lines() -> list[str]:
  lines = [f"{name}\t{family}" for name, family in corruptions.list_corruptions()]
  return lines + [f"{corruptions.PIPELINE}\trobust_r1/pipeline"]


def run(image_path: str, name: str, out_path: str, *, severity=None, intensity=None,
        seed: int = 0) -> None:
  """Reads `image_path` as RGB, corrupts it, writes `out_path`."""
  with Image.open(image_path) as im:
    image = np.asarray(im.convert("RGB"))
  out = corruptions.corrupt(image, name, jax.random.key(seed), severity=severity,
                            intensity=intensity)
  Image.fromarray(np.asarray(out)).save(out_path)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _LIST.value:
    print("\n".join(list_lines()))
    return 0
  missing = [f"--{f.name}" for f in (_IMAGE, _TYPE, _OUT) if f.value is None]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)} (or use --list)")
  try:
    run(_IMAGE.value, _TYPE.value, _OUT.value, severity=_SEVERITY.value,
        intensity=_INTENSITY.value, seed=_SEED.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {_OUT.value}")
  return 0


if __name__ == "__main__":
  app.run(main)
