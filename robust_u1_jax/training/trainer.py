"""The training loop shared by every stage: mesh, model, state, data, checkpoints, reporting.

A stage (sft.py, rl.py, ...) contributes three things through `StageSpec`: which parameters it
trains, how a pipeline batch becomes the step's device inputs (host side, deterministic in
(seed, step) so a resumed run sees the same inputs), and the jitted step
`step(state, inputs) -> (state, metrics)`. Everything else lives here once. The model is a Bagel
unless the stage brings its own (`StageSpec.model` and `save`: the bootstrap CLIP).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from robust_u1_jax import sharding
from robust_u1_jax.data import multihost, pipeline as pipeline_lib
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.models import bagel as bagel_lib
from robust_u1_jax.models import sequence
from robust_u1_jax.training import checkpoint as checkpoint_lib
from robust_u1_jax.training import lora as lora_lib
from robust_u1_jax.training import metrics_log
from robust_u1_jax.training import state as state_lib


@dataclasses.dataclass
class StageSpec:
  trainable: tuple[str, ...]
  # (pipeline batch, numpy Generator for this step) -> device-input pytree of numpy arrays.
  host_inputs: Callable[[dict, np.random.Generator], Any]
  # (graphdef, optimizer) -> step(state, inputs) -> (state, metrics). The step builds its model
  # with `state.merge_model(graphdef, params, frozen)`: with LoRA on, graphdef is a
  # lora.LoraGraphDef and params the LoRA factors (training/lora.py).
  make_step: Callable[[nnx.GraphDef, Any], Callable]
  samples_per_step: int
  aux: dict[str, Any] = dataclasses.field(default_factory=dict)
  reference: bool = False  # keep a frozen copy of the initial trainable params in aux
  # (graphdef, state) -> (image columns for a grid, scalar metrics); run every eval_every steps.
  evaluate: Callable | None = None
  # A model of the stage's own, trained instead of the Bagel (built on the run's mesh).
  model: nnx.Module | None = None
  # (workdir, graphdef, state, config) -> None: writes the final model; default `save_model`.
  save: Callable | None = None
  # The pipeline stage (data/pipeline.py STAGES) the batches come from; default config.stage.
  data_stage: str | None = None


class RunContext:
  """What a stage builder may use: the model, tokenizer and run settings.

  `model` is built on first use (from a function given in its place), so a stage that trains a
  model of its own never pays for building the Bagel.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               model: bagel_lib.Bagel | Callable[[], bagel_lib.Bagel], tokenizer: Any,
               markers: sequence.Markers):
    self.config, self.mesh, self.tokenizer, self.markers = config, mesh, tokenizer, markers
    self._model = model

  @property
  def model(self) -> bagel_lib.Bagel:
    if not isinstance(self._model, nnx.Module):
      self._model = self._model()
    return self._model


def preset(name: str, vocab_size: int | None = None, **llm_overrides) -> bagel_lib.BagelConfig:
  presets = {"tiny": bagel_lib.BagelConfig.tiny, "bagel_7b": bagel_lib.BagelConfig.bagel_7b}
  if name not in presets:
    raise ValueError(f"config.model={name!r} is unknown; allowed: {', '.join(presets)}")
  if vocab_size:
    llm_overrides["vocab_size"] = vocab_size
  return presets[name](**llm_overrides)


def init_model(config: ml_collections.ConfigDict, mesh, tokenizer) -> bagel_lib.Bagel:
  """`init_from`: 'random' (a preset sized to the tokenizer), a BAGEL/Robust-U1 model directory,
  an Orbax model checkpoint, or the workdir of an earlier stage (its `model/`)."""
  from robust_u1_jax.checkpoints import orbax_io  # heavy imports only when loading weights

  source = config.init_from
  dtype = jnp.dtype(config.compute_dtype)
  param_dtype = jnp.dtype(config.param_dtype)
  if source == "random":
    vocab = max(len(tokenizer), 64) if config.model == "tiny" else None
    model_config = preset(config.model, vocab, dtype=dtype, param_dtype=param_dtype,
                          remat=config.remat)
    return sharding.create_sharded(
        lambda: bagel_lib.Bagel(model_config, rngs=nnx.Rngs(config.seed)),
        bagel_lib.COMPONENTS, mesh)
  if os.path.isdir(os.path.join(source, "model")):  # a workdir of an earlier stage
    source = os.path.join(source, "model")
  return orbax_io.load_pretrained(source, mesh=mesh, dtype=dtype, param_dtype=param_dtype,
                                  remat=config.remat, progress=True)


def train(config: ml_collections.ConfigDict, workdir: str,
          build_stage: Callable[[RunContext], StageSpec]) -> list[dict[str, float]]:
  """Runs (or resumes) a stage in `workdir`; returns the logged metric rows of this process."""
  done = checkpoint_lib.latest_step(workdir)
  if done is not None and done >= config.total_steps and os.path.isdir(
      os.path.join(workdir, "model")):
    # Before building or compiling anything: a finished stage answers at once.
    print(f"{workdir} is already at the final step {done}; nothing to train (model: "
          f"{os.path.join(workdir, 'model')})", flush=True)
    return []
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = tokenizer_lib.load_tokenizer(config.data.tokenizer_dir or None)
  special = tokenizer_lib.special_token_ids(tokenizer)
  markers = sequence.Markers(special["vision_start"], special["vision_end"])
  # The model is built outside the mesh context: parameters get their shardings from the
  # explicit rules in `sharding`, and the logical names must not be read as mesh axes.
  ctx = RunContext(config, mesh, lambda: init_model(config, mesh, tokenizer), tokenizer, markers)
  spec = build_stage(ctx)
  model = spec.model if spec.model is not None else ctx.model
  graphdef, params, frozen = state_lib.split_model(model, spec.trainable)
  del model
  # With LoRA the steps get a LoraGraphDef: params become the LoRA factors, frozen the whole base.
  graphdef, params, frozen = apply_lora(config, graphdef, params, frozen)
  tx = state_lib.make_optimizer(config.optimizer, config.total_steps)
  if spec.reference:
    # With LoRA the initial factors (B = 0) are the base model itself.
    spec.aux["reference"] = jax.tree.map(lambda x: x.copy(), params)
  state = state_creator(config, tx, params)(params, frozen, jax.random.PRNGKey(config.seed),
                                            spec.aux)
  step_fn = jit_step(spec, graphdef, tx, jax.tree.map(lambda x: x.sharding, state))
  with jax.set_mesh(mesh):

    process_index, process_count = multihost.data_shard(mesh)
    if process_count > 1 and not config.data.token_budget and not config.data.text_pad_to:
      raise ValueError("a multi-host run of unpacked batches needs data.text_pad_to > 0 (the "
                       "longest text in tokens), so every host builds rows of one length")
    data = pipeline_lib.make_pipeline(config.data, seed=config.seed, process_index=process_index,
                                      process_count=process_count, tokenizer=tokenizer,
                                      stage=spec.data_stage or config.stage)
    ckpt = checkpoint_lib.Checkpointer(workdir, every=config.checkpoint_every,
                                       keep=config.keep_checkpoints)
    start = 0
    restored = ckpt.restore(checkpoint_lib.abstract_like(state), data)
    if restored is not None:
      start, state, _ = restored
      logging.info("resumed %s from step %d", workdir, start)
      print(f"resuming from step {start} in {workdir}", flush=True)
    if start >= config.total_steps:
      print(f"{workdir} already holds the final step {start}; nothing to train", flush=True)
      ckpt.close()
      data.close()
      return []
    ckpt.install_signal_handlers()

    def device_inputs(step: int):
      batch = next(data)
      host = spec.host_inputs(batch, np.random.default_rng([config.seed, step]))
      return multihost.global_batch(host, mesh)

    inputs = device_inputs(start)
    # FLOPs from the lowered program (no second compile; the jit cache compiles on first call).
    step_flops = metrics_log.compiled_flops(step_fn.lower(state, inputs))
    log = metrics_log.MetricsLogger(
        workdir, total_steps=config.total_steps, every=config.log_every, start_step=start,
        tensorboard=config.tensorboard, step_flops=step_flops)
    meta = {"stage": config.stage, "config": config.to_json_best_effort()}
    try:
      for step in range(start + 1, config.total_steps + 1):
        # Stages whose rows vary in length (bucketed) compile once per bucket.
        state, metrics = step_fn(state, inputs)
        row = log.log_step(step, metrics, samples=spec.samples_per_step)
        if row is not None:
          checkpoint_lib.check_finite(step, row)
        if spec.evaluate is not None and step % config.eval_every == 0:
          columns, eval_metrics = spec.evaluate(*plain_model_state(graphdef, state))
          log.log_eval(step, eval_metrics, metrics_log.image_grid(columns),
                       os.path.join(workdir, "images", f"step_{step:07d}.png"))
        if step % config.checkpoint_every == 0 or ckpt.stop_requested or \
            step == config.total_steps:
          checkpoint_lib.check_finite(step, jax.device_get(metrics))
          ckpt.save(step, state, data, {**meta, "step": step}, force=True)
        if ckpt.stop_requested:
          print(f"stopped at step {step}; checkpoint saved in {ckpt.directory}", flush=True)
          break
        if step < config.total_steps:
          inputs = device_inputs(step)
      ckpt.wait()
      (spec.save or save_model)(workdir, graphdef, state, config)
    finally:
      log.close()
      ckpt.close()
      data.close()
  return log.history


def state_creator(config: ml_collections.ConfigDict, tx, params) -> Callable:
  """jitted (params, frozen, rng, aux) -> TrainState, optimizer state and EMA sharded like the
  parameters (`params` may be arrays or sharded ShapeDtypeStructs)."""
  shardings = jax.tree.map(lambda x: x.sharding, params)
  ema = config.optimizer.ema_decay > 0
  return jax.jit(lambda p, f, r, a: state_lib.create_state(p, f, tx, r, ema, a, shardings))


def jit_step(spec: StageSpec, graphdef, tx, state_shardings) -> Callable:
  """The stage's step, jitted with the state donated and returned on the shardings it came in
  with (so step 2 reuses step 1's executable and the donated buffers)."""
  return jax.jit(spec.make_step(graphdef, tx), donate_argnums=0,
                 out_shardings=(state_shardings, None))


def apply_lora(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: nnx.State,
               frozen: nnx.State):
  """`split_model`'s (graphdef, trainable, frozen), or with `config.lora.rank > 0` (LoraGraphDef,
  LoRA factors of the targeted trainable kernels, the whole base model); see training/lora.py."""
  lo = config.get("lora")
  if lo is None or lo.rank == 0:
    return graphdef, params, frozen
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x10AA)
  view, factors, base = lora_lib.setup(graphdef, params, frozen, lo.rank, lo.alpha, key,
                                       lo.targets)
  total = sum(int(x.size) for x in jax.tree.leaves(params))
  print(f"LoRA rank {lo.rank}: {lora_lib.num_params(factors):,} trainable parameters on "
        f"{len(jax.tree.leaves(factors)) // 2} kernels (of {total:,} the stage would train "
        "fully)", flush=True)
  return view, factors, base


def plain_model_state(graphdef, state: state_lib.TrainState
                      ) -> tuple[nnx.GraphDef, state_lib.TrainState]:
  """(graphdef, state) with a plain graph definition, as a stage's `evaluate` expects: with LoRA,
  the state's params are the merged weights (of the EMA factors when kept) and frozen is empty."""
  if not isinstance(graphdef, lora_lib.LoraGraphDef):
    return graphdef, state
  factors = state.ema if state.ema is not None else state.params
  # Eager: only the targeted kernels get new arrays; every other one is passed through, not copied.
  merged = graphdef.merge_state(factors, state.frozen)
  return graphdef.graphdef, state.replace(params=merged, frozen=nnx.State({}), ema=None)


def save_model(workdir: str, graphdef, state: state_lib.TrainState,
               config: ml_collections.ConfigDict) -> None:
  """The final model (EMA weights when kept) as an Orbax checkpoint in `workdir/model`, the form
  later stages' `init_from`, `convert --to hf`, `recover` and `answer` read: with the tokenizer
  files and the image resize rules of the run beside it. With LoRA (`graphdef` a LoraGraphDef)
  the saved model holds the merged weights W + scale * A @ B: a plain model, no factors."""
  params = state.ema if state.ema is not None else state.params
  write_model(state_lib.merge_model(graphdef, params, state.frozen), workdir, config)


def write_model(model: bagel_lib.Bagel, workdir: str, config: ml_collections.ConfigDict) -> None:
  """`save_model`'s output for a merged model: `workdir/model` with tokenizer and image rules."""
  from robust_u1_jax.checkpoints import orbax_io
  from robust_u1_jax.inference import images as images_lib

  path = os.path.join(workdir, "model")
  tokenizer_dir = config.data.tokenizer_dir or tokenizer_lib.default_tokenizer_dir()
  orbax_io.save_orbax(model, path, tokenizer_dir=tokenizer_dir, overwrite=True)
  if jax.process_index() == 0:
    images_lib.ImageRules.from_data_config(config.data).save(path)
