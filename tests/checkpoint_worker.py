"""One process of test_multihost_processes.py's checkpoint tests (pytest does not collect it).

  python tests/checkpoint_worker.py WORKDIR OUT_PREFIX FAULT

Joins its peers through `multihost.initialize_distributed()`, saves a sharded array and a data
position at steps 1 and 2 through the trainer's `Checkpointer`, then restores with FAULT injected
into one process's read of step 2 (as a file only that host cannot read): `state:P` (process P's
Orbax read of the arrays raises OSError), `data:P` (its read of the data positions raises
ValueError), `refuse:P` (it refuses the data positions, UnreadableCheckpoints), `none`.

Each process writes OUT_PREFIX_<process>.json: {"step", "value", "position"} of what it restored,
or {"error"}; and "next": every process's restored step, gathered by one more collective, as the
first training step would be one.
"""

import json
import os
import sys


class _Position:
  """A data iterator's position, as the trainer's Checkpointer saves one."""

  def __init__(self):
    self.position = 0

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _inject(fault: str, checkpoint_lib) -> None:
  import orbax.checkpoint as ocp

  def of_step_2(method, error):
    def failing(self, *args, **kwargs):
      where = kwargs.get("directory", args[0] if args else "")
      if os.sep + "2" in str(where) or (args and args[0] == 2):
        raise error
      return method(self, *args, **kwargs)
    return failing

  kind = fault.split(":")[0]
  if kind == "state":
    ocp.StandardCheckpointHandler.restore = of_step_2(
        ocp.StandardCheckpointHandler.restore, OSError("injected: this host cannot read it"))
  elif kind == "data":
    checkpoint_lib.Checkpointer._read_data_positions = of_step_2(
        checkpoint_lib.Checkpointer._read_data_positions,
        ValueError("injected: the data position cannot be read"))
  elif kind == "refuse":
    checkpoint_lib.Checkpointer._read_data_positions = of_step_2(
        checkpoint_lib.Checkpointer._read_data_positions,
        checkpoint_lib.UnreadableCheckpoints("injected: not this run's position"))


def main(argv):
  workdir, out_prefix, fault = argv[1:]
  from robust_u1_jax.data import multihost

  multihost.initialize_distributed()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  from robust_u1_jax.training import checkpoint as checkpoint_lib

  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), P("data"))
  data = _Position()
  ckpt = checkpoint_lib.Checkpointer(workdir, every=1, keep=5, async_save=False)
  for step in (1, 2):
    data.position = step
    ckpt.save(step, {"w": jax.device_put(jnp.full((8,), float(step)), sharding)}, data,
              {"step": step})
  ckpt.close()
  data.position = 0

  if fault != "none" and jax.process_index() == int(fault.split(":")[1]):
    _inject(fault, checkpoint_lib)
  ckpt = checkpoint_lib.Checkpointer(workdir, every=1, keep=5, async_save=False)
  abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}
  try:
    # As the trainer restores: the step's metadata first (one collective restore), then the
    # state (another).
    step, state, _ = ckpt.restore(abstract, data, target_for=lambda meta: abstract)
    value = float(np.asarray(state["w"].addressable_data(0))[0])
    result = {"step": step, "value": value, "position": data.position}
    result["next"] = [int(s) for s in multihost_utils.process_allgather(np.int32(step))]
  except checkpoint_lib.UnreadableCheckpoints as e:
    result = {"error": str(e)}
  ckpt.close()
  with open(f"{out_prefix}_{jax.process_index()}.json", "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(sys.argv)
