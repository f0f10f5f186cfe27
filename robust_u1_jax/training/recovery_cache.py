"""Precomputed recoveries for the reasoning stage (reason.recovered_images=cache).

`build` runs the stage's own input pipeline (same config and seed, so the same records in the same
order, corrupted the same way) for the run's steps, recovers every corrupted image with the
deterministic sampler of the model in `init_from`, and writes each as a PNG:

  <cache>/manifest.json                      what the cache was built from, and the steps a
                                             finished build covered (both checked on use)
  <cache>/epoch_<EEEE>/<index:09d>.png       the recovery of record `index` in epoch E, at the
                                             corrupted image's VAE size

Each image's noise comes from (seed, index, epoch), so a recovery does not depend on its batch.
Files are written atomically and existing ones are skipped: an interrupted build resumes. The
build runs in one process (`recover --cache_dir` does not join a multi-host job).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from robust_u1_jax import config_lib, files
from robust_u1_jax.data import packing

MANIFEST = "manifest.json"
# Data fields that do not change which image a record index holds or how it is corrupted.
_LAYOUT_ONLY = ("batch_size", "token_budget", "shuffle", "num_epochs", "worker_count",
                "max_skip_ratio")
BUILD_COMMAND = "python -m robust_u1_jax.recover --config <the reasoning config> --cache_dir {dir}"


# Data fields that decide which records fall into each step (the steps a cache covers).
_STEP_LAYOUT = ("batch_size", "token_budget", "shuffle")


def _step_layout(config) -> dict[str, Any]:
  return json.loads(json.dumps({k: config.data.get(k) for k in _STEP_LAYOUT}))


def record_path(directory: str, index: int, epoch: int) -> str:
  return os.path.join(directory, f"epoch_{int(epoch):04d}", f"{int(index):09d}.png")


def model_files(config: ml_collections.ConfigDict) -> str:
  """The recovery model by its files (a digest of `files.files_fingerprint`), however init_from
  names it (an earlier stage's workdir, its model/, a trailing /); 'random' for random weights,
  which the seed decides."""
  from robust_u1_jax.training import run_setup

  return run_setup.init_files(config, relative=False)


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the cached images depend on: the recovery model and sampler, the records' corruption."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in _LAYOUT_ONLY}
  return {"model_files": model_files(config), "seed": config.seed,
          "instruction": config.instruction, "recovery_steps": config.reason.recovery_steps,
          "guidance": config.guidance.to_dict(), "data": data}


def _differences(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, Mapping) and isinstance(y, Mapping):
      out += _differences(x, y, f"{prefix}{key}.")
    elif x != y:
      out.append(f"{prefix}{key}: cache {x!r}, config {y!r}")
  return out


def _checked_manifest(directory: str, config) -> dict[str, Any]:
  """The cache's manifest, refused (ConfigError) where it was built for another config."""
  path = os.path.join(directory, MANIFEST)
  manifest = files.read_json(path)
  diff = _differences(manifest["fingerprint"], json.loads(json.dumps(fingerprint(config))))
  if any(d.startswith("model_files:") for d in diff):  # digests say little: name the models
    # (A manifest written before the digest kept init_from in its fingerprint.)
    built_from = manifest.get("init_from", manifest["fingerprint"].get("init_from"))
    diff = [d for d in diff if not d.startswith(("model_files:", "init_from:"))] + [
        f"the model: built from {built_from!r} as its files were then, and "
        f"init_from {config.init_from!r} has other files (another model, or one written again)"]
  if diff:
    raise config_lib.ConfigError(f"{path}: the recovery cache was built for another config ("
                     + "; ".join(diff) + "); rebuild it into an empty directory")
  return manifest


@dataclasses.dataclass(frozen=True)
class RecoveryCache:
  directory: str

  @classmethod
  def open(cls, directory: str, config) -> RecoveryCache:
    """The cache a reasoning run reads; checks it was built for this config."""
    if not directory:
      raise config_lib.ConfigError(
          "reason.recovered_images='cache' needs reason.recovery_cache: the directory written by "
          f"`{BUILD_COMMAND.format(dir='DIR')}`")
    if not os.path.exists(os.path.join(directory, MANIFEST)):
      raise FileNotFoundError(f"{directory}: no {MANIFEST}, so not a recovery cache; build it "
                              f"with `{BUILD_COMMAND.format(dir=directory)}`")
    covered = _checked_manifest(directory, config).get("covered")
    # Checked here, at start: a missing record is otherwise found at the step that reads it,
    # losing the steps since the last checkpoint.
    if (covered and covered["layout"] == _step_layout(config)
        and config.total_steps > covered["steps"]):
      raise config_lib.ConfigError(
          f"{os.path.join(directory, MANIFEST)}: the recovery cache covers the first "
          f"{covered['steps']} steps of this run's batches, and the run has total_steps "
          f"{config.total_steps}: extend it with `{BUILD_COMMAND.format(dir=directory)} --steps "
          f"{config.total_steps}` (it skips what exists)")
    return cls(directory)

  def load(self, sample: Mapping[str, Any]) -> np.ndarray:
    path = record_path(self.directory, sample["index"], sample["epoch"])
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"{path}: no recovery of record {int(sample['index'])} (epoch {int(sample['epoch'])}) "
          "in the cache; it holds the records of the steps it was built for: rebuild with "
          f"--steps at least the run's total_steps (`{BUILD_COMMAND.format(dir=self.directory)}`"
          " resumes, skipping what exists)")
    image = np.asarray(Image.open(path).convert("RGB"))
    if image.shape != sample["corrupted"].shape:
      raise config_lib.ConfigError(
          f"{path}: recovery of {image.shape[:2]} for a corrupted image of "
          f"{sample['corrupted'].shape[:2]}; rebuild the cache into an empty directory")
    return image

  def load_batch(self, batch: Mapping[str, Any]) -> list[list[np.ndarray]]:
    """recovered[row][sample] for a pipeline batch (packed or not)."""
    return [[self.load(s) for s in row] for row in packing.batch_samples(batch)]


def _write_png(path: str, image: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with files.atomic_write(path) as f:
    Image.fromarray(image).save(f, format="PNG")


def build(config: ml_collections.ConfigDict, directory: str, *, steps: int = 0,
          progress: bool = True) -> dict[str, Any]:
  """Writes the recoveries of every record the run reads in `steps` steps (0: total_steps).

  Returns this process's counts, {'written', 'skipped': there before this build, 'repeated':
  records the run reads again (a bad record's replacement is another record; a second epoch)},
  and 'bad': the data's bad-records summary line, None when every record was good.
  """
  from flax import nnx

  from robust_u1_jax import progress
  from robust_u1_jax.data import multihost, pipeline as pipeline_lib
  from robust_u1_jax.data import tokenizer as tokenizer_lib
  from robust_u1_jax.inference import images as images_lib
  from robust_u1_jax.inference import recovery as recovery_lib
  from robust_u1_jax.training import run_setup

  steps = steps or config.total_steps
  # The trainer's own setup: the same model (checked against the data config) on the same mesh;
  # first, so a config that cannot run leaves no manifest behind.
  ctx = run_setup.make_context(config)
  mesh, tokenizer, markers = ctx.mesh, ctx.tokenizer, ctx.markers
  os.makedirs(directory, exist_ok=True)
  manifest = os.path.join(directory, MANIFEST)
  if os.path.exists(manifest):
    _checked_manifest(directory, config)
  elif jax.process_index() == 0:
    with files.atomic_write(manifest, "w") as f:  # a half-written manifest would block the cache
      json.dump({"fingerprint": fingerprint(config), "stage": config.stage,
                 "init_from": config.init_from}, f, indent=1)

  instruction = tokenizer_lib.encode_text_block(tokenizer, config.instruction)
  graphdef, weights = nnx.split(ctx.model)
  sampler = recovery_lib.Sampler.from_config(config, config.reason.recovery_steps)

  @jax.jit
  def recover(weights, recovery, keys):
    # Noise from (seed, index, epoch) per image; the posterior mean of the corrupted image.
    _, images = recovery_lib.recover(nnx.merge(graphdef, weights), recovery, sampler, keys)
    return images_lib.quantize(images)

  base_key = jax.random.PRNGKey(config.seed)
  process_index, process_count = multihost.data_shard(mesh)
  counts = {"written": 0, "skipped": 0, "repeated": 0}
  seen: set[str] = set()  # this build's records
  with pipeline_lib.make_pipeline(
      config.data, seed=config.seed, process_index=process_index, process_count=process_count,
      tokenizer=tokenizer, stage=config.stage, instruction=config.instruction) as data:
    bar = progress.bar(range(steps), desc="recovering", unit="step", disable=not progress,
                    dynamic_ncols=True)
    for _ in bar:
      pending = []
      for s in (s for row in packing.batch_samples(next(data)) for s in row):
        path = record_path(directory, s["index"], s["epoch"])
        if path in seen:
          counts["repeated"] += 1
        elif os.path.exists(path):
          counts["skipped"] += 1
        else:
          pending.append(s)
        seen.add(path)
      for members in recovery_lib.size_groups(pending):
        samples = [pending[i] for i in members]
        inputs = recovery_lib.recovery_inputs(samples, ctx.model_config, markers, instruction)
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(base_key, int(s["index"])),
                                             int(s["epoch"])) for s in samples])
        with jax.set_mesh(mesh):
          images = np.asarray(jax.device_get(recover(weights, inputs, keys)))
        for sample, image in zip(samples, images):
          _write_png(record_path(directory, sample["index"], sample["epoch"]), image)
        counts["written"] += len(samples)
      bar.set_postfix(counts)
    counts["bad"] = data.tracker.summary()
  if jax.process_index() == 0:
    _record_coverage(manifest, config, steps)
  return counts


def _record_coverage(manifest: str, config, steps: int) -> None:
  """Notes in the manifest the steps a finished build covered (the most for one layout)."""
  contents = files.read_json(manifest)
  before = contents.get("covered") or {}
  layout = _step_layout(config)
  if before.get("layout") == layout:
    steps = max(steps, before["steps"])
  contents["covered"] = {"steps": steps, "layout": layout}
  with files.atomic_write(manifest, "w") as f:
    json.dump(contents, f, indent=1)
