"""The data path's corruption: where it runs, batch forms with per-image results, corruption a
group of records at a time with the per-record results, and the benchmarks' alternation."""

import math
import os
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_u1_jax import benchmarks
from robust_u1_jax.data import bad_records
from robust_u1_jax.data import corrupt_groups
from robust_u1_jax.data import corruptions
from robust_u1_jax.data import transforms
from robust_u1_jax.data.corruptions import placement
from robust_u1_jax.data.corruptions import robust_r1 as rr

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "sft.py") + ":tiny"


def _images(b, h=48, w=48, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (b, h // 8, w // 8, 3)).astype(np.uint8)
  return np.repeat(np.repeat(base, 8, 1), 8, 2)  # blocky: edges for blurs and JPEG to work on


# ------------------------------------------------------------------------------ placement

def test_numpy_images_are_corrupted_on_the_host_cpu():
  device = corruptions.data_device()
  assert device.platform == "cpu"
  image = _images(1)[0]
  other = jax.devices()[-1]
  assert other != device  # the tests' fake CPU devices stand in for an accelerator
  with jax.default_device(other):
    _, key = transforms.record_rng(0, 1, 0)
    assert key.devices() == {device}  # record keys are made on the host
    placed = corruptions._put((image, key), placement.of(image))
    assert all(a.devices() == {device} for a in placed)
    out = corruptions.corrupt(image, "contrast", jax.random.key(0), severity=2)
  assert isinstance(out, np.ndarray) and out.dtype == np.uint8
  # A jax array is corrupted where it lives.
  on_other = jax.device_put(jnp.asarray(image), other)
  out_dev = corruptions.corrupt(on_other, "contrast", jax.device_put(jax.random.key(0), other),
                                severity=2)
  assert out_dev.devices() == {other}
  np.testing.assert_array_equal(np.asarray(out_dev), out)


def test_a_float64_image_comes_back_float64_and_other_inputs_are_named():
  """numpy's default float: corrupted in float32, given back in its own dtype (it came back
  float32, with JAX's truncation warning); a PIL image or an empty array get a sentence."""
  x = np.random.default_rng(0).uniform(size=(48, 48, 3))
  for name, level in (("fog", {"severity": 3}), ("robust_r1_pipeline", {"intensity": 0.45})):
    out = corruptions.corrupt(x, name, jax.random.key(0), **level)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, corruptions.corrupt(x.astype(np.float32), name,
                                                           jax.random.key(0), **level))
    keys = jax.random.split(jax.random.key(0), 2)
    batch = corruptions.corrupt_batch(np.stack([x, x]), name, keys, **level)
    assert batch.dtype == np.float64
    np.testing.assert_array_equal(batch, corruptions.corrupt_batch(
        np.stack([x, x]).astype(np.float32), name, keys, **level))
  from PIL import Image

  with pytest.raises(ValueError, match=r"of type Image: give an H x W x 3 array .*convert"):
    corruptions.corrupt(Image.new("RGB", (48, 48)), "fog", jax.random.key(0), severity=3)
  with pytest.raises(ValueError, match=r"image shape \(0, 4, 3\) is empty"):
    corruptions.corrupt(np.zeros((0, 4, 3), np.uint8), "fog", jax.random.key(0), severity=3)


def test_data_side_corruption_runs_inside_a_caller_s_mesh():
  """A bad record's replacement is made in whatever thread draws the batch, which can be inside
  the mesh of a trainer or the recovery cache; jit would refuse a host image against that mesh."""
  image, images = _images(1)[0], _images(2)
  key, keys = jax.random.key(4), jax.random.split(jax.random.key(5), 2)
  single = transforms.CorruptOnTheFly("robust_r1_pipeline", 0, -1.0, seed=3,
                                      intensity_draw="record")
  calls = {
      "corrupt": lambda: corruptions.corrupt(image, "contrast", key, severity=2),
      "pipeline": lambda: corruptions.corrupt(image, "robust_r1_pipeline", key, intensity=0.5),
      "batch": lambda: corruptions.corrupt_batch(images, "contrast", [key, key], severity=2),
      "batch pipeline": lambda: corruptions.corrupt_batch(images, "robust_r1_pipeline", keys,
                                                          intensity=0.5, batch="vmap"),
      "plan": lambda: rr.apply_pipeline(image, key, 0.5, return_plan=True)[0],
      "group": lambda: np.stack([r["corrupted"] for r in corrupt_groups.CorruptGroup(
          single).map(_records(corrupt_groups.GROUP))]),
  }
  outside = {name: call() for name, call in calls.items()}
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  assert len(jax.devices()) > 1  # one host device against a mesh of several
  with jax.set_mesh(mesh):
    for name, call in calls.items():
      np.testing.assert_array_equal(call(), outside[name], err_msg=name)
    # and the caller's mesh is back
    assert jax.sharding.get_abstract_mesh().shape == {"data": len(jax.devices())}


# ------------------------------------------------------------------------------ batch forms

@pytest.mark.parametrize("name", ["gaussian_blur", "pixelate", "motion_blur"])
def test_batch_forms_give_the_single_image_results(name):
  images = _images(3)
  keys = jax.random.split(jax.random.key(1), 3)
  maps = corruptions.corrupt_batch(images, name, keys, severity=4, batch="map")
  vmaps = corruptions.corrupt_batch(images, name, keys, severity=4, batch="vmap")
  per_image = corruptions.corrupt_batch(images, name, keys, severity=[4, 4, 4], batch="map")
  chex.assert_trees_all_equal_shapes_and_dtypes(maps, vmaps, per_image, images)
  for i in range(3):
    single = corruptions.corrupt(images[i], name, keys[i], severity=4)
    for batch in (maps, vmaps, per_image):
      # One severity is bound into the batch program, traced in the single one: XLA may round a
      # value across an 8-bit step, nothing more.
      assert np.abs(batch[i].astype(int) - single).max() <= 1
      assert np.mean(batch[i] != single) < 0.01


def test_pipeline_batch_runs_each_image_s_own_plan():
  images = _images(4, 32, 40)
  keys = jax.random.split(jax.random.key(5), 4)
  table = {n: rr.DEGRADATIONS[n] for n in ("hsv_saturation", "lens_blur", "scan_lines",
                                           "dark_illumination", "gaussian_noise",
                                           "sharpness_change")}
  out, plans = rr.apply_pipeline_batch(images, keys, return_plans=True, table=table)
  grouped = rr.apply_pipeline_batch(images, keys, batch="vmap", table=table)
  assert len({tuple(n for _, n, _ in p) for p in plans}) > 1  # the batch takes several branches
  for i in range(4):
    single, plan = rr.apply_pipeline(images[i], keys[i], return_plan=True, table=table)
    assert plan == plans[i]
    np.testing.assert_array_equal(out[i], single)
    assert np.abs(grouped[i].astype(int) - single).max() <= 1


# -------------------------------------------------------------------------- record groups

def _records(n, epoch=0):
  return [{"image": im, "index": 10 + i, "epoch": epoch} for i, im in enumerate(_images(n, 32, 32))]


@pytest.mark.parametrize("corruption, severity, intensity", [
    ("imagenet_c/contrast", 0, -1.0),  # one name, a severity drawn per record
    ("robust_r1/scan_lines", 0, -1.0),  # an intensity drawn per record
    ("imagenet_c", 0, -1.0),  # a name per record: one by one
])
def test_a_group_is_corrupted_as_its_records_one_by_one(corruption, severity, intensity):
  single = transforms.CorruptOnTheFly(corruption, severity, intensity, seed=3)
  _check_group(single)


def test_a_pipeline_group_with_intensities_drawn_per_record():
  _check_group(transforms.CorruptOnTheFly("robust_r1_pipeline", 0, -1.0, seed=3,
                                          intensity_draw="record"))


def test_a_group_with_records_drawn_clean():
  single = transforms.CorruptOnTheFly("robust_r1_pipeline", 0, -1.0, seed=3,
                                      intensity_draw="record", clean_fraction=0.4)
  kinds = {single.map(r)["corruption"] for r in _records(corrupt_groups.GROUP)}
  assert kinds == {"none", "robust_r1_pipeline"}  # the group holds both
  _check_group(single)


def _check_group(single):
  group = corrupt_groups.CorruptGroup(single)
  records = _records(corrupt_groups.GROUP)
  together = group.map(records)
  assert len(together) == len(records)
  for got, record in zip(together, records):
    want = single.map(record)
    assert sorted(got) == sorted(want)
    np.testing.assert_array_equal(got["corrupted"], want["corrupted"])
    np.testing.assert_array_equal(got["clean"], want["clean"])
    assert got["corruption_steps"] == want["corruption_steps"]
    assert got["corruption_levels"] == pytest.approx(want["corruption_levels"])


def test_a_group_passes_skips_and_mixed_sizes_through():
  single = transforms.CorruptOnTheFly("imagenet_c/contrast", 2, seed=0)
  records = _records(3)
  records[1] = bad_records.skip_record("broken", "x.png", 11)
  records.append({"image": _images(1, 40, 32)[0], "index": 20, "epoch": 0})
  out = corrupt_groups.CorruptGroup(single).map(records)
  assert out[1] is records[1]
  for got, record in zip(out, records):
    if not bad_records.is_skip(record):
      np.testing.assert_array_equal(got["corrupted"], single.map(record)["corrupted"])
  ungroup = corrupt_groups.Ungroup()
  assert ungroup.flat_map(out) == out and ungroup.max_fan_out == corrupt_groups.GROUP


# ------------------------------------------------------------------------------- benchmarks

def test_ratio_and_alternation():
  r = benchmarks.Ratio.of([4.0, 1.0, 3.0, 2.0])
  assert (r.median, r.low, r.high, r.minimum, r.maximum, r.rounds) == (2.5, 1.75, 3.25, 1, 4, 4)
  assert "2.5" in str(r) and "1.75" in r.short()
  calls = []
  timed = benchmarks.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               0.0, min_reps=3, warmup=1)
  assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then sides in turn
  assert len(timed.times["a"]) == 3 and timed.ratio("a", "b").rounds == 3


def test_short_calls_are_repeated_and_timed_per_call(monkeypatch):
  # Each measurement repeats a short call, the same count on both sides, for at least
  # min_measurement_s, and records the time per call. The clock is the test's own (binary
  # fractions of a second, exact in floats): the real one made this test flaky under load.
  clock = types.SimpleNamespace(now=0.0)
  monkeypatch.setattr(benchmarks, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
  counts = {"fast": 0, "slow": 0}

  def side(name, ticks):
    def call():
      counts[name] += 1
      clock.now += ticks / 1024
    return call
  timed = benchmarks.alternate({"fast": side("fast", 1), "slow": side("slow", 2)}, 0.0,
                               min_reps=2, warmup=1, min_measurement_s=10 / 1024)
  # The fastest side's one timed call took 1/1024 s, so a measurement is 10 calls; each side:
  # 1 warm-up + 1 timing call + 2 rounds of 10.
  assert counts == {"fast": 22, "slow": 22}
  assert timed.times == {"fast": [1 / 1024] * 2, "slow": [2 / 1024] * 2}
  assert timed.ratio("slow", "fast").median == 2.0


def test_a_goal_is_printed_with_its_verdict():
  assert benchmarks.goal(1.26, 1.3, at_most=True) == "(goal <= 1.3: met)"
  assert benchmarks.goal(1.79, 1.3, at_most=True) == "(goal <= 1.3: missed)"
  assert benchmarks.goal(0.742, 1, at_most=False) == "(goal >= 1: missed)"
  assert benchmarks.goal(1.0, 1, at_most=False) == "(goal >= 1: met)"


def test_bench_corrupt_rows():
  from robust_u1_jax.benchmarks import corrupt

  rows = corrupt.corruption_rows(0.0, ["contrast", "pixelate"], batch=2, min_reps=1)
  assert [r["name"] for r in rows] == ["contrast", "pixelate"]
  for r in rows:
    assert math.isfinite(r["ratio"].median) and r["ratio"].median > 0
    assert r["jax_s"] > 0 and r["host_s"] > 0


def test_bench_data_alternates_the_pipelines():
  from robust_u1_jax.benchmarks import data

  r = data.compare_pipelines(CONFIG, 0.2, rounds=2, corruption="contrast")
  assert len(r["clean"]) == len(r["corrupted"]) == 2
  assert r["corruption"] == "contrast"
  assert r["cost_ratio"].rounds == 2 and r["cost_ratio"].median > 0
