"""Trains one stage of Robust-U1.

  python -m robust_u1_jax.train --config configs/sft.py:tiny --workdir /tmp/sft
  python -m robust_u1_jax.train --config configs/rl.py:tiny --workdir /tmp/rl \
      --config.init_from=/tmp/sft
  python -m robust_u1_jax.train --config configs/demo.py --workdir runs/demo  # every stage

Re-running with the same workdir resumes from its newest checkpoint (the demo: skips finished
parts and resumes the interrupted one).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from robust_u1_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config: path.py:variant.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the model go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from robust_u1_jax.training import demo, stages, trainer  # after flags: keeps --help fast

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  config = config_lib.validate(_CONFIG.value)
  if config.stage == "demo":
    demo.run(config, _WORKDIR.value)
  else:
    trainer.train(config, _WORKDIR.value, stages.builder(config.stage))


if __name__ == "__main__":
  app.run(main)
