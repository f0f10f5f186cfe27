"""One process of tests/test_multihost_processes.py (not a test module: pytest does not collect it).

  python tests/multihost_worker.py CONFIG WORKDIR OUT_PREFIX [field=json_value ...]

('{process}' in WORKDIR: this process's index, a folder each, as on hosts' own disks.)

Joins its peers through `multihost.initialize_distributed()` (the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID the test sets, as `launch/local.sh --processes N` does; none
for the one-process reference), trains CONFIG with the overrides in WORKDIR (the trainer saves its
last step's checkpoint), then restores that checkpoint through the trainer's `Checkpointer` onto
the shardings the trainer saved it from, as a resumed run would.

Process 0 writes OUT_PREFIX.json ({"process_count", "device_count", "history": the logged rows,
"evaluations": the evaluations' rows, "restored_step", "data_state": whether this process's data
position came back}) and
OUT_PREFIX.npz: every array of the restored train state except the frozen weights (parameters,
EMA, optimizer moments, step, key), gathered from all processes, keyed by path.
"""

import json
import os
import sys


def main(argv):
  config_path, workdir, out_prefix, *pairs = argv[1:]
  from robust_u1_jax.data import multihost

  multihost.initialize_distributed()  # before anything touches a device

  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from robust_u1_jax import config_lib
  from robust_u1_jax.training import checkpoint as checkpoint_lib
  from robust_u1_jax.training import metrics_log, stages, trainer

  overrides = {}
  for pair in pairs:
    key, value = pair.split("=", 1)
    overrides[key] = json.loads(value)
  config = config_lib.load(config_path, overrides)
  workdir = workdir.replace("{process}", str(jax.process_index()))  # a folder per process

  # The restore target is the state as the trainer saved it (shapes, dtypes, shardings).
  saved = {}
  save = checkpoint_lib.Checkpointer.save

  def recording_save(self, step, state, *args, **kwargs):
    saved[step] = checkpoint_lib.abstract_like(state)
    return save(self, step, state, *args, **kwargs)

  checkpoint_lib.Checkpointer.save = recording_save
  try:
    history = trainer.train(config, workdir, stages.builder(config.stage))
  except checkpoint_lib.Stopped as e:  # the tests' SIGTERM
    print(e, flush=True)  # "stopped at step N by signal 15", which the tests read
    history = e.history
  checkpoint_lib.Checkpointer.save = save

  class Position:  # stands in for the pipeline: receives the saved data position
    state = None

    def get_state(self):
      return self.state

    def set_state(self, state):
      self.state = state

  position = Position()
  ckpt = checkpoint_lib.Checkpointer(workdir, every=config.checkpoint_every,
                                     keep=config.keep_checkpoints)
  restored = ckpt.restore(saved[max(saved)], position)
  ckpt.close()
  assert restored is not None, f"no checkpoint of {workdir} could be restored"
  step, state, _ = restored

  # A checkpoint holds the trained part of the state (`state.SAVED_FIELDS`), as a dict.
  arrays = {name: state[name] for name in ("params", "ema", "opt_state", "step", "rng")}
  leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
  mesh = jax.tree.leaves(state["params"])[0].sharding.mesh
  # One program gathers every array onto every device, so each process can read it whole.
  gathered = jax.jit(lambda xs: xs, out_shardings=NamedSharding(mesh, P()))([x for _, x in leaves])
  if jax.process_index() == 0:
    np.savez(out_prefix + ".npz", **{
        jax.tree_util.keystr(path, simple=True, separator="."): np.asarray(x.addressable_data(0))
        for (path, _), x in zip(leaves, gathered)})
    with open(out_prefix + ".json", "w") as f:
      evaluations = [r for r in metrics_log.read_rows(os.path.join(workdir, "metrics.jsonl"))
                     if r.get("eval")]
      json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
                 "history": history, "evaluations": evaluations, "restored_step": step,
                 "data_state": isinstance(position.state, dict)}, f)


if __name__ == "__main__":
  main(sys.argv)
