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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  """global_batch_size / process_count, refusing batches that do not split evenly."""
  if process_count < 1:
    raise ValueError(f"process_count={process_count} is invalid: use an integer >= 1")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"data.batch_size={global_batch_size} does not split evenly over "
                     f"{process_count} processes: use a positive multiple of {process_count}")
  return global_batch_size // process_count


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
    raise ValueError(f"process {process_index} holds batch slices {mine} of {num_slices} over "
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
    local_rows = rows if local_rows is None else local_rows
    if rows != local_rows:
      raise ValueError(f"batch field {key!r} has {rows} rows but other fields have {local_rows}: "
                       "every field of a batch needs the same leading size")
    global_shape = (rows * shard_count,) + tuple(value.shape[1:])
    if global_shape[0] % (int(np.prod([mesh.shape[a] for a in batch_axes])) or 1):
      raise ValueError(
          f"batch field {key!r}: a global batch of {global_shape[0]} rows does not split over "
          f"mesh axes {tuple(batch_axes)} of sizes {[mesh.shape[a] for a in batch_axes]}; use a "
          "data.batch_size that is a multiple of their product")
    out.append(jax.make_array_from_process_local_data(sharding, np.asarray(value), global_shape))
  return jax.tree_util.tree_unflatten(treedef, out)


def host_fields(batch: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits a batch into (array fields for global_batch, host-only fields such as lists)."""
  arrays, host = {}, {}
  for key, value in batch.items():
    (arrays if _is_device_array(value) else host)[key] = value
  return arrays, host


def _is_device_array(value) -> bool:
  return (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0
          and np.dtype(value.dtype).kind in "biufc")
