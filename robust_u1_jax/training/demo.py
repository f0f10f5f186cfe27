"""The built-in world's whole recipe in one command (`configs/demo.py`):

  vae -> clip -> vit -> base (bootstrap: the stand-in for BAGEL's pretraining) -> sft -> rl
  -> reason -> eval

Each part runs in `<workdir>/<part>` from the previous part's output (`init_from`), through the
same trainer as every stage, so re-running skips finished parts and resumes an interrupted one
exactly. The RL stage's semantic reward and the evaluation's CLIP similarity use the bootstrapped
CLIP; the evaluation compares the SFT and RL models' recoveries and reads the RL reward curves.
"""

from __future__ import annotations

import os
import time

import ml_collections

from robust_u1_jax import config_lib

PARTS = ("vae", "clip", "vit", "base", "sft", "rl", "reason", "eval")
# What each part starts from (None: random weights).
INIT_FROM = {"vae": None, "clip": None, "vit": "vae", "base": "vit", "sft": "base",
             "rl": "sft", "reason": "rl"}
CLIP_FILE = os.path.join("model", "clip.safetensors")


def part_config(config: ml_collections.ConfigDict, part: str, workdir: str
                ) -> ml_collections.ConfigDict:
  """The part's own config, chained onto the earlier parts' outputs in `workdir`."""
  c = config[part].copy_and_resolve_references()
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
    c.seed = config.seed
    if part == "rl":
      c.rl.clip_checkpoint = os.path.join(workdir, "clip", CLIP_FILE)
  return config_lib.validate(c)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Runs (or resumes) every part; returns the evaluation report's path."""
  from robust_u1_jax.eval import run as eval_run
  from robust_u1_jax.training import stages, trainer

  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  for k, part in enumerate(PARTS, start=1):
    c = part_config(config, part, workdir)
    elapsed = time.perf_counter() - t0
    print(f"\n[{k}/{len(PARTS)}] {part} ({elapsed / 60:.1f} min so far) -> "
          f"{os.path.join(workdir, part)}", flush=True)
    if part == "eval":
      report = os.path.join(c.out, "report.md")
      if os.path.exists(report) and os.path.getmtime(report) > _newest_model(workdir):
        print(f"{report} is newer than every model; nothing to evaluate", flush=True)
        return report
      return eval_run.run(c)
    trainer.train(c, os.path.join(workdir, part), stages.builder(c.stage))
  raise AssertionError("unreachable: the last part is the evaluation")


def _newest_model(workdir: str) -> float:
  times = [os.path.getmtime(os.path.join(workdir, p, "model")) for p in PARTS[:-1]
           if os.path.exists(os.path.join(workdir, p, "model"))]
  return max(times, default=0.0)
