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


# -- one run, any process count: data slices, per-sample draws, joining -------------------------

@pytest.mark.parametrize("length,count,chunk", [(20, 2, 3), (16, 4, 2), (7, 2, 2), (12, 3, 1)])
def test_process_slice_gives_each_shard_its_rows_of_every_global_batch(length, count, chunk):
  import grain

  ds = grain.MapDataset.range(length)
  parts = [list(multihost.process_slice(ds, p, count, chunk)) for p in range(count)]
  assert all(len(part) == length // count for part in parts)
  # Shard 0's run, shard 1's run, ...: the stream in order, the remainder of length % count
  # dropped (the last runs are split evenly too).
  order = [x for k in range(0, length // count, chunk) for part in parts for x in part[k:k + chunk]]
  assert order == list(range(count * (length // count)))
  assert multihost.process_slice(ds, 0, 1, chunk) is ds
  with pytest.raises(ValueError, match="outside"):
    multihost.process_slice(ds, 2, 2, 1)


def test_pipelines_of_two_processes_read_the_batches_of_one():
  from robust_u1_jax import config_lib
  from robust_u1_jax.data import pipeline

  configs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
  data = config_lib.load(os.path.join(configs, "sft.py") + ":tiny", {
      "data.shapes_size": 20, "data.batch_size": 4, "data.corruption": "none",
      "data.text_pad_to": 32}).data

  def batches(index, count):
    p = pipeline.make_pipeline(data, seed=5, process_index=index, process_count=count)
    out = [next(p) for _ in range(12 // count)]  # across the epoch boundary (5 batches of 4)
    p.close()
    return out

  one = batches(0, 1)
  halves = [batches(0, 2), batches(1, 2)]
  for k, want in enumerate(one[:6]):
    for key in ("index", "epoch", "clean", "instruction_ids"):
      got = np.concatenate([halves[0][k][key], halves[1][k][key]])
      np.testing.assert_array_equal(got, want[key], err_msg=f"batch {k}: {key}")
  assert {int(e) for b in one[:6] for e in b["epoch"]} == {0, 1}


def test_sample_rng_draws_by_record_not_by_position():
  step = lambda: np.random.default_rng([3, 7])  # the trainer's generator of one step
  a, b = multihost.SampleRng(step()), multihost.SampleRng(step())
  sample = {"index": np.int32(11), "epoch": np.int32(2)}
  first = a(sample, position=0).uniform(size=3)
  np.testing.assert_array_equal(b(sample, position=5).uniform(size=3), first)
  assert not np.array_equal(a({"index": 11, "epoch": 3}).uniform(size=3), first)
  assert not np.array_equal(a({"index": 12, "epoch": 2}).uniform(size=3), first)
  # Hand-made batches without record indices: keyed by position.
  assert not np.array_equal(a({}, 0).uniform(size=3), a({}, 1).uniform(size=3))
  np.testing.assert_array_equal(a({}, 1).uniform(size=3), b({}, 1).uniform(size=3))


def test_initialize_distributed_reads_the_launch_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  assert multihost.initialize_distributed({}) is False  # one process: nothing to start
  assert calls == []
  explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
              "JAX_PROCESS_ID": "3"}
  assert multihost.initialize_distributed(explicit) is True
  assert calls.pop() == (("10.0.0.1:1234",), {"num_processes": 4, "process_id": 3})
  assert multihost.initialize_distributed({"ROBUST_U1_DISTRIBUTED": "1"}) is True
  assert calls.pop() == ((), {})  # jax detects the TPU slice or SLURM job itself
  with pytest.raises(ValueError, match="go together"):
    multihost.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  with pytest.raises(ValueError, match="must be integers"):
    multihost.initialize_distributed({**explicit, "JAX_NUM_PROCESSES": "four"})
  with pytest.raises(ValueError, match="outside"):
    multihost.initialize_distributed({**explicit, "JAX_PROCESS_ID": "4"})
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  assert multihost.initialize_distributed(explicit) is True and calls == []
