"""Each stage's step, ready to compile ahead of time: its builder config, its inputs as sharded
shapes, and the model FLOPs of the work it does (`benchmarks/aot.py` compiles and reports).

The inputs are the trainer's own: one batch of the stage's pipeline goes through the stage's own
`StageSpec.host_inputs` (the rows, labels, recovery contexts and image stacks a training step
gets), and its arrays become `jax.ShapeDtypeStruct`s with the leading (row) axis set to
data.batch_size and split over the ('data', 'fsdp') mesh axes like `multihost.global_batch`. Row
shapes never depend on the batch size (packed rows on the token budget, unpacked ones on the
canvas and text bucket), so a batch of one or two rows is enough.

The batch comes from the built-in shapes world with the run's data config (image sides, packing
budget, crop, text fields), so no dataset is needed: a run's own source (ImageNet, JSONL) becomes
the shapes world at `SAMPLE_SIDE` pixels (resized by the config's own rules, as any source's
images are). What a source changes is the text lengths and how densely samples fill a packed row,
and the model FLOPs count exactly the rows compiled for (`flops.rows_work`): their fill is printed.

Stage specifics, each through the stage's own code:
  sft     packed or unpacked rows, condition dropout drawn as the trainer does (seed 0).
  rl      the rollout plus `rl.updates_per_rollout` updates of `rl.make_step`; a CLIP reward tower
          the config names but this machine lacks is built shape-only (`nnx.eval_shape`).
  reason  with precomputed recoveries (reason.recovered_images=cache): a temporary cache holds the
          batch's corrupted images as their "recoveries" (same sizes), read back by the stage's
          own `RecoveryCache`; with on-the-fly recoveries the step's sampler runs inside.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # as multihost.BATCH_AXES
STAGES = ("sft", "rl", "reason")
# Side of the shapes-world images standing in for a run's own source (before the config's resize
# rules): BAGEL's 512-pixel training images, rounded to a multiple of both the VAE and ViT strides.
SAMPLE_SIDE = 512
HOST_ROWS = 2  # rows of the sample batch (row shapes do not depend on the batch size)


class StageError(ValueError):
  """The stage cannot be compiled ahead of time as configured; the message says why."""


def builder_config(config, workdir: str):
  """The config the stage builder sees: a run's own source becomes the shapes world (train and
  eval data; evaluation is not part of the step, so its batch shrinks), and a reasoning run on
  precomputed recoveries reads them from a cache in `workdir` (filled by `host_inputs`)."""
  c = config.copy_and_resolve_references()
  for d in (c.data, c.eval_data):
    if d.source != "shapes":
      step = math.lcm(d.vae_stride, d.vit_patch)
      d.update(dict(source="shapes", path="", shapes_size=1000,
                    image_size=step * max(1, round(min(d.vae_max_side, SAMPLE_SIDE) / step))))
  c.eval_data.update(dict(batch_size=min(c.eval_data.batch_size, 8), token_budget=0,
                          worker_count=0, shuffle=False, corruption="none"))
  c.data.update(dict(worker_count=0, shuffle=False))
  if c.stage == "reason" and c.reason.recovered_images == "cache":
    from robust_u1_jax.training import recovery_cache

    c.reason.recovery_cache = os.path.join(workdir, "recoveries")
    os.makedirs(c.reason.recovery_cache)
    with open(os.path.join(c.reason.recovery_cache, recovery_cache.MANIFEST), "w") as f:
      json.dump({"fingerprint": recovery_cache.fingerprint(c), "stage": c.stage}, f)
  return c


@contextlib.contextmanager
def stage_environment(config):
  """(A scratch directory for builder_config.) While building the RL stage, a CLIP reward tower
  without a checkpoint is built shape-only instead of read from rl.clip_checkpoint."""
  workdir = tempfile.mkdtemp(prefix="aot_stage_")
  patched = None
  try:
    if config.stage not in STAGES:
      raise StageError(f"stage {config.stage!r}: the AOT check compiles the steps of "
                       f"{', '.join(STAGES)}")
    if config.stage == "rl" and not os.path.isfile(config.rl.clip_checkpoint):
      from robust_u1_jax.training import rl

      patched = rl.load_clip_tower
      rl.load_clip_tower = _abstract_clip_tower
    yield workdir
  finally:
    if patched is not None:
      from robust_u1_jax.training import rl
      rl.load_clip_tower = patched
    shutil.rmtree(workdir, ignore_errors=True)


def _abstract_clip_tower(rl_config, prefix: str = "rl.", mesh=None):
  del prefix, mesh  # shapes only
  from flax import nnx

  from robust_u1_jax.models import clip as clip_lib

  configs = {"vit_b32": clip_lib.CLIPConfig.vit_b32, "tiny": clip_lib.CLIPConfig.tiny}
  return nnx.split(nnx.eval_shape(lambda: clip_lib.CLIP(configs[rl_config.clip_model](),
                                                        rngs=nnx.Rngs(0))))


def host_batch(config, ctx, spec):
  """(pipeline batch of HOST_ROWS rows, the stage's host inputs of it as numpy arrays)."""
  from robust_u1_jax.data import packing
  from robust_u1_jax.data import pipeline as pipeline_lib

  data = config.data.copy_and_resolve_references()
  data.batch_size = HOST_ROWS
  with pipeline_lib.make_pipeline(data, seed=config.seed, tokenizer=ctx.tokenizer,
                                  stage=spec.data_stage or config.stage,
                                  instruction=config.get("instruction")) as pipeline:
    batch = next(pipeline)
  if config.stage == "reason" and config.reason.recovered_images == "cache":
    from robust_u1_jax.training import recovery_cache

    for row in packing.batch_samples(batch):
      for sample in row:
        recovery_cache._write_png(  # pylint: disable=protected-access
            recovery_cache.record_path(config.reason.recovery_cache, sample["index"],
                                       sample["epoch"]), sample["corrupted"])
  host = spec.host_inputs(batch, np.random.default_rng([config.seed, 0]))
  return batch, jax.tree.map(np.asarray, host)


def abstract_inputs(host, rows: int, mesh):
  """The host inputs as ShapeDtypeStructs of `rows` rows, split over the batch axes."""
  split = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if rows % split:
    raise StageError(f"data.batch_size={rows} does not split over mesh axes {BATCH_AXES} of "
                     f"{split} devices; give a multiple of {split} (--override "
                     f"data.batch_size={split * -(-rows // split)}), or fewer devices (on CPU, "
                     f"--topology cpu:N fakes N)")
  batch = NamedSharding(mesh, P(BATCH_AXES))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype,
                                                     sharding=batch), host)


# ------------------------------------------------------------------------------- model FLOPs

def stage_work(config, mc, host, rows: int) -> tuple[list, str]:
  """(flops.Work items of one step of `rows` rows, a note on what they assume), from the host
  inputs of a HOST_ROWS batch (scaled to `rows`)."""
  from robust_u1_jax import flops

  scale = rows / HOST_ROWS
  pixels = mc.latent_downsample ** 2
  if config.stage == "sft":
    inputs = host[0]
    work = flops.rows_work(inputs, pixels).times(scale)
    return [work], _fill(inputs, work, scale)
  if config.stage == "reason":
    inputs, labels = host[0], host[1]
    work = flops.rows_work(inputs, pixels, logit_tokens=int((labels >= 0).sum())).times(scale)
    note = _fill(inputs, work, scale)
    if config.reason.recovered_images != "cache":
      note += "; the in-step recovery (frozen sampler) is not counted"
    return [work], note
  return _rl_work(config, mc, host, scale)


def _fill(inputs, work, scale) -> str:
  slots = np.asarray(inputs.token_kind).size * scale
  used = work.count * (work.und_tokens + work.gen_tokens)
  return (f"model FLOPs of the compiled rows: {used / slots:.0%} of their {slots:,.0f} token slots "
          "hold tokens (the rest is padding), the mask's attended pairs counted exactly")


def _rl_work(config, mc, host, scale) -> tuple[list, str]:
  """Rollout: the guidance contexts prefilled once per image, num_steps - 1 guided calls of the
  group's noisy blocks, the recoveries decoded. Updates: every epoch scores each (sample, window
  step) transition once with its backward, every update re-prefills the contexts with theirs."""
  import dataclasses

  from robust_u1_jax import flops
  from robust_u1_jax.training import rl

  s = rl.RLSettings.from_config(config)
  g = s.group_size
  pixels = mc.latent_downsample ** 2
  contexts = [host.full] + [host.no_text] * s.guidance.uses_no_text + (
      [host.no_image] * s.guidance.uses_no_image)
  block = int((np.asarray(host.noisy.token_kind) >= 0).sum() / HOST_ROWS)
  h, w = np.asarray(host.clean).shape[1:3]
  work = []
  for k, rows in enumerate(contexts):
    ctx = flops.rows_work(rows, pixels, backward=False).times(scale)
    if k:  # the image is encoded once per call, and the ViT's second run is redundant work
      ctx = dataclasses.replace(ctx, encode_images=(), vit_images=() if k == 1 else ctx.vit_images)
    keys = (ctx.und_tokens + ctx.gen_tokens) / HOST_ROWS
    images = scale * HOST_ROWS
    work += [ctx, ctx.times(s.updates_per_rollout, backward=True),
             flops.denoise_work(keys, block, count=images * g * (s.num_steps - 1)),
             flops.denoise_work(keys, block, count=images * g * s.window_size * s.inner_epochs,
                                backward=True)]
  work.append(flops.Work(0, 0, 0, count=scale * HOST_ROWS * g, backward=False,
                         decode_images=(h * w,)))
  note = (f"{len(contexts)} guidance branches, {s.num_steps - 1} sampler calls, "
          f"{s.updates_per_rollout} updates on {s.window_size} window steps x {s.inner_epochs} "
          "epoch(s); reward models not counted")
  return work, note
