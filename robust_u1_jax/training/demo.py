"""The built-in world's whole recipe in one command (`configs/demo.py`):

  vae -> clip -> vit -> base (bootstrap: the stand-in for BAGEL's pretraining) -> sft -> rl
  -> reason -> eval

Each part runs in `<workdir>/<part>` from the previous part's output (`init_from`), through the
same trainer as every stage, so re-running skips finished parts and resumes an interrupted one
exactly (the evaluation from the units it finished). The RL stage's semantic reward and the
evaluation's CLIP similarity use the bootstrapped CLIP; the evaluation compares the SFT and RL
models' recoveries and reads the RL reward curves.

Each part's header tells the minutes so far and an estimate of the minutes to go: the config's
reference minutes (`minutes.<part>`, one measured run) of the parts still to run, each scaled by
the work this run asks of it over the work it was measured at (`minutes_work.<part>`: steps, or
the images the evaluation reads), and all by this run's pace, the minutes its parts run from the
start took over their (scaled) reference minutes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import ml_collections

from robust_u1_jax import config_lib
from robust_u1_jax.checkpoints import clip_keys

PARTS = ("vae", "clip", "vit", "base", "sft", "rl", "reason", "eval")
# What each part starts from (None: random weights).
INIT_FROM = {"vae": None, "clip": None, "vit": "vae", "base": "vit", "sft": "base",
             "rl": "sft", "reason": "rl"}
CLIP_FILE = os.path.join("model", clip_keys.CLIP_FILE)
# Fields that change nothing a part trains: the paths the demo chains its parts by (so a moved or
# copied workdir still matches its checkpoints), how often a part logs, evaluates and checkpoints,
# and what its evaluation grids sample.
SAME_TRAINING = ("init_from", "rl.clip_checkpoint", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints", "tensorboard", "eval_num_steps", "rl.eval_num_steps",
                 "eval_data")


def part_config(config: ml_collections.ConfigDict, part: str, workdir: str
                ) -> ml_collections.ConfigDict:
  """The part's own config, chained onto the earlier parts' outputs in `workdir`."""
  c = config_lib.resolve_demo_seed(config[part], config.seed).copy_and_resolve_references()
  with c.unlocked():
    if part == "eval":
      c.model = os.path.join(workdir, "reason")
      c.out = os.path.join(workdir, "eval")
      c.clip_checkpoint = os.path.join(workdir, "clip", CLIP_FILE)
      c.compare.sft = os.path.join(workdir, "sft")
      c.compare.rl = os.path.join(workdir, "rl")
      c.rl_workdir = os.path.join(workdir, "rl")
      return c
    source = INIT_FROM[part]
    c.init_from = "random" if source is None else os.path.join(workdir, source)
    if part == "rl":
      c.rl.clip_checkpoint = os.path.join(workdir, "clip", CLIP_FILE)
  return config_lib.validate(c)


def check_parts_match(configs: Mapping[str, ml_collections.ConfigDict], workdir: str) -> None:
  """Refuses a workdir whose parts were trained with settings other than `configs` (another
  variant, other steps): each part starts from the one before, so continuing a part under other
  settings, or skipping one finished under them, would mix two recipes in one report."""
  from robust_u1_jax.training import checkpoint

  for part in PARTS[:-1]:
    part_dir = os.path.join(workdir, part)
    saved = checkpoint.saved_config(part_dir)
    changed = config_lib.setting_differences(saved, configs[part], SAME_TRAINING) if saved else []
    if changed:
      changed.sort(key=lambda change: not change.startswith("variant "))
      more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
      raise config_lib.ConfigError(
          f"{part_dir} was trained with other settings than this config's: "
          f"{'; '.join(changed[:3])}{more}; a workdir holds one demo: run this config in "
          "another --workdir")


def part_work(c: ml_collections.ConfigDict) -> float:
  """What a part's minutes grow with: a training part's steps; the images the evaluation
  recovers and answers (the claims' conditions and the clean images, off and on, at
  claim_samples; every other condition, and every condition of each compared model, at
  num_samples; benchmark tables, which the demo reads none of, not counted)."""
  if c.stage != "eval":
    return float(c.total_steps)
  from robust_u1_jax.data import corruptions  # deferred: configs/demo.py calls this

  pipeline = len(c.intensities)
  others = (len(corruptions.expand_types(c.imagenet_c_types, "imagenet_c")) * len(c.severities)
            + len(corruptions.expand_types(c.robust_r1_types, "robust_r1")) * len(c.intensities))
  compared = sum(bool(path) for path in c.compare.values())
  claim = max(c.claim_samples, c.num_samples)
  return float(claim * (pipeline + 1 + bool(c.recovery_on_clean))
               + c.num_samples * (others + (pipeline + others) * compared))


def scaled_minutes(config: ml_collections.ConfigDict,
                   configs: Mapping[str, ml_collections.ConfigDict]) -> dict[str, float]:
  """Each part's reference minutes at the work its config in `configs` (`part_config`) asks."""
  return {part: config.minutes[part] * part_work(configs[part]) / config.minutes_work[part]
          for part in PARTS}


def minutes_to_go(reference: Mapping[str, float], timed: Mapping[str, float],
                  to_run: Sequence[str]) -> float:
  """The reference minutes of the parts `to_run`, at the pace of the `timed` ones (part ->
  minutes it took, run from its start): their minutes over their reference minutes, else 1."""
  timed_reference = sum(reference[p] for p in timed)
  pace = sum(timed.values()) / timed_reference if timed_reference > 0 else 1.0
  return pace * sum(reference[p] for p in to_run)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs (or resumes) every part; returns the evaluation report's path. A part stopped by a
  signal (its checkpoint saved, the later parts not started) raises `checkpoint.Stopped`; the
  evaluation, KeyboardInterrupt."""
  import jax

  from robust_u1_jax.eval import run as eval_run
  from robust_u1_jax.training import checkpoint, stages, trainer

  if jax.process_count() > 1:
    # Its bootstrap parts gather and write their models from one host.
    raise config_lib.ConfigError(
        f"configs/demo.py runs in one process, here {jax.process_count()}: run it without "
        "launch/local.sh --processes (the stages' own configs, configs/sft.py and the others, "
        "train on several)")
  # The workdir is made by the first part that runs: a demo stopped before leaves none.
  configs = {part: part_config(config, part, workdir) for part in PARTS}
  check_parts_match(configs, workdir)
  # Finished parts are skipped; the evaluation runs again unless its report is of these very
  # models, settings and code.
  remaining = [p for p in PARTS[:-1]
               if not checkpoint.finished(os.path.join(workdir, p), configs[p].total_steps)]
  report = os.path.join(configs["eval"].out, "report.md")
  if remaining or not eval_run.report_is_current(configs["eval"]):
    remaining.append("eval")
  timed = {}  # part -> minutes, of the parts this run trained from their first step
  reference = scaled_minutes(config, configs)
  t0 = time.perf_counter()
  for k, part in enumerate(PARTS, start=1):
    c, part_dir = configs[part], os.path.join(workdir, part)
    start = time.perf_counter()
    to_go = minutes_to_go(reference, timed, remaining)
    print(f"\n[{k}/{len(PARTS)}] {part} ({(start - t0) / 60:.1f} min so far, about "
          f"{to_go:.1f} to go) -> {part_dir}", flush=True)
    if part == "eval":
      if part not in remaining:
        print(f"{report} is of these models, settings and code; nothing to evaluate", flush=True)
        return report
      if os.path.exists(report):
        print(f"{report} was written for other models, settings or code: evaluating again",
              flush=True)
      return eval_run.run(c)  # stopped, it says how many units it keeps for the same command
    fresh = checkpoint.latest_step(part_dir) is None
    try:
      trainer.train(c, part_dir, stages.builder(c.stage), same_training=SAME_TRAINING)
    except checkpoint.Stopped as e:  # its checkpoint saved: the later parts must not start from it
      print(f"the demo stopped in its {part} part at step {e.step} of {c.total_steps}, its "
            f"checkpoint in {os.path.join(part_dir, 'checkpoints')}; run the same command to "
            "resume", flush=True)
      raise
    if part in remaining:
      remaining.remove(part)
      if fresh:
        timed[part] = (time.perf_counter() - start) / 60
  raise AssertionError("unreachable: the last part is the evaluation")
