"""Recovers corrupted images with a trained recovery model.

Precompute the reasoning stage's recoveries (reason.recovered_images=cache): every record the run
will read in its steps, recovered by the model in `init_from`, as PNGs in a cache directory:

  python -m robust_u1_jax.recover --config configs/reason.py:tiny \
      --config.init_from=/tmp/rl --cache_dir /tmp/recovered
  python -m robust_u1_jax.train --config configs/reason.py:tiny --workdir /tmp/reason \
      --config.init_from=/tmp/rl --config.reason.recovered_images=cache \
      --config.reason.recovery_cache=/tmp/recovered

Re-running resumes: images already in the cache are skipped.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from robust_u1_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Reasoning stage config: path.py:variant.",
                                          lock_config=True)
_CACHE_DIR = flags.DEFINE_string("cache_dir", None,
                                 "Cache directory (default: the config's reason.recovery_cache).")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps to cover (0: the config's total_steps).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  from robust_u1_jax.training import recovery_cache  # after flags: keeps --help fast

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config = config_lib.validate(_CONFIG.value)
  if "reason" not in config:
    raise app.UsageError(f"--config is a {config.stage!r} config; recoveries are precomputed for "
                         "the reasoning stage (configs/reason.py)")
  directory = _CACHE_DIR.value or config.reason.recovery_cache
  if not directory:
    raise app.UsageError("give --cache_dir or --config.reason.recovery_cache")
  counts = recovery_cache.build(config, directory, steps=_STEPS.value)
  print(f"{directory}: {counts['written']} recoveries written, {counts['skipped']} already there",
        flush=True)


if __name__ == "__main__":
  app.run(main)
