"""Stage name -> the builder `trainer.train` runs."""

from robust_u1_jax.training import reasoning, rl, sft

BUILDERS = {"sft": sft.build, "rl": rl.build, "reason": reasoning.build}


def builder(stage: str):
  if stage not in BUILDERS:
    raise ValueError(f"config.stage={stage!r} has no trainer here; available: "
                     f"{', '.join(BUILDERS)}")
  return BUILDERS[stage]
