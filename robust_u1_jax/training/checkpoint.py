"""Checkpoints of a training run: train state, data iterator position and run metadata, via Orbax.

The trainer saves the trained part of its state (`state.saved_part`); any pytree can be saved.

- Saves are asynchronous (training continues while arrays are written) every `every` steps, and on
  SIGTERM/SIGINT at the end of a step, so a preempted TPU job loses nothing; the run then ends in
  `Stopped`, whose exit status (128 + the signal) tells a scheduler or `&&` that it is not
  finished. With several
  processes the stop goes through JAX's preemption service: a signal to any one process stops
  them all at one agreed step (`should_stop`), as the collective save needs; a process that
  stopped alone would wait in the save for peers still stepping.
- The data iterator's state is saved next to the train state, one JSON file per process (through
  Grain's Orbax handler), so a resumed run reads exactly the batches an uninterrupted one would.
- Restoring places every array onto the current mesh (the target's shardings), so a run can resume
  on other devices; with as many processes as saved it, since each process's data position is
  its own file (another count is refused in one line), and only from positions the data iterator
  accepts (its `check_state`: a position read in another record order is refused in one line).
- A checkpoint that cannot be read (truncated files) is reported by path, moved aside as
  `<step>.damaged` (so the step can be saved again) and the previous one used; when none of a
  run's checkpoints can be read, the run stops (UnreadableCheckpoints) rather than start again.
  With several processes, a step that any one of them cannot read is skipped by all of them, so
  every process resumes from the same step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from grain import checkpoint as grain_checkpoint

from robust_u1_jax import files
from robust_u1_jax.data import multihost


_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json")  # Grain's data position per process
# Beside the checkpoints: the step at which a run stopped for its bad records.
BAD_RECORDS_STOP = "bad_records_stop.json"
# A second SIGINT this long after the first is the user's; sooner, the same one passed on twice.
AGAIN_AFTER_S = 1.0


class _IteratorAdapter:
  """Lets Grain's Orbax handler save any iterator with dict get_state()/set_state()."""

  def __init__(self, iterator):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass


class Stopped(Exception):
  """A run stopped by a signal after its checkpoint of `step` was saved, its files closed.

  A command ends in `exit_status`, 128 + the signal's number, as a shell reports a process the
  signal ended (130 for Ctrl-C, 143 for SIGTERM): `train A && train B` does not go on to B, a
  Kubernetes Job does not count a preempted pod as done, and Slurm's `afterok` holds the next
  job. `history`: the run's logged metric rows, as `trainer.train` returns them."""

  def __init__(self, step: int, signum: int, history: list[dict[str, float]]):
    super().__init__(f"stopped at step {step} by signal {signum}")
    self.step, self.signum, self.history = step, signum, history

  @property
  def exit_status(self) -> int:
    return 128 + self.signum


class Checkpointer:
  """Orbax CheckpointManager over items 'state', 'data' and 'meta' in `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain_checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self.stop_requested = False
    self.stop_signal = signal.SIGTERM  # what stopped the run: JAX's service stops on SIGTERM
    self._synced = False  # the stop agreed through JAX's preemption service (several processes)
    self._steps = 0  # should_stop's calls: the counter the processes agree on, the same on each
    self._previous_handlers = {}
    self._first_interrupt: float | None = None  # when the first SIGINT came (time.monotonic)

  # -- preemption ---------------------------------------------------------------------------------

  def install_signal_handlers(self) -> None:
    """SIGTERM (preemption) and SIGINT ask for a save and a clean stop (`should_stop`). One
    process: a second SIGINT, AGAIN_AFTER_S or more after the first, stops at once
    (KeyboardInterrupt), where the first waits on a step or a read that does not end; sooner, it
    is the same Ctrl-C passed on twice.

    One process: both set `stop_requested`. Several: SIGTERM is left to JAX's preemption
    notifier (jax.distributed installs it), which tells every process; SIGINT is turned into a
    SIGTERM to this process, so a Ctrl-C on one host stops the pod the same way."""
    self._synced = _preemption_service_running()
    if jax.process_count() > 1 and not self._synced:
      logging.warning("JAX's preemption service is off (jax_enable_preemption_service): a signal "
                      "to only some processes stops them at different steps")

    def request_stop(signum, frame):
      del frame
      now = time.monotonic()
      if signum == signal.SIGINT and self._first_interrupt is not None:
        if now - self._first_interrupt < AGAIN_AFTER_S:
          return  # the same Ctrl-C once more (`timeout` passes on what the terminal sent too)
        # A step, a save or a read (a hung mount) that does not end: the user's way out.
        logging.warning("Ctrl-C again: stopping at once, without a checkpoint of the steps since "
                        "the last")
        raise KeyboardInterrupt
      again = ""
      if signum == signal.SIGINT:
        self._first_interrupt = now
        again = " (Ctrl-C again stops at once, without it)"
      logging.warning("signal %d received: saving a checkpoint after this step, then stopping%s",
                      signum, again)
      if not self.stop_requested:  # the first (a launcher passes a Ctrl-C on as SIGTERM)
        self.stop_signal = signum
      self.stop_requested = True

    def forward_to_preemption_service(signum, frame):
      del frame
      logging.warning("signal %d received: every process saves a checkpoint at the same step, "
                      "then stops", signum)
      self.stop_signal = signum
      os.kill(os.getpid(), signal.SIGTERM)

    if self._synced:
      handlers = {signal.SIGINT: forward_to_preemption_service}
    else:
      handlers = {signal.SIGTERM: request_stop, signal.SIGINT: request_stop}
    for sig, handler in handlers.items():
      self._previous_handlers[sig] = signal.signal(sig, handler)

  def should_stop(self) -> bool:
    """Whether the run saves and stops after the step it just took. Call once per step on every
    process, from the run's first: with several processes it is their agreement, the same step on
    each. JAX's service counts from 0 and agrees on the count after the highest any process had
    reached when the signal came, so it is given this run's count of steps, not the global step:
    a resumed run asking from step S + 1 would never meet a count of 1 agreed during its
    restore."""
    self._steps += 1
    if self._synced:
      from jax.experimental import multihost_utils

      self.stop_requested = self.stop_requested or \
          multihost_utils.reached_preemption_sync_point(self._steps)
    return self.stop_requested

  def stopped(self, step: int, history: list[dict[str, float]]) -> Stopped:
    """What a run stopped at `step` raises once it has closed its files (this checkpointer
    included). Several processes wait for each other first: one that exited first, with a
    non-zero status, could have the others killed (`srun --kill-on-bad-exit`) before the primary
    process had committed the save."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"checkpoint:stopped:{self.directory}")
    return Stopped(step, self.stop_signal, history)

  def restore_signal_handlers(self) -> None:
    for sig, handler in self._previous_handlers.items():
      signal.signal(sig, handler)
    self._previous_handlers.clear()

  # -- save ---------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, iterator: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves when the interval says so (or `force`); never call with a non-finite state."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain_checkpoint.CheckpointSave(_IteratorAdapter(iterator)),
        meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def mark_bad_records_stop(self, step: int) -> None:
    """Records that the run stopped at `step` for its bad records (process 0; call once the
    step's checkpoint is saved), for the run resumed from it (`stopped_for_bad_records`)."""
    if jax.process_index() == 0:
      with files.atomic_write(os.path.join(self.directory, BAD_RECORDS_STOP), "w") as f:
        json.dump({"step": step}, f)

  def stopped_for_bad_records(self, step: int) -> bool:
    """Whether the run stopped at `step` for its bad records (`mark_bad_records_stop`)."""
    try:
      with open(os.path.join(self.directory, BAD_RECORDS_STOP)) as f:
        return json.load(f).get("step") == step
    except (OSError, ValueError, AttributeError):
      return False

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    self.restore_signal_handlers()

  # -- restore ------------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state: Any, iterator: Any,
              target_for: Callable[[dict], Any] | None = None) -> tuple[int, Any, dict] | None:
    """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

    `target_for(meta)`, where given, picks the restore target from the step's metadata instead
    (`abstract_state` or another tree: checkpoints written in another layout).

    Returns (step, state, meta), or None when there is no checkpoint. A checkpoint that fails to
    load is reported with its path, moved aside as `<step>.damaged` and skipped in favour of the
    one before it: left in place, it would still be the newest step, and saving that step again
    would fail. Raises UnreadableCheckpoints when checkpoints exist but none can be restored (a
    model or config that no longer fits them, say): starting from step 0 would train over them;
    and when the newest's data positions were saved by another number of processes or are
    refused by the iterator's `check_state` (kept in place: they are readable, not this run's).
    """
    failures = []  # (path, the first line of why)
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = os.path.join(self.directory, str(step))
      status, restored, error = self._try_restore(step, abstract_state, iterator, target_for)
      statuses = multihost.process_values(status)  # every process's, in process order
      if _REFUSED in statuses:
        if status == _REFUSED:
          raise error
        raise UnreadableCheckpoints(
            f"{path}: refused by process(es) {_which(statuses, _REFUSED)} (see their logs)")
      if statuses != [_RESTORED] * len(statuses):
        why = (_first_line(error) if status == _FAILED else
               f"process(es) {_which(statuses, _FAILED)} could not read it")
        logging.error("checkpoint %s cannot be restored (%s)", path, why)
        failures.append((path, why))
        continue
      if failures:
        self._move_aside([path for path, _ in failures])
      return restored
    if failures:
      path, why = failures[0]
      raise UnreadableCheckpoints(
          f"{self.directory}: no checkpoint can be restored (the newest, {path}: {why}); a run "
          "with another model or config needs another --workdir, or delete the checkpoints to "
          "start again")
    return None

  def _try_restore(self, step, abstract_state, iterator, target_for):
    """This process's restore of `step`: (_RESTORED, (step, state, meta), None), or (_FAILED,
    _PEER_FAILED or _REFUSED, None, the error).

    Orbax's restore is collective: it ends in one barrier across processes. A process that fails
    before a barrier (a file only it reads, a transient read error) meets its peers' barrier with
    one of another name, so they fail that restore too and every process has met as many barriers:
    left out, the peers would pass theirs paired with the failed process's barrier of the step
    before, and train from another step than it."""
    try:
      # Every process's data position first, read by every process: a file only its own process
      # could not read would stop that one inside Orbax's collective restore, the others waiting
      # for it there.
      self._read_data_positions(step, iterator)
      target = abstract_state
      if target_for is not None:
        target = target_for(self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=grain_checkpoint.CheckpointRestore(_IteratorAdapter(iterator)),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
      in_barrier = _raised_in_barrier(e)
      if jax.process_count() > 1 and not in_barrier:
        from jax.experimental import multihost_utils

        try:
          multihost_utils.sync_global_devices(f"checkpoint:restore failed:{self.directory}")
        except AssertionError:  # a peer read its files: its barrier had Orbax's name
          pass
      if isinstance(e, UnreadableCheckpoints):
        return _REFUSED, None, e
      return (_PEER_FAILED if in_barrier else _FAILED), None, e
    return _RESTORED, (step, restored["state"], dict(restored["meta"])), None

  def _read_data_positions(self, step: int, iterator: Any = None) -> None:
    """Parses every process's data position of `step` (Grain's `process_<i>-of-<n>.json`);
    raises UnreadableCheckpoints when another number of processes saved them (each process's
    position is its own, so another count finds none of its own) or when the iterator's
    `check_state`, where it has one, refuses a position (saved under another record order, say),
    ValueError when one cannot be read. Every process reads the same folder and decides alike."""
    folder = os.path.join(self.directory, str(step), "data")
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    saved = {int(m.group(1)) for m in map(_DATA_FILE.fullmatch, names) if m}
    if not saved:
      return
    n = jax.process_count()
    if saved != {n}:
      raise UnreadableCheckpoints(
          f"{os.path.join(self.directory, str(step))} was saved by {max(saved)} process(es), "
          f"this run has {n}: each process's data position is its own; resume with "
          f"{max(saved)} process(es) (on any devices), or start again in another --workdir")
    expected = [f"process_{i}-of-{n}.json" for i in range(n)]
    missing = [name for name in expected if name not in names]
    if missing:
      raise ValueError(f"the data position(s) {', '.join(missing)} are missing")
    check = getattr(iterator, "check_state", None)
    for name in expected:
      try:
        with open(os.path.join(folder, name), "rb") as f:
          position = json.loads(f.read())
      except (OSError, ValueError) as e:
        raise ValueError(f"the data position {name} cannot be read ({e})") from None
      if check is not None:
        try:
          check(position)
        except ValueError as e:  # readable, but not this run's to resume: kept, not moved aside
          raise UnreadableCheckpoints(f"{os.path.join(folder, name)}: {e}") from None

  def _move_aside(self, paths: list[str]) -> None:
    """Renames damaged step folders to `<step>.damaged` (process 0; every process waits): names
    Orbax does not read as steps."""
    if jax.process_index() == 0:
      for path in paths:
        aside, n = path + ".damaged", 1
        while os.path.exists(aside):  # the same step damaged before
          aside, n = f"{path}.damaged{n}", n + 1
        os.replace(path, aside)
        print(f"checkpoint {path} cannot be restored; moved to {aside}, resuming from the one "
              "before it", flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"checkpoint:move_aside:{self.directory}")
    self.manager.reload()


def _first_line(error: Exception) -> str:
  return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def _preemption_service_running() -> bool:
  """Whether this is one of several processes whose jax.distributed runs the preemption service
  (started by jax.distributed.initialize while jax_enable_preemption_service was on; the flag
  read now could have changed since, and the handle has no public accessor)."""
  from jax._src import distributed

  return (jax.process_count() > 1
          and getattr(distributed.global_state, "preemption_sync_manager", None) is not None)


class UnreadableCheckpoints(RuntimeError):
  """A run's checkpoints exist but none of them can be restored."""


# A process's restore of one step (`_try_restore`): _PEER_FAILED, its own files read, it failed
# at the barrier where another process met it failed.
_RESTORED, _FAILED, _PEER_FAILED, _REFUSED = range(4)


def _which(statuses: list[int], status: int) -> str:
  return ", ".join(str(i) for i, s in enumerate(statuses) if s == status)


def _raised_in_barrier(error: Exception) -> bool:
  """Whether `error` came from a barrier across processes (JAX's `sync_global_devices`, which
  Orbax's restore ends in), not from reading files before it."""
  return any(frame.f_code.co_name == "sync_global_devices"
             for frame, _ in traceback.walk_tb(error.__traceback__))


def _read_only_manager(workdir: str) -> ocp.CheckpointManager | None:
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    return None
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))


def latest_step(workdir: str) -> int | None:
  """The newest complete checkpoint's step in `workdir`, without building any model."""
  manager = _read_only_manager(workdir)
  if manager is None:
    return None
  with manager:
    return manager.latest_step()


def results_line(workdir: str, total_steps: int) -> str:
  """Where a run's results are: its model when it reached its last step, else where it stopped
  and how to go on."""
  if finished(workdir, total_steps):
    return (f"model: {os.path.join(workdir, 'model')}; metrics: "
            f"{os.path.join(workdir, 'metrics.jsonl')}, TensorBoard: "
            f"{os.path.join(workdir, 'tensorboard')}")
  return (f"stopped at step {latest_step(workdir)} of {total_steps}; checkpoints in "
          f"{os.path.join(workdir, 'checkpoints')}: run the same command to resume")


def saved_config(workdir: str) -> dict | None:
  """The config (as JSON values) the newest checkpoint in `workdir` was saved with, read without
  building any model; None without a checkpoint, or when its metadata cannot be read (the
  trainer then falls back to the checkpoint before, `Checkpointer.restore`)."""
  meta = saved_meta(workdir)
  return None if meta is None else config_of(meta)


def saved_meta(workdir: str) -> dict | None:
  """The metadata of the newest checkpoint in `workdir`, as `saved_config` reads it."""
  manager = _read_only_manager(workdir)
  if manager is None:
    return None
  with manager:
    step = manager.latest_step()
    if step is None:
      return None
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception:  # Orbax raises many types for damaged files.
      return None
  return meta if isinstance(meta, dict) else None


def config_of(meta: dict) -> dict | None:
  """The config in a checkpoint's metadata (the trainer stores it as a JSON string)."""
  config = meta.get("config")
  return json.loads(config) if isinstance(config, str) else None


def finished(workdir: str, total_steps: int) -> bool:
  """Whether `workdir` holds its run's last checkpoint and the model written from it."""
  step = latest_step(workdir)
  return step is not None and step >= total_steps and os.path.isdir(os.path.join(workdir, "model"))


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with shardings: the restore target for a state on the current mesh."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x
  return jax.tree.map(one, state)


class NonFiniteLoss(FloatingPointError):
  """A loss went NaN or infinite: the run stops before it can overwrite a good checkpoint."""


def check_finite(step: int, metrics: dict[str, Any], *, kept: Callable[[], int | None],
                 keys: Callable[[str], bool] | None = None):
  """Raises NonFiniteLoss when a loss (or the gradient norm) of `step` is NaN or infinite.
  `kept()`: the step of the run's newest checkpoint, which the error names (None: it has none);
  asked only then, not at every check."""
  # A NaN gradient poisons the parameters before any loss shows it.
  keys = keys or (lambda k: "loss" in k or k == "grad_norm")
  bad = {k: float(v) for k, v in metrics.items() if keys(k) and not np.isfinite(float(v))}
  if bad:
    shown = {k: float(v) for k, v in metrics.items() if keys(k)}
    fix = "lower the learning rate or enable gradient clipping (optimizer.grad_clip)"
    if step == 1:  # taken before any update: no learning rate or clipping made it
      fix = ("it came before any update, so from the data or the model, not the learning rate: "
             "check them, e.g. `python -m robust_u1_jax.data.preview` with this config")
    kept = kept()
    after = (f"the checkpoint of step {kept} is kept: {fix}, and the same command resumes from it"
             if kept is not None else
             f"no checkpoint was saved before it, so the run starts again from step 0: {fix}")
    raise NonFiniteLoss(f"non-finite loss at step {step}: {shown}; {after}")
