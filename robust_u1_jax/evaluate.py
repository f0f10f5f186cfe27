r"""Evaluates a trained model: recovery quality and answer accuracy under corruption, and a report.

  python -m robust_u1_jax.evaluate --config configs/eval.py:tiny --model /tmp/robust_u1/reason \
      --config.clip_checkpoint=/tmp/demo/clip/model/clip.safetensors

writes report.md, report.json and PNG figures into --out (default: <model's parent>/eval). A
folder holding another evaluation's report (other models, files, settings or code), or the units
a stopped one kept, is refused unless --overwrite: the demo's report is in its models' parent. A
folder holding this very evaluation's report (the same models, files, settings and code) has
nothing left to evaluate, unless --overwrite. The
config, the files it names (the model, the CLIP checkpoint, benchmark tables, models to compare)
and --out are checked before any model loads; a bad one (or a model directory that cannot be used)
is one `error:` line and exit status 2.
"""

from robust_u1_jax import cli  # first: its quiet environment is set before jax loads

import os

from absl import app, flags
from ml_collections import config_flags

from robust_u1_jax import config_inputs, config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval.py:tiny",
                                          "Evaluation config: path.py:variant.", lock_config=True)
_MODEL = flags.DEFINE_string("model", None, "The model: a model directory, an Orbax checkpoint or "
                             "a stage's workdir (overrides config.model).")
_OUT = flags.DEFINE_string("out", None, "Report directory (overrides config.out).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace what the report folder holds of another evaluation (other "
    "models, files, settings or code): its report, or the units a stopped one kept; or evaluate "
    "again where its report is this evaluation's.")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  with config.unlocked():
    config.model = _MODEL.value or config.model
    config.out = _OUT.value or config.out
  if not config.model:
    raise app.UsageError("give --model (a model directory, Orbax checkpoint or stage workdir)")
  if _MODEL.value and not os.path.isdir(_MODEL.value):
    raise cli.PathError(f"--model {_MODEL.value}: no such model directory (give a model "
                        "directory, an Orbax checkpoint or a stage's workdir)")
  config_lib.validate(config)
  config_inputs.check_inputs(config)
  from robust_u1_jax.eval import run  # after the checks: fast errors
  from robust_u1_jax.inference import engine

  for name, path in config.compare.items():  # found now, not after the main model has loaded
    if path:
      try:
        engine.resolve_model_dir(path)
      except engine.ModelError as e:
        raise cli.PathError(f"config field compare.{name}: {e}") from None

  with config.unlocked():  # the default report folder, checked now, created once the model loads
    config.out = run.report_dir(config)
  named = "--out" if _OUT.value else "the report folder (--out)"
  cli.output_dir(config.out, named, create=False)
  if not _OVERWRITE.value and (other := run.other_evaluation(config)):
    raise cli.PathError(f"{named} {config.out}: holds {other}; give another --out, or "
                        "--overwrite to replace it")
  if not _OVERWRITE.value and run.report_is_current(config):  # as `train` finds a stage done
    print(f"nothing to evaluate: the report in {config.out} is of these models, files, settings "
          "and code; --overwrite evaluates again\nreport: "
          f"{os.path.join(config.out, 'report.md')}", flush=True)
    return 0
  run.run(config)  # ends with "report: <path>"
  return 0


if __name__ == "__main__":
  cli.run(main)
