"""The training loop shared by every stage: state, data, checkpoints, reporting.

A stage (sft.py, rl.py, ...) is a builder `build(ctx: RunContext) -> StageSpec` (the contract in
stage_spec.py): which parameters it trains, how a pipeline batch becomes the step's device inputs
(host side, deterministic in (seed, step) so a resumed run sees the same inputs), and the jitted
step `step(state, inputs) -> (state, metrics)`. The context (mesh, tokenizer, markers, model) comes
from `run_setup.make_context`, as for the recovery cache and the AOT check; everything else lives
here once. The model is a Bagel unless the stage brings its own (`StageSpec.model` and `save`: the
bootstrap CLIP).

A trainer step takes one pipeline batch and makes one gradient step (RL: `rl.updates_per_rollout`
of them on one rollout); with `optimizer.grad_accum_steps = k` the optimizer updates the
parameters (and the EMA) on every k-th (state.py). `total_steps` and every `*_every` count trainer
steps. `workdir/model` is written when the run reaches its last step; a stopped run leaves its
checkpoint, and the same command resumes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from robust_u1_jax import config_lib, flops
from robust_u1_jax.data import bad_records, multihost, pipeline as pipeline_lib
from robust_u1_jax.training import checkpoint as checkpoint_lib
from robust_u1_jax.training import lora as lora_lib
from robust_u1_jax.training import metrics_log, run_setup, shared_workdir, stages
from robust_u1_jax.training import state as state_lib
from robust_u1_jax.training.stage_spec import RunContext, StageSpec


@contextlib.contextmanager
def _removed_if_left_empty(workdir: str) -> Iterator[None]:
  """Creates `workdir` (and its missing parents) for the block, and removes what it created again
  where the block fails leaving it empty of files (a bad init_from, recovery cache or LoRA target
  found while the stage is built; images the first batch cannot take, with only an empty
  checkpoints/ made)."""
  path, first_created = os.path.abspath(workdir), None
  while not os.path.exists(path):
    first_created, path = path, os.path.dirname(path)
  os.makedirs(workdir, exist_ok=True)
  try:
    yield
  except BaseException:
    path = os.path.abspath(workdir)
    if first_created is not None:  # folders the run made inside it and left empty, deepest first
      for folder, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count(os.sep))[:-1]:
        with contextlib.suppress(OSError):
          os.rmdir(folder)
    while first_created is not None:
      try:
        os.rmdir(path)  # only an empty folder
      except FileNotFoundError:
        pass  # another process removed it already
      except OSError:
        break
      if path == first_created:
        break
      path = os.path.dirname(path)
    raise


# What the learning-rate schedule spans: total_steps x rl.updates_per_rollout updates (RL's
# update_optimizer), grad_accum_steps micro-batches each.
# The metadata key that marks a checkpoint holding `state.saved_part` (the trained part) only.
SAVED_PART = "saved_part"
SCHEDULE_FIELDS = ("total_steps", "rl.updates_per_rollout", "optimizer.grad_accum_steps")


def evaluates_at(config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether a stage with an evaluation runs it after `step`: every `eval_every` steps and at the
  last (a run shorter than eval_every still shows its grid), never with eval_every 0."""
  every = config.eval_every
  return bool(every) and (step % every == 0 or step == config.total_steps)


def schedule_note(changed: list[str]) -> str | None:
  """What a resumed run's changed fields (names, `config_lib.differing_fields`) do to its
  learning-rate schedule, when one of them sets how many updates it spans."""
  spans = [field for field in changed if field in SCHEDULE_FIELDS]
  if not spans:
    return None
  return (f"(the learning-rate schedule spans the run's optimizer updates, which "
          f"{' and '.join(spans)} set{'s' if len(spans) == 1 else ''}: the steps from here on "
          "follow the new schedule, so the run is not the one either setting alone would train)")


def optimizer_updates(config: ml_collections.ConfigDict) -> int:
  """The optimizer updates a run makes, which its EMA averages: total_steps gradient steps (RL:
  rl.updates_per_rollout each), one update per optimizer.grad_accum_steps of them."""
  per_step = config.rl.updates_per_rollout if "rl" in config else 1
  return -(-config.total_steps * per_step // config.optimizer.grad_accum_steps)


def ema_note(config: ml_collections.ConfigDict) -> str | None:
  """A note when the model a run writes, its EMA (which starts at the initial weights), still
  holds a fifth or more of those weights after the last update: a run's model need not be what
  its steps trained (the demo's reasoning part holds 74 % of its RL model, by choice:
  configs/demo.py)."""
  decay, updates = float(config.optimizer.ema_decay), optimizer_updates(config)
  kept = decay ** updates if decay > 0 else 0.0
  if kept < 0.2:
    return None
  lower = f"at 0.99: {0.99 ** updates:.0%}; " if decay > 0.99 else ""
  return (f"note: the model this run writes is the EMA of its weights (optimizer.ema_decay="
          f"{decay:g}), which starts at the initial weights and still holds {kept:.0%} of them "
          f"after {updates} optimizer updates ({lower}at 0: none)")


def check_shards_agree(config: ml_collections.ConfigDict, process_count: int,
                       data_stage: str) -> None:
  """Refuses data that `process_count` data shards would batch differently: before the model is
  built, so a pod reads no weights to learn it."""
  if process_count == 1:
    return
  if not config.data.token_budget and not pipeline_lib.fixed_rows(config.data, data_stage):
    raise config_lib.ConfigError(
        "a multi-host run of unpacked batches needs data.text_pad_to > 0 (the longest text in "
        "tokens) or data.text_widths for each text field, so every host builds rows of one "
        "length")
  if config.data.token_budget and config.data.num_epochs:
    raise config_lib.ConfigError(
        f"data.num_epochs = {config.data.num_epochs} with packed rows (data.token_budget) "
        f"read as {process_count} data shards: each process packs its own records, so their "
        "data would end at different steps; use data.num_epochs = 0 (the run is total_steps "
        "long)")


# Settings that shape the trained state: a checkpoint saved under others cannot be read into it
# (Orbax's shape errors, one per checkpoint, named the cause last).
STATE_SHAPING = ("lora.rank", "lora.targets")


def check_same_state(saved: dict | None, config: ml_collections.ConfigDict,
                     ignore: Collection[str] = (), where: str = "the checkpoints") -> None:
  """Refuses, before anything is built, to resume checkpoints (in `where`) whose config (`saved`)
  trained a state of another shape than `config`'s."""
  changed = [d for d in (config_lib.differing_fields(saved, config, ignore) if saved else [])
             if d[0] in STATE_SHAPING]
  if changed:
    raise checkpoint_lib.UnreadableCheckpoints(
        f"{where}: saved by a run that trained a state of another shape: "
        f"{'; '.join(config_lib.described(changed))}; resume with the checkpoint's settings, or "
        "give another --workdir to train with these")


def check_same_base(meta: dict | None, config: ml_collections.ConfigDict, base: str) -> None:
  """Refuses to resume a run onto another base model than it started from. Its checkpoint holds
  only the weights the run trains (its trainable patterns', or LoRA's factors); the rest is read
  from init_from again, so a changed one would put them on a model they were not trained with.
  `base`: `run_setup.init_files(config)`. A checkpoint written before the stamp is not checked."""
  if not meta or meta.get("init_files") in (None, base):
    return
  was = (checkpoint_lib.config_of(meta) or {}).get("init_from")
  now = config.init_from
  what = (f"init_from {now!r} holds another model than when this run started (its files changed)"
          if was == now else f"init_from {now!r} is not the model this run started from ({was!r})")
  lora = config.get("lora")
  trained = ("its LoRA factors" if lora and lora.rank
             else "the weights its trainable patterns select")
  raise config_lib.ConfigError(
      f"{what}: its checkpoint holds only {trained}, the rest is read from init_from, so the "
      "resumed run would put them on another base; resume with the model it started from (a "
      "copy keeps its files' times with `cp -a`), or start again in another --workdir")


def train(config: ml_collections.ConfigDict, workdir: str,
          build_stage: Callable[[RunContext], StageSpec], *,
          same_training: Collection[str] = ()) -> list[dict[str, float]]:
  """Runs (or resumes) a stage in `workdir`; returns the logged metric rows of this process.
  Stopped by a signal, it saves a checkpoint and raises `checkpoint.Stopped` (the rows in its
  `history`). `same_training`: fields the caller counts as changing nothing the run trains (the
  demo's: the paths its parts are chained by, which move with a copied workdir, and how often a
  part logs or evaluates), left out where the run compares its settings with its checkpoint's."""
  built = stages.stage_of(build_stage)
  if built not in (None, config.stage):  # it would read config.<its stage> and fail inside
    raise config_lib.ConfigError(
        f"a config of stage {config.stage!r} given the {built!r} stage's builder; give "
        f"stages.builder(config.stage)")
  shared_workdir.check(workdir)  # several processes: one folder, or one error line on each
  # Decided together: a process that returned here alone would leave its peers waiting in their
  # first collective.
  if multihost.on_every_process(checkpoint_lib.finished(workdir, config.total_steps)):
    # Before building or compiling anything: a finished stage answers at once.
    print(f"{workdir} is already at the final step {checkpoint_lib.latest_step(workdir)}; "
          f"nothing to train (model: {os.path.join(workdir, 'model')})", flush=True)
    saved = checkpoint_lib.saved_config(workdir)
    if changed := config_lib.setting_differences(saved, config, same_training) if saved else []:
      print(f"  its model was trained with settings other than these: {'; '.join(changed)}; "
            "give another --workdir to train with them", flush=True)
    return []
  kept_meta = checkpoint_lib.saved_meta(workdir)  # read once for the checks of a resume
  check_same_state(kept_meta and checkpoint_lib.config_of(kept_meta), config, same_training,
                   os.path.join(workdir, "checkpoints"))
  base = run_setup.init_files(config)
  if "init_from" not in same_training:
    check_same_base(kept_meta, config, base)
  ctx = run_setup.make_context(config)  # checks the config against the model before building
  mesh, tokenizer = ctx.mesh, ctx.tokenizer
  multihost.check_batch_fits_mesh(config.data.batch_size, mesh)  # before the model is built
  # The data shard this process reads: processes whose devices share batch rows read one.
  process_index, process_count = multihost.data_shard(mesh)
  if built is not None:  # a builder of our own: its data stage is known before it runs
    check_shards_agree(config, process_count, stages.DATA_STAGES.get(built, built))
  if (note := ema_note(config)) and jax.process_index() == 0:
    print(note, flush=True)
  with contextlib.ExitStack() as stack:
    # A run refused at start-up, or at its first step, leaves no folder behind.
    stack.enter_context(_removed_if_left_empty(workdir))
    spec = build_stage(ctx)
    check_state_fits_host(config, ctx, spec.trainable,
                          f"the {config.stage} config {config.get('variant', '')!r}", spec.model)
    graphdef, state, step_fn = initial_state(config, ctx, spec)
    stack.enter_context(jax.set_mesh(mesh))  # after the build: parameters place themselves

    replicas = jax.process_count() // process_count  # processes that read one data shard
    data_stage = spec.data_stage or config.stage
    if built is None:
      check_shards_agree(config, process_count, data_stage)
    several = jax.process_count() > 1
    # Several processes enforce data.max_skip_ratio on their totals together, at log steps.
    data = pipeline_lib.make_pipeline(config.data, seed=config.seed, process_index=process_index,
                                      process_count=process_count, tokenizer=tokenizer,
                                      stage=data_stage, instruction=config.get("instruction"),
                                      format_rows=inputs_and_work(ctx, spec),
                                      enforce_skip_ratio=not several)
    ckpt = checkpoint_lib.Checkpointer(workdir, every=config.checkpoint_every,
                                       keep=config.keep_checkpoints)
    start, pending = 0, []
    # A checkpoint holds the trained part of the state (frozen weights and reward models are
    # built from the config above, as at the start); one written before it did (no SAVED_PART in
    # its metadata) holds the whole state and is read whole.
    trained_part, whole = (checkpoint_lib.abstract_like(tree)
                           for tree in (state_lib.saved_part(state), state))
    try:
      restored = ckpt.restore(trained_part, data, target_for=lambda meta: (
          trained_part if meta.get(SAVED_PART) else whole))
    except checkpoint_lib.UnreadableCheckpoints as e:
      # A setting that changes the state's tree (lora.rank) or the data's (token_budget) leaves
      # every checkpoint unreadable: name it.
      saved = checkpoint_lib.saved_config(workdir)
      changed = config_lib.setting_differences(saved, config, same_training) if saved else []
      if changed:
        raise checkpoint_lib.UnreadableCheckpoints(
            f"{e}; this run's settings differ from the checkpoint's: {'; '.join(changed)}"
        ) from None
      raise
    if restored is not None:
      start, trained, meta = restored
      state = state.replace(**trained) if isinstance(trained, dict) else trained
      pending = meta.get("log_window", [])
      logging.info("resumed %s from step %d", workdir, start)
      print(f"resuming from step {start} in {workdir}", flush=True)
      if ckpt.stopped_for_bad_records(start):
        data.tracker.set_aside()
      saved = checkpoint_lib.config_of(meta)
      differences = config_lib.differing_fields(saved, config, same_training) if saved else []
      if differences:
        print(f"  with settings other than its checkpoint's: "
              f"{'; '.join(config_lib.described(differences))}", flush=True)
      note = schedule_note([field for field, _, _ in differences])
      if note and start < config.total_steps:  # no step left to follow a schedule
        print(f"  {note}", flush=True)
    elif os.path.isdir(os.path.join(workdir, "model")):
      # A finished run whose checkpoints were deleted: it trains again, and nothing said why.
      print(f"{workdir} holds a model but no checkpoint in {ckpt.directory}: training again "
            "from step 0, and its model will be written over", flush=True)
    if start >= config.total_steps:
      # `finished` said no: the final checkpoint without its model, a run stopped while it wrote
      # the model. Written now from that checkpoint.
      if start > config.total_steps:  # a run does not go back to an earlier step
        print(f"{workdir}'s checkpoint is of step {start}, past total_steps={config.total_steps}: "
              f"writing the model of step {start} (for a shorter run, give another --workdir)",
              flush=True)
      else:
        print(f"{workdir} already holds the final step {start}; writing its model", flush=True)
      ckpt.close()
      data.close()
      (spec.save or save_model)(workdir, graphdef, state, config)
      return []
    ckpt.install_signal_handlers()

    def device_inputs():
      try:
        host, counts = next(data)
      except StopIteration:
        if several:  # every process ends here at this step: bad records first, as one would
          data.check_skip_ratio(replicas, final=True)
        raise config_lib.ConfigError(
            f"data.num_epochs = {config.data.num_epochs}: the data ran out before step "
            f"{config.total_steps} (total_steps); raise num_epochs, or 0 to repeat the data "
            "for as many steps as the run takes") from None
      samples, work = counts
      return multihost.global_batch(host, mesh), samples, None if work is None else work["total"]

    inputs, samples, work = device_inputs()
    # FLOPs from the lowered program (no second compile; the jit cache compiles on first call).
    step_flops = metrics_log.compiled_flops(step_fn.lower(state, inputs))
    log = metrics_log.MetricsLogger(
        workdir, total_steps=config.total_steps, every=config.log_every, start_step=start,
        tensorboard=config.tensorboard, step_flops=step_flops,
        replicas=replicas, pending=pending)
    meta = {"stage": config.stage, "config": config.to_json_best_effort(), "init_files": base}

    def save_checkpoint(step: int) -> None:  # `state` and the log window as they are now
      ckpt.save(step, state_lib.saved_part(state), data,
                {**meta, "step": step, "log_window": log.pending(), SAVED_PART: True}, force=True)

    # Logged beside the step's metrics: the rate of the step's (first) optimizer update. Computed
    # for every update once: a per-step call would wait for the step to read back its result.
    accum = config.optimizer.grad_accum_steps
    rates = np.asarray(jax.vmap(state_lib.learning_rate_schedule(
        config.optimizer, config.total_steps))(np.arange(-(-config.total_steps // accum))))
    try:
      for step in range(start + 1, config.total_steps + 1):
        # Stages whose rows vary in length (bucketed) compile once per bucket.
        state, metrics = step_fn(state, inputs)
        rate = {"learning_rate": rates[(step - 1) // accum]}
        row = log.log_step(step, {**metrics, **rate}, samples=spec.samples_per_step,
                           process_samples=samples, model_flops=work)
        if row is not None:  # a written window: the same steps on every process
          checkpoint_lib.check_finite(step, row, kept=ckpt.latest_step)
          if several:
            data.check_skip_ratio(replicas)
        if spec.evaluate is not None and evaluates_at(config, step):
          columns, eval_metrics = spec.evaluate(*plain_model_state(graphdef, state))
          log.log_eval(step, eval_metrics, columns,
                       os.path.join(workdir, "images", f"step_{step:07d}.png"))
        stop = ckpt.should_stop()
        if step % config.checkpoint_every == 0 or stop or step == config.total_steps:
          checkpoint_lib.check_finite(step, jax.device_get(metrics), kept=ckpt.latest_step)
          save_checkpoint(step)
        if stop:
          # Its caller says where it stopped, below the bar (train.py: checkpoint.results_line;
          # the demo: its part and step), from the Stopped raised below.
          break
        if step < config.total_steps:
          inputs, samples, work = device_inputs()
      ckpt.wait()
      if step == config.total_steps:  # a stopped run has its checkpoint, not a model yet
        (spec.save or save_model)(workdir, graphdef, state, config)
    except bad_records.TooManyBadRecords:
      # Raised after a step (every process at the same one): the steps since the last checkpoint
      # trained on good records, and are kept for the run resumed on mended data.
      if ckpt.latest_step() != step:
        save_checkpoint(step)
        ckpt.wait()
      ckpt.mark_bad_records_stop(step)  # its counts are set aside when it resumes there
      print(f"checkpoint of step {step} in {ckpt.directory}: with the data mended (or "
            "data.max_skip_ratio raised) the same command resumes there", flush=True)
      raise
    finally:
      log.close()
      ckpt.close()
      data.close()
  if step < config.total_steps:  # stopped by a signal
    raise ckpt.stopped(step, log.history)
  bad = data.tracker.summary()  # a short run may end before the ratio was ever checked
  if bad and jax.process_index() == 0:  # below the progress bar, which log.close() ended
    print(bad + (" (this process's records)" if several else ""), flush=True)
  return log.history


def inputs_and_work(ctx: RunContext, spec: StageSpec) -> Callable:
  """The pipeline's last map: (batch n, generator seeded (seed, n)) -> (the step's host inputs,
  (the samples packed into this process's rows, None unpacked; `flops.step_flops` of those
  rows, None for a stage without a FLOP model)). It runs in a Grain thread ahead of the step, so
  counting costs the training thread nothing; the logger sums the processes' counts when it
  writes, `bench train_step` reads the same FLOPs."""

  def format_rows(batch, rng):
    host = spec.host_inputs(batch, rng)
    samples = int(np.sum(batch["num_samples"])) if "num_samples" in batch else None
    if spec.work is None:
      return host, (samples, None)
    return host, (samples, flops.step_flops(ctx.model_config, spec.work(host), spec.trainable))

  return format_rows


def initial_state(config: ml_collections.ConfigDict, ctx: RunContext, spec: StageSpec
                  ) -> tuple[nnx.GraphDef, state_lib.TrainState, Callable]:
  """(graphdef, initial TrainState, jitted step) of a built stage: its model (the stage's own or
  the context's) split into trainable and frozen parts, LoRA applied, the optimizer's state
  created; `bench train_step` times the same."""
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
  return graphdef, state, jit_step(spec, graphdef, tx, jax.tree.map(lambda x: x.sharding, state))


def check_state_fits_host(config: ml_collections.ConfigDict, ctx: RunContext, trainable,
                          name: str, model: nnx.Module | None = None) -> None:
  """On a CPU, refuses (ConfigError) a run whose train state alone (weights, optimizer state, EMA)
  exceeds the host's memory, counted in seconds on `model` (a stage's own, built; default the
  context's model, abstract), where building it would run for minutes before the kernel's
  out-of-memory kill. With LoRA, the weights alone count."""
  if ctx.mesh.devices.flat[0].platform != "cpu":
    return
  from robust_u1_jax.benchmarks import compiled as compiled_lib

  if model is None:
    model = run_setup.abstract_model(ctx.model_config, ctx.mesh)
  _, params, frozen = state_lib.split_model(model, trainable)
  tree = (params, frozen)
  if not config_lib.lora_enabled(config):
    tx = state_lib.make_optimizer(config.optimizer, config.total_steps)
    rng = jax.ShapeDtypeStruct((2,), np.uint32)
    tree = jax.eval_shape(state_creator(config, tx, params), params, frozen, rng, {})
  need = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  host = compiled_lib.host_memory_bytes()
  if host and need > host:
    b = lambda n: compiled_lib.format_bytes(n).strip()
    raise config_lib.ConfigError(
        f"{name}: the train state alone (weights, optimizer state, EMA) needs {b(need)}, and "
        f"this machine has {b(host)} of memory; run it on an accelerator (`bench aot` checks a "
        "config's memory on a TPU slice without one: README, \"Will it fit?\")")


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
  if not config_lib.lora_enabled(config):
    return graphdef, params, frozen
  lo = config.lora
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x10AA)
  view, factors, base = lora_lib.setup(graphdef, params, frozen, lo.rank, lo.alpha, key,
                                       lo.targets)
  total = sum(int(x.size) for x in jax.tree.leaves(params))
  leaves = jax.tree.leaves(factors)  # an (A, B) pair per kernel, stacked over the layers
  matrices = sum(int(np.prod(x.shape[:-2])) for x in leaves) // 2
  print(f"LoRA rank {lo.rank}: {lora_lib.num_params(factors):,} trainable parameters on "
        f"{len(leaves) // 2} kernels, {matrices} weight matrices over the layers (of {total:,} "
        "the stage would train fully)", flush=True)
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
  run_setup.write_model(state_lib.merge_model(graphdef, params, state.frozen), workdir, config)
