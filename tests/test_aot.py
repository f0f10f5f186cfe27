"""Ahead-of-time compile of the real train step (robust_u1_jax/benchmarks/aot.py): topology names,
input shapes from the config, per-device memory, FLOPs and the fits / does-not-fit verdict
(benchmarks/aot_report.py).

The compile tests use the tiny SFT config on the 8 fake CPU devices conftest sets up; the TPU
topology test needs libtpu (`pip install -e ".[tpu]"`) and is skipped without it, as in CI.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_u1_jax.benchmarks import aot, aot_report, aot_steps, hlo_flops
from robust_u1_jax.benchmarks import compiled as compiled_lib
from robust_u1_jax.training import recovery_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft.py")
RL = os.path.join(ROOT, "configs", "rl.py")
REASON = os.path.join(ROOT, "configs", "reason.py")
# The step's shapes do not depend on the corruption; skipping it keeps the eval batch cheap.
FAST = {"data.corruption": "none"}


def test_topology_names():
  assert aot.libtpu_topology_name("v5p-8") == "v5p:2x2x1"
  assert aot.libtpu_topology_name("v5p-64") == "v5p:2x4x4"
  assert aot.libtpu_topology_name("v5p-128") == "v5p:4x4x4"
  assert aot.libtpu_topology_name("v4-32") == "v4:2x2x4"
  assert aot.libtpu_topology_name("v5e-16") == "v5e:4x4"
  assert aot.libtpu_topology_name("v5litepod-8") == "v5e:2x4"
  assert aot.libtpu_topology_name("v6e-256") == "v6e:16x16"
  assert aot.libtpu_topology_name("v5p:4x4x8") == "v5p:4x4x8"
  assert aot.accelerator_type("v5p:2x4x4") == "v5p-64"
  assert aot.accelerator_type("v5e:4x4") == "v5litepod-16"
  with pytest.raises(aot.AotError, match="not understood"):
    aot.libtpu_topology_name("tpu-64")
  with pytest.raises(aot.AotError, match="power-of-two"):
    aot.libtpu_topology_name("v5p-48")
  with pytest.raises(aot.AotError, match="smallest v5p slice is v5p-8"):
    aot.libtpu_topology_name("v5p-4")


def test_builder_config_puts_the_run_on_the_shapes_world():
  """A 7B run's own source becomes the shapes world at its sides; packing and batch stay."""
  config = aot.load_config(f"{SFT}:bagel_7b")  # init_from '' becomes 'random': no weights
  assert config.init_from == "random" and config.data.source == "tfds"
  with aot_steps.stage_environment(config) as workdir:
    c = aot_steps.builder_config(config, workdir)
  d = c.data
  assert (d.source, d.image_size) == ("shapes", 560)  # 5 x lcm(16, 14), nearest 512
  assert (d.batch_size, d.vae_max_side, d.vit_max_side) == (32, 512, 518)
  assert d.token_budget == config.data.token_budget > 0
  assert c.eval_data.source == "shapes" and c.eval_data.batch_size == 8
  assert config.data.source == "tfds"  # the caller's config is left alone


def test_reasoning_builder_config_opens_as_a_recovery_cache():
  config = aot.load_config(f"{REASON}:bagel_7b")
  assert config.reason.recovered_images == "cache"
  with aot_steps.stage_environment(config) as workdir:
    c = aot_steps.builder_config(config, workdir)
    cache = recovery_cache.RecoveryCache.open(c.reason.recovery_cache, c)
    assert cache.directory.startswith(workdir)
  assert not os.path.exists(workdir)  # the scratch directory goes with the environment


def test_abstract_inputs_take_the_batch_size_and_split_rows():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
  host = {"rows": np.zeros((2, 5, 3), np.int32), "images": np.zeros((2, 1, 4, 4, 3), np.uint8)}
  inputs = aot_steps.abstract_inputs(host, 16, mesh)
  assert inputs["rows"].shape == (16, 5, 3) and inputs["images"].dtype == np.uint8
  assert inputs["rows"].sharding.shard_shape((16, 5, 3)) == (2, 5, 3)
  # The flag that changes the batch is named, beside the device count.
  with pytest.raises(aot_steps.StageError, match=r"multiple of 8 \(--override "
                     r"data.batch_size=16\), or fewer devices"):
    aot_steps.abstract_inputs(host, 12, mesh)


def test_unknown_stage_is_refused_with_one_line():
  config = aot.load_config(f"{SFT}:tiny")
  config.stage = "pretrain"
  with pytest.raises(aot_steps.StageError, match="sft, rl, reason"):
    with aot_steps.stage_environment(config):
      pass


@pytest.fixture(scope="module")
def tiny_cpu():
  return aot.compile_step(f"{SFT}:tiny", "cpu:8", FAST, verbose=False)


def test_cpu_topology_reports_memory_flops_and_verdict(tiny_cpu):
  r = tiny_cpu
  assert r.num_devices == 8 and r.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
  assert r.oom is None
  m = r.memory
  assert m["argument_size_in_bytes"] > 0 and m["output_size_in_bytes"] > 0
  assert m["temp_size_in_bytes"] > 0
  assert 0 < r.state_bytes_per_device <= m["argument_size_in_bytes"]
  assert m["alias_size_in_bytes"] > 0  # the state is donated, as the trainer does
  assert r.device_bytes > 0
  assert r.flops_per_device > 0 and r.flops_program > 0
  assert r.trainable < r.params
  # The model FLOPs count the real tokens of the compiled rows; the compiled program computes
  # padding, both experts on every token and the remat recompute besides, and its loop bodies
  # (the layer scans) run their trip counts, so it counts more than XLA's cost analysis.
  model = r.model_flops["total"] / r.num_devices
  assert 0 < model < r.hlo.flops
  assert r.hlo.flops_once < r.hlo.flops and r.hlo.unknown_trip_counts == 0
  assert r.flops_per_device == pytest.approx(r.hlo.flops_once, rel=0.5)
  assert r.model_flops["backward"] > 0 and "gen" in r.model_flops["trainable_parts"]
  fits, line = aot_report.verdict(r)
  assert fits and line.startswith("FITS"), line
  # A small need is a small share, not a spare that rounds to all of it.
  fits, line = aot_report.verdict(r, hbm_gib=r.device_bytes * 3000 / compiled_lib.GIB)
  assert fits and "per device (0.033 %)" in line and "(100%)" not in line, line
  fits, line = aot_report.verdict(r, hbm_gib=r.device_bytes / 2 / compiled_lib.GIB)
  assert not fits and line.startswith("DOES NOT FIT") and "2.0x" in line, line
  # The 7B config's 32k-token rows "did not fit" cpu:8 at 26.7x, though they fit v5p-64.
  assert "fake CPU devices run XLA's dense attention" in line, line
  text = aot_report.report(r, hbm_gib=1e-6)
  assert "VERDICT: DOES NOT FIT" in text and "FLOPs per step" in text
  # Its memory is dense attention's, which a reader comparing with a TPU slice must know.
  assert "cpu:8 = 8 fake CPU devices, attention dense (a TPU slice's is splash)" in text
  assert "model (flops.py)" in text and "loop bodies times their trip counts" in text
  # A compile time that was a read from the persistent cache says so (a 59.5 s compile read 3.4).
  assert "persistent compilation cache" not in aot_report.report(
      dataclasses.replace(r, compile_cached=False))
  assert "compile 1.0 s (read from the persistent compilation cache" in aot_report.report(
      dataclasses.replace(r, compile_s=1.0, compile_cached=True))


def test_cache_hits_are_counted_within_the_block():
  with aot.counted_cache_hits() as hits:
    jax.monitoring.record_event("/jax/compilation_cache/compile_requests_use_cache")
    jax.monitoring.record_event(aot.CACHE_HIT_EVENT)
  jax.monitoring.record_event(aot.CACHE_HIT_EVENT)  # after the block: not counted
  assert hits == [aot.CACHE_HIT_EVENT]


@pytest.mark.slow
@pytest.mark.parametrize("spec, topology, overrides, trains", [
    # RL: the rollout plus 2 updates; a batch of 2 images splits over 2 devices.
    (f"{RL}:tiny", "cpu:2", {}, "gen"),
    # Reasoning on precomputed recoveries, as configs/reason.py:bagel_7b runs.
    (f"{REASON}:tiny", "cpu:8", {"reason.recovered_images": "cache"}, "und"),
])
def test_rl_and_reasoning_steps_compile(spec, topology, overrides, trains):
  r = aot.compile_step(spec, topology, overrides, verbose=False)
  assert r.oom is None and r.memory["temp_size_in_bytes"] > 0
  assert r.memory["alias_size_in_bytes"] > 0  # the state is donated
  assert aot_report.verdict(r)[0]
  assert trains in r.model_flops["trainable_parts"] and r.model_flops["backward"] > 0
  assert 0 < r.model_flops["total"] / r.num_devices < r.hlo.flops
  assert r.hlo.unknown_trip_counts == 0


def test_parse_oom_reads_the_tpu_compiler_refusal():
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
             "space hbm. Used 1.50T of 95.74G hbm. Exceeded hbm capacity by 1.41T.\n\n"
             "Total hbm usage >= 1.41T:\n    reserved        530.00M\n    program          1.50T\n"
             "\n  Largest program allocations in hbm:\n\n  1. Size: 896.00G\n")
  oom = compiled_lib.parse_oom(message)
  assert oom["used"] == int(1.5 * 1024 ** 4) and oom["capacity"] == int(95.74 * 1024 ** 3)
  assert oom["exceeded"] == int(1.41 * 1024 ** 4)
  assert "Size: 896.00G" in oom["details"] and oom["what"] == "the whole program"
  # The form measured for configs/sft.py:bagel_7b (remat=none) on v5p-64.
  oom = compiled_lib.parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                               "required for HLO temporaries (38.15T) exceeds available HBM "
                               "(95.74G).")
  assert oom["used"] == int(38.15 * 1024 ** 4) and "lower bound" in oom["what"]
  assert compiled_lib.parse_oom("INVALID_ARGUMENT: something else") is None


@pytest.mark.parametrize("fits, status", [(True, 0), (False, 1), (None, 0)])
def test_bench_exits_1_where_the_step_does_not_fit(monkeypatch, fits, status):
  """A script can ask `bench aot` whether a config fits (None: a benchmark without a verdict)."""
  import types

  from absl import flags
  from absl.testing import flagsaver

  from robust_u1_jax import bench

  fake = types.ModuleType("fake_aot")
  fake.run = lambda: {"fits": fits}
  monkeypatch.setitem(sys.modules, "fake_aot", fake)
  monkeypatch.setitem(bench.BENCHMARKS, "aot", ("fake_aot", "a fake"))
  parsed = flags.FLAGS.is_parsed()
  with flagsaver.flagsaver():
    flags.FLAGS(["bench"])
    try:
      assert bench.main(["bench", "aot"]) == status
    finally:
      if not parsed:  # as found: modules that read flags when parsed (benchmarks/recover.py)
        flags.FLAGS.unparse_flags()


def test_cli_passes_flags_and_explains_errors():
  """`bench aot` reaches the module's run with --topology and --override; errors are one line."""
  command = [sys.executable, "-m", "robust_u1_jax.bench", "aot", "--config", f"{SFT}:tiny",
             "--topology", "cpu:8", "--override", "data.batch_size=-1"]
  out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode != 0
  assert "aot: config" in out.stderr and "data.batch_size" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install -e ".[tpu]")')
def test_tpu_topology_compiles_the_tiny_step():
  r = aot.compile_step(f"{SFT}:tiny", "v5p:2x2x1", FAST, verbose=False)
  assert r.device_kind.startswith("TPU v5") and r.num_devices == 4
  assert r.memory["argument_size_in_bytes"] > 0 and r.memory["temp_size_in_bytes"] > 0
  assert r.flops_per_device > 0
  fits, line = aot_report.verdict(r)
  assert fits and "HBM of one TPU v5" in line, line


# -- compiled FLOPs with loop trip counts (hlo_flops) --------------------------------------------

def test_hlo_flops_counts_loop_bodies_by_their_trip_counts():
  def f(w, x):
    x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w)
    return jnp.sum(x)

  w = jax.ShapeDtypeStruct((7, 64, 64), jnp.float32)
  x = jax.ShapeDtypeStruct((32, 64), jnp.float32)
  compiled = jax.jit(jax.grad(f)).lower(w, x).compile()
  counted = hlo_flops.count(compiled.as_text())
  matmul = 2 * 32 * 64 * 64
  assert counted.flops == 7 * 3 * matmul  # forward, and the backward's two matmuls per layer
  assert counted.flops_once == 3 * matmul and counted.unknown_trip_counts == 0
  assert sorted(n for _, n, _ in counted.loops) == [7, 7]
  # XLA's cost analysis counts each loop body once (its elementwise work besides).
  assert counted.flops_once <= compiled.cost_analysis()["flops"] < 1.1 * counted.flops_once


def test_hlo_flops_counts_convolutions_as_xla_does():
  def f(image, kernel, a, b):
    y = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y) + jnp.sum(jnp.einsum("bij,bjk->bik", a, b))

  args = (jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32),
          jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32),
          jax.ShapeDtypeStruct((3, 8, 16), jnp.float32),
          jax.ShapeDtypeStruct((3, 16, 4), jnp.float32))
  compiled = jax.jit(f).lower(*args).compile()
  counted = hlo_flops.count(compiled.as_text())
  assert counted.flops == pytest.approx(compiled.cost_analysis()["flops"], rel=0.05)


def test_hlo_flops_reads_tpu_loops_and_batched_convolutions():
  """TPU programs state no trip count: the condition's `i < 28`, the body's `i + 2` and the
  initial 0 give it (windowed einsums step their counter by 2). They write a batched matmul (here
  4 x [8, 16] @ [16, 8]) as a convolution whose dilated windows mostly hit holes."""
  text = """HloModule m

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %c = s32[]{:T(128)} constant(28)
  %p = (s32[]{:T(128)}, f32[8,16]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c), direction=LT
}

%body (q: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %q = (s32[], f32[8,16]) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  %two = s32[]{:T(128)} constant(2)
  %next = s32[]{:T(128)} add(%j, %two)
  %lhs = f32[8,4,16,1]{3,2,1,0} get-tuple-element(%q), index=1
  %rhs = f32[8,4,1,16]{3,2,1,0} get-tuple-element(%q), index=1
  CONV
  ROOT %t = (s32[], f32[8,16]) tuple(%next, %conv)
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16] parameter(0)
  %zero = s32[]{:T(128)} constant(0)
  %init = (s32[], f32[8,16]) tuple(%zero, %x)
  %w = (s32[], f32[8,16]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8,16] get-tuple-element(%w), index=1
}
""".replace("CONV", "%conv = f32[4,8,8,1]{3,2,1,0} convolution(%lhs, %rhs), "
              "window={size=4x1 stride=3x1 lhs_dilate=4x1}, dim_labels=b0f1_o01i->0bf1")
  counted = hlo_flops.count(text)
  assert counted.flops_once == 4 * 2 * 8 * 16 * 8
  assert counted.flops == 14 * counted.flops_once and counted.unknown_trip_counts == 0
