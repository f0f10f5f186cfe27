"""Multi-host batch assembly: global arrays on 8 fake CPU devices, per-process data shards."""

import os

# Normally set by tests/conftest.py; repeated so this file also runs on its own.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import collections
import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from robust_u1_jax import sharding
from robust_u1_jax.data import multihost


def _mesh(data, fsdp, tensor):
  return sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, jax.devices()[:8])


@pytest.mark.parametrize("axes", [(2, 4, 1), (1, 8, 1), (2, 2, 2)])
def test_global_batch_values_and_sharding(axes):
  mesh = _mesh(*axes)
  batch_rows = 16
  local = {"clean": np.arange(batch_rows * 4 * 4 * 3, dtype=np.uint8).reshape(batch_rows, 4, 4, 3),
           "index": np.arange(batch_rows, dtype=np.int32) * 7,
           "ids": np.arange(batch_rows * 5, dtype=np.int32).reshape(batch_rows, 5)}
  out = multihost.global_batch(local, mesh)
  num_slices = axes[0] * axes[1]
  for key, value in local.items():
    arr = out[key]
    assert arr.shape == value.shape and arr.dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(arr), value)
    assert arr.sharding.spec == P(("data", "fsdp"))
    # Each device holds its batch_rows / num_slices rows; tensor replicas hold the same rows.
    for shard in arr.addressable_shards:
      assert shard.data.shape[0] == batch_rows // num_slices
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])


def test_global_batch_refuses_host_fields_and_uneven_rows():
  mesh = _mesh(2, 4, 1)
  with pytest.raises(TypeError, match="'corruption'"):
    multihost.global_batch({"corruption": ["fog"] * 8}, mesh)
  with pytest.raises(TypeError, match="'corruption' is an array of <U3.*host_fields"):
    multihost.global_batch({"corruption": np.asarray(["fog"] * 8)}, mesh)
  with pytest.raises(ValueError, match="'b' has 4 rows"):
    multihost.global_batch({"a": np.zeros((8, 2)), "b": np.zeros((4, 2))}, mesh)
  with pytest.raises(ValueError, match="does not split over mesh axes"):
    multihost.global_batch({"a": np.zeros((6, 2))}, mesh)
  arrays, host = multihost.host_fields({"a": np.zeros((8, 2)), "names": ["x"] * 8,
                                        "text": np.array(["x"] * 8)})
  assert list(arrays) == ["a"] and sorted(host) == ["names", "text"]


def _fake_mesh(process_grid, axis_names=("data", "fsdp", "tensor")):
  grid = np.asarray(process_grid)
  devices = np.empty(grid.shape, dtype=object)
  for coords in np.ndindex(grid.shape):
    devices[coords] = types.SimpleNamespace(process_index=int(grid[coords]))
  shape = collections.OrderedDict(zip(axis_names, grid.shape))
  return types.SimpleNamespace(axis_names=axis_names, shape=shape, devices=devices)


def test_data_shard_per_process_and_replicas():
  # 4 processes x 2 devices, batch over data (2) x fsdp (4): each process owns 1 of 4 shards.
  mesh = _fake_mesh(np.arange(8).reshape(2, 4, 1) // 2)
  assert [multihost.data_shard(mesh, p) for p in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
  # tensor axis spanning processes 0/1 and 2/3: those pairs are replicas of one shard.
  mesh = _fake_mesh(np.array([[[0, 1]], [[2, 3]]]))
  assert [multihost.data_shard(mesh, p) for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
  # Real single-process mesh: one shard.
  assert multihost.data_shard(_mesh(2, 4, 1)) == (0, 1)
  # A process owning non-neighbouring batch slices cannot be fed by one pipeline.
  mesh = _fake_mesh(np.array([0, 1, 0, 1]).reshape(1, 4, 1))
  with pytest.raises(ValueError, match="contiguous"):
    multihost.data_shard(mesh, 0)


def test_per_process_batch_size():
  assert multihost.per_process_batch_size(32, 4) == 8
  with pytest.raises(ValueError, match="multiple of 3"):
    multihost.per_process_batch_size(8, 3)
