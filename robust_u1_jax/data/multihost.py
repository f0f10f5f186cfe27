"""Multi-host batch assembly: which slice of the data a process reads, and global jax.Arrays.

Every process runs its own Grain pipeline over a disjoint slice of the records
(`make_pipeline(..., process_index=i, process_count=n)`) and produces per-process batches of
`global_batch / n` samples. `global_batch` turns those numpy batches into one jax.Array per field
whose leading (batch) axis is sharded over the mesh's ('data', 'fsdp') axes, through
`jax.make_array_from_process_local_data`; no process ever holds the global batch.

When the batch axes do not cover every process (for example a 'tensor' axis that spans two hosts),
the processes that own the same batch rows are replicas and must read identical data:
`data_shard(mesh)` gives the (shard_index, shard_count) a process should pass to the pipeline so
replicas read the same slice.

A run is the same computation whatever the number of processes: `process_slice` hands shard s the
s-th run of rows of every global batch (the rows its devices hold), so the global batch of n
processes is row for row the batch of one; `SampleRng` keys a stage's host-side draws (condition
dropout) by sample, not by position in a process's batch; device-side draws come from global keys.
`tests/test_multihost_processes.py` checks it: 2 processes x 4 CPU devices train, checkpoint and
restore like 1 process x 8 devices (to the float32 rounding of sums whose order differs). Packed
rows (data.token_budget > 0) are packed per process, so they depend on the process count.

`initialize_distributed()` starts `jax.distributed` from the environment a launcher sets
(launch/*.sh, launch/gpu_slurm.sbatch); entry points call it before anything touches a device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from robust_u1_jax import config_lib

BATCH_AXES = ("data", "fsdp")

# The environment `initialize_distributed` reads (launch/ sets it).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0 (also read by jax itself)
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_DISTRIBUTED = "ROBUST_U1_DISTRIBUTED"  # 1: let jax detect the cluster (TPU VM, SLURM, MPI)


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
  """Starts `jax.distributed` when the launcher asks for it; True when it did (or already had).

  - JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID all set: those values
    (`launch/local.sh --processes N`, or any launcher of your own);
  - ROBUST_U1_DISTRIBUTED=1: jax's own detection (Cloud TPU VM slices, SLURM, Open MPI), as
    `launch/tpu_pod.sh` and `launch/gpu_slurm.sbatch` set it;
  - neither: one process, nothing to start.

  Must run before anything initialises a JAX backend (jax.devices(), a computation). On CPU the
  processes exchange data through gloo collectives (jax's default; set here explicitly so a
  CPU-only multi-process run never depends on that default).
  """
  env = os.environ if environ is None else environ
  names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  explicit = [env.get(k, "") for k in names]
  auto = env.get(ENV_DISTRIBUTED, "").lower() in ("1", "true", "yes")
  if any(explicit) and not all(explicit):
    raise ValueError(f"{', '.join(names)} go together: got {dict(zip(names, explicit))}")
  if not any(explicit) and not auto:
    return False
  if jax.distributed.is_initialized():
    return True
  cpu = env.get("JAX_PLATFORMS", "").split(",")[0] == "cpu"
  if cpu:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(explicit):
    try:
      num_processes, process_id = int(explicit[1]), int(explicit[2])
    except ValueError:
      raise ValueError(f"{ENV_NUM_PROCESSES}={explicit[1]!r} and {ENV_PROCESS_ID}={explicit[2]!r} "
                       "must be integers") from None
    if not 0 <= process_id < num_processes:
      raise ValueError(f"{ENV_PROCESS_ID}={process_id} is outside [0, {ENV_NUM_PROCESSES}="
                       f"{num_processes})")
    jax.distributed.initialize(explicit[0], num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  if cpu and jax.process_count() > 1:
    _connect_cpu_collectives()
  return True


def _connect_cpu_collectives() -> None:
  """Opens the gloo communicators a CPU run uses, while the processes are still in step.

  gloo connects a set of devices at its first collective and gives up when a peer is not there
  within 30 s (not configurable in jax 0.10). A run's first collective comes after minutes of
  compiling, which processes sharing a few cores finish tens of seconds apart, and the persistent
  compilation cache answers only process 0 (its keys differ per process on CPU). Once connected,
  a collective waits for its peers as long as it takes. Connected here: one device per process
  (the barriers of multihost_utils and Orbax) and every device (a step over the whole mesh).
  """
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices("robust_u1_jax: processes connected")
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("all",))
  local = np.ones(jax.local_device_count(), np.float32)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")), local, devices.shape)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  assert int(total.addressable_data(0)) == devices.size, total


def process_values(value: int) -> list[int]:
  """Every process's `value` (an int32), in process order: one collective across processes."""
  if jax.process_count() == 1:
    return [int(value)]
  from jax.experimental import multihost_utils

  return [int(x) for x in multihost_utils.process_allgather(np.int32(value))]


def on_every_process(flag: bool) -> bool:
  """Whether `flag` holds on every process: for a decision the processes must take together."""
  return all(process_values(int(flag)))


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  """global_batch_size / process_count, refusing batches that do not split evenly."""
  if process_count < 1:
    raise ValueError(f"process_count={process_count} is invalid: use an integer >= 1")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise config_lib.ConfigError(
        f"data.batch_size={global_batch_size} does not split evenly over {process_count} "
        f"processes: use a positive multiple of {process_count}")
  return global_batch_size // process_count


def check_batch_fits_mesh(batch_size: int, mesh: Mesh,
                          batch_axes: Sequence[str] = BATCH_AXES) -> None:
  """Refuses a global batch of `batch_size` rows that the processes' data shards or the mesh's
  batch axes do not split evenly. Every stage's step inputs hold one row per pipeline record, so
  a trainer checks data.batch_size here before its stage builds the model."""
  _, shard_count = data_shard(mesh, batch_axes=batch_axes)
  per_process_batch_size(batch_size, shard_count)
  _check_split(batch_size, mesh, batch_axes)


def _check_split(rows: int, mesh: Mesh, batch_axes: Sequence[str]) -> None:
  sizes = [mesh.shape[a] for a in _batch_axes(mesh, batch_axes)]
  split = int(np.prod(sizes)) if sizes else 1
  if rows % split:
    raise config_lib.ConfigError(
        f"data.batch_size={rows} does not split over mesh axes {tuple(batch_axes)} of "
        f"sizes {sizes}: use a multiple of {split}")


def _batch_axes(mesh: Mesh, batch_axes: Sequence[str]) -> tuple[str, ...]:
  unknown = [a for a in batch_axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"batch axes {unknown} are not axes of the mesh {tuple(mesh.axis_names)}")
  return tuple(batch_axes)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
  """Leading axis split over `batch_axes`, every other axis replicated."""
  return NamedSharding(mesh, P(_batch_axes(mesh, batch_axes)))


def data_shard(mesh: Mesh, process_index: int | None = None,
               batch_axes: Sequence[str] = BATCH_AXES) -> tuple[int, int]:
  """(shard_index, shard_count) of the batch rows that `process_index`'s devices hold.

  Pass them as make_pipeline's process_index / process_count. Processes whose devices share batch
  coordinates get the same shard (replicas). Raises when a process's devices own a non-contiguous
  or unevenly sized set of batch slices, which no per-process pipeline can feed.
  """
  axes = _batch_axes(mesh, batch_axes)
  process_index = jax.process_index() if process_index is None else process_index
  names = list(mesh.axis_names)
  sizes = [mesh.shape[a] for a in axes]
  num_slices = int(np.prod(sizes)) if sizes else 1
  owned: dict[int, set[int]] = {}
  for coords in np.ndindex(mesh.devices.shape):
    device = mesh.devices[coords]
    batch_coord = 0
    for a, size in zip(axes, sizes):
      batch_coord = batch_coord * size + coords[names.index(a)]
    owned.setdefault(device.process_index, set()).add(batch_coord)
  if process_index not in owned:
    raise ValueError(f"process {process_index} owns no device of the mesh "
                     f"(processes: {sorted(owned)})")
  mine = sorted(owned[process_index])
  per = len(mine)
  if mine != list(range(mine[0], mine[0] + per)) or mine[0] % per or num_slices % per:
    raise config_lib.ConfigError(
        f"process {process_index} holds batch slices {mine} of {num_slices} over "
        f"axes {axes}: a per-process pipeline needs a contiguous, evenly sized block; "
        "reorder the mesh devices so each process owns neighbouring batch slices")
  return mine[0] // per, num_slices // per


def global_batch(local_batch: Any, mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> Any:
  """Per-process numpy batch (any pytree: dicts, model-input dataclasses) -> the same tree of
  global jax.Arrays, batch axis sharded over `batch_axes`.

  Every leaf must be an array with a leading batch axis of the same size; the global batch is
  (that size) x (number of distinct data shards). Non-array leaves (Python lists of ids or
  strings) stay on the host and are refused here with their key, so they never reach a jit.
  """
  sharding = batch_sharding(mesh, batch_axes)
  _, shard_count = data_shard(mesh, batch_axes=batch_axes)
  # Lists are host data (ids, strings), refused whole rather than flattened element-wise.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      local_batch, is_leaf=lambda x: isinstance(x, list))
  local_rows = None
  out = []
  for path, value in leaves:
    key = jax.tree_util.keystr(path, simple=True, separator=".")
    if not _is_device_array(value):
      kind = (f"an array of {value.dtype}" if isinstance(value, np.ndarray)
              else f"a {type(value).__name__}")
      raise TypeError(f"batch field {key!r} is {kind}, not a numeric array with a batch axis: "
                      "split host-only fields off first (multihost.host_fields)")
    rows = value.shape[0]
    if local_rows is None:  # every step: the split alone (data_shard is known)
      _check_split(rows * shard_count, mesh, batch_axes)
    local_rows = rows if local_rows is None else local_rows
    if rows != local_rows:
      raise ValueError(f"batch field {key!r} has {rows} rows but other fields have {local_rows}: "
                       "every field of a batch needs the same leading size")
    global_shape = (rows * shard_count,) + tuple(value.shape[1:])
    out.append(jax.make_array_from_process_local_data(sharding, np.asarray(value), global_shape))
  return jax.tree_util.tree_unflatten(treedef, out)


class _ProcessSlice(grain.MapDataset):
  """`process_slice`'s view: record i of this process is record `_source(i)` of the parent."""

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.MapDataset, index: int, count: int, chunk: int):
    super().__init__(parent)
    self._index, self._count, self._chunk = index, count, chunk
    self._length = len(parent) // count

  def __len__(self) -> int:
    return self._length

  def _source(self, i: int) -> int:
    # Past the end wraps around the parent, as grain's own slices do.
    parent_epoch, i = divmod(i, self._length)
    run, offset = divmod(i, self._chunk)
    # The last run may be short: its records are split evenly over the processes too.
    width = min(self._chunk, self._length - run * self._chunk)
    return (parent_epoch * len(self._parent) + run * self._chunk * self._count
            + self._index * width + offset)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    with self._stats.record_self_time():
      source = self._source(index)
    return self._parent[source]

  def __str__(self) -> str:
    return f"ProcessSlice(index={self._index}, count={self._count}, chunk={self._chunk})"


def process_slice(ds: grain.MapDataset, index: int, count: int, chunk: int) -> grain.MapDataset:
  """Shard `index` of `count` of a record stream: of every `count * chunk` consecutive records,
  the `index`-th run of `chunk`.

  With `chunk` the per-process batch size, global batch k (shard 0's rows, then shard 1's, ...,
  as `global_batch` lays them out) holds records [k * count * chunk, (k + 1) * count * chunk) of
  the stream, in order: the batch one process would read. `chunk=1` interleaves
  (index, index + count, ...). The slice has len(ds) // count records (infinite stays infinite).
  """
  if not 0 <= index < count:
    raise ValueError(f"process slice {index} is outside [0, {count})")
  if chunk < 1:
    raise ValueError(f"chunk={chunk} is invalid: use an integer >= 1")
  return ds if count == 1 else _ProcessSlice(ds, index, count, chunk)


class SampleRng:
  """Host-side random draws per sample, the same whichever process reads the sample.

  `rng` is the step's generator (the trainer seeds it with (seed, step), identical on every
  process); `SampleRng(rng)(sample)` is a generator keyed by (one draw of `rng`, the sample's
  record index and epoch), so a sample gets the same draws in a run of any number of processes,
  at any row of any batch. A sample without 'index' (a hand-made batch) is keyed by its
  position: pass `position`.
  """

  def __init__(self, rng: np.random.Generator):
    self.base = int(rng.integers(2**62))

  def __call__(self, sample: Mapping[str, Any], position: int = 0) -> np.random.Generator:
    if "index" in sample:
      return np.random.default_rng([self.base, 1, int(sample["index"]),
                                    int(sample.get("epoch", 0))])
    return np.random.default_rng([self.base, 0, int(position)])


def host_fields(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits a batch into (array fields for global_batch, host-only fields such as lists)."""
  arrays, host = {}, {}
  for key, value in batch.items():
    (arrays if _is_device_array(value) else host)[key] = value
  return arrays, host


def _is_device_array(value) -> bool:
  return (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0
          and np.dtype(value.dtype).kind in "biufc")
