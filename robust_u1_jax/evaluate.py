"""Evaluates a trained model: recovery quality and answer accuracy under corruption, and a report.

  python -m robust_u1_jax.evaluate --config configs/eval.py:tiny --model /tmp/robust_u1/reason \
      --config.clip_checkpoint=/tmp/demo/clip/model/clip.safetensors

writes report.md, report.json and PNG figures into --out (default: <model's parent>/eval). A
model directory or benchmark file that cannot be used is one `error:` line and exit status 2.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval.py:tiny",
                                          "Evaluation config: path.py:variant.", lock_config=True)
_MODEL = flags.DEFINE_string("model", None, "The model: a model directory, an Orbax checkpoint or "
                             "a stage's workdir (overrides config.model).")
_OUT = flags.DEFINE_string("out", None, "Report directory (overrides config.out).")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from robust_u1_jax.eval import run  # after flags: keeps --help fast

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)

  config = _CONFIG.value
  with config.unlocked():
    config.model = _MODEL.value or config.model
    config.out = _OUT.value or config.out
  if not config.model:
    raise app.UsageError("give --model (a model directory, Orbax checkpoint or stage workdir)")
  try:
    run.run(config)
  except (OSError, ValueError) as e:  # missing files, unusable models and tables: named inside
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  from robust_u1_jax import recover  # its help handling: --help exits with status 0

  recover.run_program(main)
