"""`bench recover` (robust_u1_jax/benchmarks/recover.py) on a very small model: each measurement
returns finite positive ratios, the FLOP model counts what the implementation computes, and part
e's AOT compile (recover_7b.py) runs for fake CPU devices."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from robust_u1_jax.benchmarks import recover, recover_7b, recovery_flops
from robust_u1_jax.inference import recovery

SIZE = (32, 48)  # latent grid 2 x 3, ViT 2 x 3 patches of 16


@pytest.fixture(scope="module")
def setup(random_bagel):
  config = recover.bench_config(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=16)
  return recover.Setup.from_model(random_bagel(config), "smoke")


def _positive(x):
  return math.isfinite(x) and x > 0


def test_cached_vs_uncached(setup):
  r = recover.cached_vs_uncached(setup, SIZE, 0.0, min_reps=1)
  assert r["block"] == 2 * 3 + 2 and r["row"] == r["context"] + r["block"]
  assert _positive(r["cached_s"]) and _positive(r["uncached_over_cached"])


def test_context_scaling_pads_the_instruction(setup):
  r = recover.context_scaling(setup, SIZE, 0.0, (64, 128), min_reps=1)
  assert r["contexts"] == (64, 128)  # the step checked that the caches hold exactly these
  assert _positive(r["ratio"]) and r["flop_ratio"] > 1.0
  assert 0 < r["attention_share"][64] < r["attention_share"][128] < 1


def test_cfg_batching(setup):
  # cfg_batching asserts that the batched and separate guided velocities agree.
  r = recover.cfg_batching(setup, SIZE, 0.0, min_reps=1)
  assert r["slots"][0] > r["slots"][2]  # the text-only context is the short one
  assert _positive(r["separate_over_batched"])


def test_step_bar_cost(setup):
  # step_bar_cost asserts that the recoveries a move at a time and in one program are the same.
  r = recover.step_bar_cost(setup, SIZE, 0.0, steps=3, min_reps=1)
  assert _positive(r["plain_s"]) and _positive(r["moves_over_plain"])


def test_recovery_flops_floor_below_the_implementation(setup):
  inputs = recover.recovery_rows(setup, SIZE)
  f = recovery_flops.recovery_flops(setup.config, inputs, moves=4)
  assert f["tokens"][0] == f["tokens"][1] + len(setup.instruction_ids)
  assert f["tokens"][2] == len(setup.instruction_ids)
  llm = setup.config.llm
  # One denoising call, all three branches: each block token once per branch through its own
  # expert, against its own context and the block.
  per_step = sum(
      recovery_flops.step_flops(llm, f["block"], k + f["block"]) for k in f["tokens"])
  assert np.isclose(f["denoise_linear"] + f["denoise_attention"], 4 * per_step)
  assert 0 < f["floor"] < f["library"]


def test_recovery_compiles_ahead_of_time_for_fake_devices(setup):
  """Part e's path, with the smoke model in place of BAGEL-7B: the recovery and its loop body
  compiled for 2 fake CPU devices, the compiler's FLOPs beside the analytic count."""
  r = recover_7b.compile_recovery_7b("cpu:2", height=SIZE[0], width=SIZE[1], steps=3,
                                     model_config=setup.config, separate_step=False,
                                     say=lambda *a, **k: None)
  assert (r["num_devices"], r["mesh"]["tensor"], r["moves"]) == (2, 2, 2)
  assert "oom" not in r and r["memory"]["total"] > r["weight_bytes_per_device"] > 0
  assert r["step_cost"]["flops"] > 0 and r["vae_flops"] > 0
  f = r["flops"]
  assert 0 < f["floor"] < f["library"]
  # The analytic count of this implementation's work is XLA's (the recovery program + one more
  # step), within the elementwise work it leaves out (measured: 0.96 of it).
  compiled = r["compiled_flops_per_device"] * r["num_devices"]
  assert 0.8 * f["library"] < compiled < 1.25 * f["library"]
  report = recover_7b.report_7b(r)
  assert "memory per chip" in report and "no peak FLOP/s" in report


def test_context_longer_than_the_images_is_required(setup):
  with pytest.raises(ValueError, match="shorter than the image blocks"):
    recover.recovery_rows(setup, SIZE, context=8)


def test_the_7b_recovery_steps_are_the_sampler_s():
  assert recovery.Sampler().num_steps == recover_7b.RECOVERY_7B["steps"]


def test_import_leaves_the_backend_unstarted():
  """--topology cpu:N sets the CPU device count after the module is imported (bench.py imports it
  first), which only works while no JAX backend has started."""
  code = ("import jax; from robust_u1_jax.benchmarks import aot, recover; "
          "aot._ensure_host_backend(3); print(jax.device_count())")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  assert out.stdout.split()[-1] == "3"
