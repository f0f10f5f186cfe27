"""Checking and loading stage configs: every value a run depends on (`validate`), config files
with `--config.x=y` style overrides (`load`), and the fields two configs differ in
(`setting_differences`). The defaults: `config_defaults`; the files and folders a config names:
`config_inputs`.
"""

from collections.abc import Collection, Mapping
from typing import Any
import difflib
import json
import math
import os
import re

import ml_collections

from robust_u1_jax.config_defaults import TEXT_FIELDS
from robust_u1_jax.data import shapes  # the standard library and numpy only

# --------------------------------------------------------------------------------------------------
# Validation: every stage entry calls `validate(config)` before doing work, so an impossible value
# stops the run at start-up with the field's name and what it may be, not deep inside a jit trace.

SOURCES = ("shapes", "folder", "tfds", "jsonl", "vqa_tsv", "vqa_parquet")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "minimal")  # models/layers.py: remat_policy
ATTENTION = ("auto", "xla", "splash", "cudnn")  # models/attention.py: IMPLEMENTATIONS
GUIDANCE_RENORMS = ("global", "channel", "text_channel")  # sampling.RENORM_TYPES
INTENSITY_DRAWS = ("stage", "record")  # data/transforms.py: CorruptionSpec.intensity_draw


class ConfigError(ValueError):
  """A config field holds a value the project cannot run with."""


class UnknownFieldError(ConfigError):
  """An override names a field the config does not have."""


def _check(ok: bool, field: str, value, allowed: str) -> None:
  # inf and nan pass most comparisons (inf > 0) and reach the loss as NaN steps later.
  if not ok or not _finite(value):
    raise ConfigError(f"config field {field} = {value!r} is invalid: allowed {allowed}"
                      f"{'' if _finite(value) else ' (a finite number)'}")


def _finite(value) -> bool:
  if isinstance(value, float):
    return math.isfinite(value)
  if isinstance(value, (tuple, list)):
    return all(map(_finite, value))
  if isinstance(value, dict):
    return all(map(_finite, value.values()))
  return True


def _corruption_names() -> list[str]:
  from robust_u1_jax.data import corruptions  # deferred: configs load without JAX initialised

  short = sorted({name.split("/", 1)[1] for name, _ in corruptions.list_corruptions()})
  return ["none", "imagenet_c", "robust_r1_pipeline"] + short


def validate_data(d: ml_collections.ConfigDict, prefix: str = "data") -> None:
  _check(d.source in SOURCES, f"{prefix}.source", d.source, f"one of {', '.join(SOURCES)}")
  if d.source != "shapes":
    # eval_data is a copy of data made when the config is built: --config.data.path does not
    # reach it.
    _check(bool(d.path), f"{prefix}.path", d.path,
           f"a path or dataset name for source={d.source!r}" + (
               " (the records the stage evaluates on: give --config.eval_data.path, which may "
               "be data.path's)" if prefix == "eval_data" else ""))
  _check(d.image_size >= 32, f"{prefix}.image_size", d.image_size, "an integer >= 32")
  for kind, stride in (("vae", d.vae_stride), ("vit", d.vit_patch)):
    lo, hi = d[f"{kind}_min_side"], d[f"{kind}_max_side"]
    stride_name = f"{prefix}.{kind}_stride" if kind == "vae" else f"{prefix}.vit_patch"
    _check(stride > 0, stride_name, stride, "a positive integer")
    _check(0 < lo <= hi, f"{prefix}.{kind}_min_side", lo,
           f"a positive integer <= {prefix}.{kind}_max_side ({hi})")
    _check(hi % stride == 0, f"{prefix}.{kind}_max_side", hi,
           f"a multiple of {stride_name} ({stride})")
  if d.source == "shapes":
    # A path given without its source trained on the built-in world, silently.
    _check(not d.path, f"{prefix}.path", d.path,
           f"empty with {prefix}.source='shapes' (the built-in world reads no path); for your "
           f"own data give --config.{prefix}.source too: " + ", ".join(SOURCES[1:]))
    _check(d.image_size % d.vae_stride == 0 and d.image_size % d.vit_patch == 0,
           f"{prefix}.image_size", d.image_size,
           f"a multiple of {prefix}.vae_stride ({d.vae_stride}) and {prefix}.vit_patch "
           f"({d.vit_patch})")
  _check(0 <= d.severity <= 5, f"{prefix}.severity", d.severity,
         "0 (drawn per record) or an ImageNet-C severity 1..5")
  _check(d.intensity <= 1.0, f"{prefix}.intensity", d.intensity,
         "a Robust-R1 intensity in [0, 1], or negative to draw per record")
  _check(d.intensity_draw in INTENSITY_DRAWS, f"{prefix}.intensity_draw", d.intensity_draw,
         ", ".join(INTENSITY_DRAWS))
  _check(0.0 <= d.clean_fraction < 1.0, f"{prefix}.clean_fraction", d.clean_fraction,
         "a fraction of the records in [0, 1)")
  _fraction(d.get("question_prompt_fraction", 0.0), f"{prefix}.question_prompt_fraction")
  names = _corruption_names()
  _check(d.corruption in names, f"{prefix}.corruption", d.corruption, ", ".join(names))
  if d.source == "jsonl":  # every row is a pair (sources.PAIR_KEYS), its image corrupted already
    _check(d.corruption == "none", f"{prefix}.corruption", d.corruption,
           f"'none' with {prefix}.source='jsonl', whose rows are corrupted/clean pairs already")
  _check(d.batch_size > 0, f"{prefix}.batch_size", d.batch_size, "a positive integer")
  _check(d.shapes_size > 0, f"{prefix}.shapes_size", d.shapes_size,
         "a positive number of records per shapes-world split")
  _check(d.token_budget >= 0, f"{prefix}.token_budget", d.token_budget, "0 (no packing) or > 0")
  _check(d.latent_budget == 0 or 0 < d.latent_budget < d.token_budget, f"{prefix}.latent_budget",
         d.latent_budget, f"0 (no split) or between 0 and {prefix}.token_budget "
         f"({d.token_budget}), exclusive: the generation expert's share of each packed row, "
         f"which a variant sets beside its token_budget (a {prefix}.token_budget given alone "
         "keeps the variant's share)")
  _check(d.text_pad_to >= 0, f"{prefix}.text_pad_to", d.text_pad_to,
         "0 (bucket per batch) or a token count")
  for field, width in d.get("text_widths", {}).items():
    _check(field in TEXT_FIELDS, f"{prefix}.text_widths.{field}", width,
           f"widths of the text fields {', '.join(TEXT_FIELDS)}")
    _check(width >= 0, f"{prefix}.text_widths.{field}", width,
           f"0 ({prefix}.text_pad_to's rule) or a token count")
  _check(d.num_epochs >= 0, f"{prefix}.num_epochs", d.num_epochs, "0 (forever) or > 0")
  _check(d.worker_count >= 0, f"{prefix}.worker_count", d.worker_count, "an integer >= 0")
  _check(0.0 <= d.max_skip_ratio < 1.0, f"{prefix}.max_skip_ratio", d.max_skip_ratio,
         "a fraction in [0, 1)")
  _check(d.min_image_side >= 0, f"{prefix}.min_image_side", d.min_image_side,
         "0 (one VAE stride or ViT patch, whichever is larger) or a side in pixels")


def validate_guidance(g: ml_collections.ConfigDict) -> None:
  for name in ("text_scale", "image_scale"):
    _check(g[name] >= 1.0, f"guidance.{name}", g[name], "a scale >= 1 (1: no guidance)")
  _check(g.renorm_type in GUIDANCE_RENORMS, "guidance.renorm_type", g.renorm_type,
         ", ".join(GUIDANCE_RENORMS))
  _fraction(g.renorm_min, "guidance.renorm_min")


def validate_lora(lo: ml_collections.ConfigDict) -> None:
  _check(lo.rank >= 0, "lora.rank", lo.rank, "0 (no LoRA) or a positive integer")
  if lo.rank == 0:
    return
  _check(lo.alpha > 0, "lora.alpha", lo.alpha, "a positive number (the scale is alpha / rank)")
  try:
    re.compile(lo.targets)
    ok = bool(lo.targets)
  except re.error:
    ok = False
  _check(ok, "lora.targets", lo.targets, "a non-empty regular expression on parameter paths")


BOOTSTRAP_STAGES = ("bootstrap_vae", "bootstrap_clip", "bootstrap_vit", "pretrain")  # demo.py
CLIP_MODELS = ("tiny", "vit_b32")


def _fraction(value, field: str) -> None:
  _check(0.0 <= value <= 1.0, field, value, "a fraction in [0, 1]")


def validate_flow_settings(block: ml_collections.ConfigDict, prefix: str) -> None:
  """The flow-matching settings that `block` has (SFT's at the top level, `pretrain`'s, `rl`'s,
  `reason`'s): condition dropouts, the timestep shift, sampler steps."""
  for name in ("text_dropout", "vit_dropout", "vae_dropout"):
    if name in block:
      _fraction(block[name], prefix + name)
  if "timestep_shift" in block:
    _check(block.timestep_shift > 0, f"{prefix}timestep_shift", block.timestep_shift,
           "a number > 0")
  for name in ("eval_num_steps", "recovery_steps"):
    if name in block:
      _check(block[name] >= 2, prefix + name, block[name], "an integer >= 2 (sampler steps)")


def validate_bootstrap(c: ml_collections.ConfigDict) -> None:
  """The bootstrap stages: clean images of unpacked batches; the sections of each stage."""
  if c.stage in BOOTSTRAP_STAGES:
    for prefix in ("data", "eval_data"):
      d = c.get(prefix)
      if d is not None:
        _check(d.corruption == "none", f"{prefix}.corruption", d.corruption,
               f"none for stage {c.stage!r} (the bootstrap stages never see a corruption)")
    _check(c.data.token_budget == 0, "data.token_budget", c.data.token_budget,
           f"0 for stage {c.stage!r} (its rows are built one sample each)")
  if c.stage in ("bootstrap_clip", "bootstrap_vit", "pretrain"):
    _check(c.data.source == "shapes", "data.source", c.data.source,
           f"shapes for stage {c.stage!r} (captions and questions come from the built-in world)")
  if "autoencoder" in c:
    a = c.autoencoder
    for name in ("l1_weight", "l2_weight", "kl_weight", "contrast_weight"):
      _check(a[name] >= 0, f"autoencoder.{name}", a[name], "a weight >= 0")
    _check(a.l1_weight + a.l2_weight > 0, "autoencoder.l1_weight/l2_weight",
           (a.l1_weight, a.l2_weight), "weights with a positive sum (a reconstruction loss)")
  if "clip" in c:
    _check(c.clip.model in CLIP_MODELS, "clip.model", c.clip.model, ", ".join(CLIP_MODELS))
    _check(c.clip.max_logit_scale > 1, "clip.max_logit_scale", c.clip.max_logit_scale,
           "a number > 1 (the cap of the learned exp(logit_scale); open_clip's is 100)")
  if "pretrain" in c:
    p = c.pretrain
    for name in ("caption_fraction", "two_image_fraction", "text_to_image_fraction",
                 "answer_vae_dropout"):
      _fraction(p[name], f"pretrain.{name}")
    validate_flow_settings(p, "pretrain.")
    for name in ("understanding_weight", "generation_weight"):
      _check(p[name] >= 0, f"pretrain.{name}", p[name], "a weight >= 0")
    _check(p.understanding_weight + p.generation_weight > 0,
           "pretrain.understanding_weight/generation_weight",
           (p.understanding_weight, p.generation_weight), "weights with a positive sum")
    for name in ("caption_prompt", "reconstruction_instruction"):
      _check(bool(p[name].strip()), f"pretrain.{name}", p[name], "a non-empty text")


# The paper's evaluation intensities 25 / 50 / 100 % of the Robust-R1 pipeline
# (docs/design.md#corruptions).
EVAL_INTENSITIES = {"25%": 0.23, "50%": 0.45, "100%": 0.9}


def _check_types(types, family: str) -> None:
  """`<family>_types` of configs/eval.py: 'all', or corruptions of the family, short or qualified
  ('fog', 'imagenet_c/fog')."""
  from robust_u1_jax.data import corruptions  # deferred: configs load without JAX initialised

  known = [n.split("/", 1)[1] for n, _ in corruptions.list_corruptions()
           if n.startswith(family + "/")]
  names = [t.removeprefix(family + "/") for t in types]
  _check(names == ["all"] or all(n in known for n in names), f"{family}_types", tuple(types),
         f"('all',) or names among {', '.join(known)}; several on the command line as a Python "
         f"tuple, e.g. --config.{family}_types=\"('{known[0]}','{known[-1]}')\"")


# How the evaluation takes a benchmark's images (configs/eval.py's benchmark_images).
BENCHMARK_IMAGES = ("whole", "square")


def validate_eval(c: ml_collections.ConfigDict) -> None:
  """configs/eval.py (the model itself is checked when it loads)."""
  levels = tuple(EVAL_INTENSITIES)
  _check(set(c.intensities) <= set(levels), "intensities", c.intensities,
         f"a subset of {', '.join(levels)}")
  _check(all(1 <= s <= 5 for s in c.severities), "severities", c.severities,
         "ImageNet-C severities in 1..5")
  for field in ("batch_size", "max_new_tokens"):
    _check(c[field] > 0, field, c[field], "a positive integer")
  tables = any(c.benchmarks.values())
  _check(c.num_samples > 0 or (c.num_samples == 0 and tables), "num_samples", c.num_samples,
         "a positive integer, or 0 beside a benchmark table (--config.benchmarks.<name>=FILE) "
         "to evaluate the tables alone")
  if c.num_samples == 0:
    others = [f"compare.{k}" for k, v in c.compare.items() if v] + ["rl_workdir"] * bool(
        c.rl_workdir)
    _check(not others, "num_samples", 0, f"a positive integer: {', '.join(others)} compare "
           "models on the built-in world's images, which num_samples = 0 leaves out")
  _check(c.benchmark_samples >= 0, "benchmark_samples", c.benchmark_samples,
         "0 (every row) or a positive integer")
  _check(c.benchmark_images in BENCHMARK_IMAGES, "benchmark_images", c.benchmark_images,
         ", ".join(BENCHMARK_IMAGES))
  _check(c.claim_samples >= 0, "claim_samples", c.claim_samples,
         "0 (num_samples) or a positive integer")
  _check(0.0 <= c.max_skip_ratio < 1.0, "max_skip_ratio", c.max_skip_ratio,
         "a fraction in [0, 1)")
  _check(c.recovery_steps >= 2, "recovery_steps", c.recovery_steps, "an integer >= 2")
  _check(c.dtype in ("float32", "bfloat16"), "dtype", c.dtype, "float32, bfloat16")
  _check(c.clip_model in CLIP_MODELS, "clip_model", c.clip_model, ", ".join(CLIP_MODELS))
  _check(c.split in ("train", "validation", "test"), "split", c.split, "train, validation, test")
  records = shapes.DEFAULT_SIZES[c.split]  # the held-out samples are the split's first records
  for field in ("num_samples", "claim_samples"):
    _check(c[field] <= records, field, c[field],
           f"at most the world's {records:,} {c.split} records")
  for family in ("imagenet_c", "robust_r1"):
    _check_types(c[f"{family}_types"], family)
  for field in ("cfg_text", "cfg_img"):
    _check(c[field] is None or c[field] >= 1, field, c[field],
           "unset (the model's own) or a guidance scale >= 1 (1: no guidance)")


def validate_optimizer(o: ml_collections.ConfigDict) -> None:
  _check(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "a positive number")
  _check(0 <= o.end_learning_rate <= o.learning_rate, "optimizer.end_learning_rate",
         o.end_learning_rate, "in [0, optimizer.learning_rate]")
  _check(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "an integer >= 0")
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1/b2", (o.b1, o.b2), "values in [0, 1)")
  _check(o.grad_clip >= 0, "optimizer.grad_clip", o.grad_clip, ">= 0 (0 disables clipping)")
  _check(0 <= o.ema_decay < 1, "optimizer.ema_decay", o.ema_decay, "in [0, 1) (0 disables EMA)")
  _check(o.grad_accum_steps >= 1, "optimizer.grad_accum_steps", o.grad_accum_steps, ">= 1")
  _check(o.eps > 0, "optimizer.eps", o.eps, "a number > 0 (Adam's denominator term)")
  _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, ">= 0 (0: none)")


def validate_rl(c: ml_collections.ConfigDict) -> None:
  """The RL stage's `rl` block, against its data batch (configs/rl.py)."""
  rl = c.rl
  _check(c.data.token_budget == 0, "data.token_budget", c.data.token_budget,
         "0 for the RL stage (rollouts take one corrupted image per row)")
  _check(rl.group_size >= 2, "rl.group_size", rl.group_size,
         "an integer >= 2 (advantages are normalised within a group)")
  _check(rl.num_steps >= 2, "rl.num_steps", rl.num_steps, "an integer >= 2")
  # An empty window samples by ODE alone: no step has a log-probability, the loss is 0/0.
  _check(1 <= rl.window_size <= rl.num_steps // 2, "rl.window_size", rl.window_size,
         f"in [1, rl.num_steps // 2 = {rl.num_steps // 2}] (the SDE steps trained)")
  _check(rl.clip_model in CLIP_MODELS, "rl.clip_model", rl.clip_model, ", ".join(CLIP_MODELS))
  validate_flow_settings(rl, "rl.")
  _check(rl.noise_level > 0, "rl.noise_level", rl.noise_level,
         "a number > 0 (the SDE steps' noise; 0 leaves no log-probability to train)")
  _check(rl.adv_clip > 0, "rl.adv_clip", rl.adv_clip, "a number > 0 (advantages' bound)")
  _check(rl.clip_alpha > 0, "rl.clip_alpha", rl.clip_alpha,
         "a number > 0 (the CLIP reward's scale)")
  unknown = sorted(set(rl.reward_weights) - {"ssim", "clip"})
  _check(not unknown, "rl.reward_weights", unknown, "the rewards ssim, clip")
  weights = rl.reward_weights.to_dict()
  _check(all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0,
         "rl.reward_weights", weights, "weights >= 0 with a positive sum")
  _check(rl.reward_weights.get("clip", 0.0) == 0 or bool(rl.clip_checkpoint),
         "rl.clip_checkpoint", rl.clip_checkpoint,
         "a CLIP .safetensors file when rl.reward_weights.clip > 0")
  _check(rl.beta >= 0, "rl.beta", rl.beta, "a number >= 0 (the KL penalty's weight)")
  for field in ("clip_low", "clip_high"):
    _check(rl[field] > 0, f"rl.{field}", rl[field],
           "a number > 0 (the PPO ratio's clip range below / above 1)")
  _check(rl.inner_epochs >= 1, "rl.inner_epochs", rl.inner_epochs, "an integer >= 1")
  _check(rl.updates_per_rollout >= 1 and rl.updates_per_rollout % rl.inner_epochs == 0,
         "rl.updates_per_rollout", rl.updates_per_rollout,
         f"a positive multiple of rl.inner_epochs = {rl.inner_epochs} (updates = inner epochs "
         "x mini-batches per epoch)")
  # Each mini-batch must hold a transition: B*G*W of them.
  transitions = c.data.batch_size * rl.group_size * rl.window_size
  _check(rl.updates_per_rollout // rl.inner_epochs <= transitions, "rl.updates_per_rollout",
         rl.updates_per_rollout, f"at most rl.inner_epochs x {transitions} transitions "
         "(data.batch_size x rl.group_size x rl.window_size): one per mini-batch")


def samples_recoveries(c: ml_collections.ConfigDict) -> bool:
  """Whether a stage's step samples the model's recoveries: RL's rollouts, and the reasoning
  stage's recoveries made on the fly (not read from a cache)."""
  return c.get("stage") == "rl" or (c.get("stage") == "reason"
                                    and c.reason.recovered_images == "on_the_fly")


def lora_enabled(c: ml_collections.ConfigDict) -> bool:
  """Whether a run trains LoRA factors (`lora.rank > 0`, training/lora.py) instead of its stage's
  parameters."""
  return c.get("lora") is not None and c.lora.rank > 0


DEMO_SEED = -1  # a demo part's seed that stands for the demo's own (training/demo.py part_config)


def resolve_demo_seed(part: ml_collections.ConfigDict, demo_seed: int
                      ) -> ml_collections.ConfigDict:
  """A demo part's config with its seed: the part's own (--config.sft.seed=3), else the demo's
  (a copy where it stood for the demo's)."""
  if part.seed != DEMO_SEED:
    return part
  part = part.copy_and_resolve_references()
  part.seed = demo_seed
  return part


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field a run depends on; returns the config for chaining."""
  _check(c.seed >= 0, "seed", c.seed, "an integer >= 0")  # every config: stages, demo, eval
  if c.get("stage") == "eval":
    validate_eval(c)
    return c
  if c.get("stage") == "demo":  # each part is a stage config of its own
    parts = []
    for part, sub in c.items():
      if isinstance(sub, ml_collections.ConfigDict) and "stage" in sub:
        parts.append(part)
        try:
          validate(resolve_demo_seed(sub, c.seed))
        except ConfigError as e:
          raise ConfigError(f"demo part {part!r} (--config.{part}.<field>): {e}") from None
    for part in parts:  # training/demo.py's estimate of the minutes to go
      _check(c.minutes.get(part, -1) >= 0, f"minutes.{part}", c.minutes.get(part),
             "the part's minutes in a measured run, >= 0")
      _check(c.minutes_work.get(part, 0) > 0, f"minutes_work.{part}",
             c.minutes_work.get(part), "the part's work in that run (steps, images), > 0")
    return c
  validate_data(c.data, "data")
  if "eval_data" in c:
    validate_data(c.eval_data, "eval_data")
  for axis in ("data", "fsdp", "tensor"):
    _check(c.mesh[axis] == -1 or c.mesh[axis] > 0, f"mesh.{axis}", c.mesh[axis],
           "a positive size, or -1 to take the remaining devices")
  _check([c.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) <= 1, "mesh", c.mesh.to_dict(),
         "at most one axis of size -1")
  o = c.optimizer
  validate_optimizer(o)
  if "lora" in c:
    validate_lora(c.lora)
  if "guidance" in c:
    validate_guidance(c.guidance)
  validate_bootstrap(c)
  _check(c.param_dtype in DTYPES, "param_dtype", c.param_dtype, ", ".join(DTYPES))
  _check(c.compute_dtype in DTYPES, "compute_dtype", c.compute_dtype, ", ".join(DTYPES))
  _check(c.remat in REMAT, "remat", c.remat, ", ".join(REMAT))
  _check(c.get("attention", "auto") in ATTENTION, "attention", c.get("attention"),
         ", ".join(ATTENTION))
  _check(c.vae_posterior in ("sample", "mean"), "vae_posterior", c.vae_posterior, "sample, mean")
  _check(bool(c.init_from), "init_from", c.init_from,
         "'random', a BAGEL/Robust-U1 model directory, or an Orbax checkpoint directory of an "
         "earlier stage")
  if lora_enabled(c) and c.init_from == "random" and not re.search(c.lora.targets,
                                                                  "llm2vae.kernel"):
    # The velocity head llm2vae starts at zero (models/bagel.py) and LoRA keeps it frozen, so no
    # gradient reaches the factors: the run would end where it began.
    raise ConfigError(
        f"config field lora.rank = {c.lora.rank} with init_from = 'random': LoRA adapts a trained "
        "model; on random weights its factors get no gradient (the velocity head llm2vae starts "
        "at zero and stays frozen). Give --config.init_from, or lora.rank=0 to train the "
        "weights themselves")
  _check(c.total_steps > 0, "total_steps", c.total_steps, "a positive integer")
  validate_flow_settings(c, "")
  # Gradient steps of the run (RL makes updates_per_rollout per trainer step): an unfinished
  # accumulation at the end would be dropped from the saved model.
  per_step = c.rl.updates_per_rollout if "rl" in c else 1
  _check(c.total_steps * per_step % o.grad_accum_steps == 0, "total_steps", c.total_steps,
         f"a number whose gradient steps (x {per_step} per step) are a multiple of "
         f"optimizer.grad_accum_steps = {o.grad_accum_steps}: one update per k gradient steps")
  for field in ("checkpoint_every", "keep_checkpoints", "log_every"):
    _check(c[field] > 0, field, c[field], "a positive integer")
  _check(c.eval_every >= 0, "eval_every", c.eval_every,
         "a positive integer (the evaluation's cadence; it also runs at the last step), or 0 for "
         "none")
  if "reason" in c:
    validate_flow_settings(c.reason, "reason.")
    for prefix in ("data", "eval_data"):  # found at start, not when the first batch is read
      if prefix in c:
        _check(c[prefix].source != "folder", f"{prefix}.source", c[prefix].source,
               "a source of question records for the reasoning stage (an image folder holds "
               "no questions): shapes, jsonl, vqa_tsv, vqa_parquet or tfds")
    _check(c.reason.recovered_images in ("on_the_fly", "cache"), "reason.recovered_images",
           c.reason.recovered_images, "on_the_fly, cache")
    _check(c.reason.recovered_images == "cache" or c.data.token_budget == 0, "data.token_budget",
           c.data.token_budget, "0 with reason.recovered_images=on_the_fly (the step recovers "
           "unpacked batches of one image size; precompute recoveries to pack)")
  if "rl" in c:
    validate_rl(c)
  return c


# --------------------------------------------------------------------------------------------------
# Loading config files (entry modules use ml_collections.config_flags; these serve library use,
# tests and the messages of robust_u1_jax.cli).

# The folder above the package: in a checkout (an editable install), it holds configs/.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def missing_config_file(path: str) -> str:
  """Why `path` names no config file, with the config files beside it or, given from another
  folder, the checkout's own."""
  folder = os.path.dirname(path) or "."
  found = sorted(n for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_")
                 ) if os.path.isdir(folder) else []
  checkout = os.path.join(CHECKOUT, path)
  if not found and not os.path.isabs(path) and os.path.isfile(checkout):
    # The docs' paths (configs/sft.py:tiny) are the checkout's, run from elsewhere.
    return (f"no such config file {path} in {os.getcwd()} (a config path is read from the "
            f"current folder); the checkout's is {checkout}")
  beside = (f"; config files in {folder}: {', '.join(found)}" if found else
            " (give path.py:variant, e.g. configs/sft.py:tiny)")
  return f"no such config file {path}{beside}"


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:variant]` -> its get_config() result, locked; no overrides, not validated."""
  import importlib.util

  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(missing_config_file(path))
  module_spec = importlib.util.spec_from_file_location(
      f"_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except ValueError as e:  # an unknown variant, in the config file's own words
    raise ConfigError(str(e)) from None
  config.lock()
  return config


def field_value(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


_SHORT_NAMES = {"lr": "learning_rate", "steps": "total_steps", "bs": "batch_size"}


def unknown_field(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """None when `dotted` ('data.batch_size') names a field of `config`; else 'no field X' with
  the nearest names, or the fields there when none is near."""
  node, done = config, []
  for part in dotted.split("."):
    where = ".".join(done)
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return f"no field {dotted}: {where} holds a value ({node!r}), not fields"
    if part not in node:
      prefix = f"{where}." if where else ""
      names = sorted(node.keys())
      # A field of that name elsewhere (`data.batch_size` for `batch_size`; `lr` is
      # `optimizer.learning_rate`) before the names that are spelt alike here.
      from flax import traverse_util  # deferred: config checks run before the heavy imports

      wanted = _SHORT_NAMES.get(part, part)
      near = [path for path in traverse_util.flatten_dict(config.to_dict(), sep=".")
              if path.rsplit(".", 1)[-1] == wanted][:3]
      near = near or [prefix + n for n in difflib.get_close_matches(part, names, n=3, cutoff=0.6)]
      if near:
        return f"no field {prefix}{part}; did you mean {' or '.join(near)}?"
      return f"no field {prefix}{part}; the fields {f'of {where} ' if where else ''}are " + \
          ", ".join(names)
    node = node[part]
    done.append(part)
  return None


def differing_fields(saved: Mapping, config: ml_collections.ConfigDict | Mapping,
                     ignore: Collection[str] = ()) -> list[tuple[str, Any, Any]]:
  """(field, saved value, value) for each field whose value differs between a config saved as
  JSON (a checkpoint's, a report's settings) and `config`, by field name. Fields only one of them
  has are left out: a newer project adds fields whose defaults keep what an older run did.
  `ignore`: dotted names, each also covering the fields under it."""
  from flax import traverse_util  # deferred: config checks run before the heavy imports

  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  ours = traverse_util.flatten_dict(json.loads(json.dumps(config)), sep=".")
  theirs = traverse_util.flatten_dict(json.loads(json.dumps(saved)), sep=".")
  skipped = tuple(ignore)
  return [(name, theirs[name], ours[name]) for name in sorted(ours)
          if name in theirs and ours[name] != theirs[name]
          and not any(name == i or name.startswith(i + ".") for i in skipped)]


def described(differences: list[tuple[str, Any, Any]]) -> list[str]:
  """'field <saved>, now <value>' for each of `differing_fields`' differences."""
  return [f"{name} {was!r}, now {now!r}" for name, was, now in differences]


def setting_differences(saved: Mapping, config: ml_collections.ConfigDict | Mapping,
                        ignore: Collection[str] = ()) -> list[str]:
  """`differing_fields` in words (`described`)."""
  return described(differing_fields(saved, config, ignore))


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               tuple: "a tuple, e.g. '(1, 2)'"}


def takes(current) -> str:
  """What a field holding `current` takes, in words, with the config's value: 'takes an integer
  (the config has 8)'."""
  kind = _TYPE_WORDS.get(type(current), type(current).__name__)
  return f"takes {kind} (the config has {current!r})"


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads `path.py[:variant]` like --config does, applies {'a.b': value} overrides, validates.

  For library use and tests; entry modules use ml_collections.config_flags instead.
  """
  config = load_file(spec)
  override(config, overrides or {}, spec)
  return validate(config)


def override(config: ml_collections.ConfigDict, overrides: dict, spec: str) -> None:
  """Sets {'a.b': value} in `config` (loaded from `spec`, which errors name); UnknownFieldError
  for a field it lacks, ConfigError for a value of the wrong type."""
  for dotted, value in overrides.items():
    problem = unknown_field(config, dotted)
    if problem:
      raise UnknownFieldError(f"{spec}: {problem}")
    *head, leaf = dotted.split(".")
    parent = field_value(config, ".".join(head)) if head else config
    try:
      parent[leaf] = value
    except TypeError:  # ml_collections keeps a field's type (an int may become a float)
      current = parent[leaf]
      kind = ("is a section, not a value: set its fields" if hasattr(current, "keys") else
              takes(current))
      raise ConfigError(f"{spec}: {dotted}={value!r}: {dotted} {kind}") from None
