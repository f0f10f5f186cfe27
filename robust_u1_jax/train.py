r"""Trains one stage of Robust-U1.

  python -m robust_u1_jax.train --config configs/sft.py:tiny --workdir /tmp/sft
  python -m robust_u1_jax.train --config configs/rl.py:tiny --workdir /tmp/rl \
      --config.init_from=/tmp/sft
  python -m robust_u1_jax.train --config configs/demo.py --workdir runs/demo  # every stage

Re-running with the same workdir resumes from its newest checkpoint, naming any setting that
differs from the checkpoint's (the demo: skips finished parts and resumes the interrupted one, and
refuses a workdir whose parts were trained with other settings); a finished workdir says so at
once. Ctrl-C or SIGTERM saves a checkpoint after the current step, and the command exits 130 or
143, as a shell reports the signal, so a chain or a scheduler does not take the run as finished.
The config, the files it names (init_from, the data, the recovery cache, the CLIP checkpoint) and
the workdir are checked before any model is built: a bad one is one `error:` line and exit
status 2. `--check_config` checks the config's fields and values alone and exits (a
launcher's check on a machine that lacks the run's paths).
"""

from robust_u1_jax import cli  # first: its quiet environment is set before jax loads

import os

from absl import app, flags
from ml_collections import config_flags

from robust_u1_jax import config_inputs, config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config: path.py:variant.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the model go.")
_CHECK_CONFIG = flags.DEFINE_bool(
    "check_config", False, "Check the config's fields and values, then exit without training; "
    "the paths it names are not looked at (launch/tpu_pod.sh runs this before it creates a "
    "slice, where the paths are the workers').")
_CHECK_PROCESSES = flags.DEFINE_integer(
    "check_processes", 1, "With --check_config: the processes the run will have (tpu_pod.sh "
    "passes its slice's hosts), so that what every host must batch alike is checked too.",
    lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = config_lib.validate(_CONFIG.value)
  if _CHECK_CONFIG.value:
    if _CHECK_PROCESSES.value > 1 and config.stage != "demo":
      from robust_u1_jax.training import stages, trainer

      trainer.check_shards_agree(config, _CHECK_PROCESSES.value,
                                 stages.DATA_STAGES.get(config.stage, config.stage))
    print(f"the {config.stage} config is valid (the paths it names were not checked)", flush=True)
    return 0
  config_inputs.check_inputs(config)  # before anything is built: a wrong path fails at once
  if config.get("xla_flags"):
    use_xla_flags(config.xla_flags)
  # Checked here, created by the run once its stage is built (a run refused before leaves none).
  workdir = cli.output_dir(_WORKDIR.value, "--workdir", create=False)
  from robust_u1_jax.data import multihost
  from robust_u1_jax.training import demo, stages, trainer  # after the checks: fast errors
  from robust_u1_jax.training.checkpoint import Stopped, finished, results_line

  # A multi-process run (launch/) joins its peers before anything touches a device.
  multihost.initialize_distributed()

  if config.stage == "demo":
    try:
      report = demo.run(config, workdir)
    except Stopped as e:  # the demo said where it stopped
      return e.exit_status
    print(f"results in {workdir}: a workdir per part, the report {report}", flush=True)
    return 0
  finished_before = finished(workdir, config.total_steps)  # the trainer says so itself
  try:
    trainer.train(config, workdir, stages.builder(config.stage))
  except Stopped as e:
    print(results_line(workdir, config.total_steps), flush=True)
    return e.exit_status
  if not finished_before:
    print(results_line(workdir, config.total_steps), flush=True)
  return 0


def use_xla_flags(flags: str) -> None:
  """Puts `flags` before the user's own XLA_FLAGS, whose flags win (XLA reads a repeated flag's
  last value). XLA reads the variable once, when the backend starts, which no step before this
  one does."""
  os.environ["XLA_FLAGS"] = " ".join(filter(None, (flags, os.environ.get("XLA_FLAGS", ""))))


if __name__ == "__main__":
  cli.run(main)
