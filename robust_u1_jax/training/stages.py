"""Stage name -> the builder `trainer.train` runs."""

from robust_u1_jax.training import (bootstrap_clip, bootstrap_vae, bootstrap_vit, pretrain,
                                    reasoning, rl, sft)

BUILDERS = {"sft": sft.build, "rl": rl.build, "reason": reasoning.build,
            # The built-in world's stand-in for a pretrained BAGEL (configs/demo.py).
            "bootstrap_vae": bootstrap_vae.build, "bootstrap_clip": bootstrap_clip.build,
            "bootstrap_vit": bootstrap_vit.build, "pretrain": pretrain.build}


# The data stage a builder's StageSpec reads (its `data_stage`), where it is not the stage itself:
# known before the builder runs, so a config its data cannot serve is refused before the build.
DATA_STAGES = {"bootstrap_vae": bootstrap_vae.DATA_STAGE,
               "bootstrap_clip": bootstrap_clip.DATA_STAGE,
               "bootstrap_vit": bootstrap_vit.DATA_STAGE, "pretrain": pretrain.DATA_STAGE}


def builder(stage: str):
  if stage not in BUILDERS:
    raise ValueError(f"config.stage={stage!r} has no trainer here; available: "
                     f"{', '.join(BUILDERS)}")
  return BUILDERS[stage]


def stage_of(build) -> str | None:
  """The stage whose builder `build` is (None: a builder of the caller's own)."""
  return next((name for name, known in BUILDERS.items() if known is build), None)
