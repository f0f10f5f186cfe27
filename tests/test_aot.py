"""Ahead-of-time compile of the real train step (robust_u1_jax/benchmarks/aot.py): topology names,
input shapes from the config, per-device memory, FLOPs and the fits / does-not-fit verdict.

The compile tests use the tiny SFT config on the 8 fake CPU devices conftest sets up; the TPU
topology test needs libtpu (`pip install -e ".[tpu]"`) and is skipped without it, as in CI.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from robust_u1_jax.benchmarks import aot
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.models import bagel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft.py")
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


def test_7b_inputs_follow_the_packing_budget():
  config = aot.load_config(f"{SFT}:bagel_7b")  # init_from '' becomes 'random': no weights
  assert config.init_from == "random"
  shapes = aot.step_input_shapes(config, bagel.BagelConfig.bagel_7b(), instruction_tokens=14)
  b, t = config.data.batch_size, config.data.token_budget
  assert (b, t) == (32, 8192)
  assert shapes["inputs"]["text_ids"] == ((b, t), np.int32)
  assert shapes["inputs"]["vit_patches"] == ((b, t, 3 * 14 * 14), np.uint8)
  assert shapes["inputs"]["latent_seq_index"][0] == (b, t)
  assert shapes["layout"]["noisy"] == ((b, t), np.bool_)
  # Slots of the smallest sample (224 px ViT: 258 tokens; 512 px VAE: 2 x 1026; text 2): 2312
  # tokens, so 3 per row; corrupted + clean canvases of the 512 px VAE side each.
  assert shapes["images"] == ((b, 2 * (t // 2312), 512, 512, 3), np.uint8)


@pytest.mark.parametrize("token_budget", [0, 256])
def test_input_shapes_match_the_stage_host_inputs(token_budget):
  """The config-derived shapes are those the stage's host_inputs make of a pipeline batch,
  unpacked and packed."""
  config = aot.load_config(f"{SFT}:tiny", {**FAST, "data.token_budget": token_budget})
  ctx, spec = aot.build_stage(config, jax.devices()[:8])
  mesh = ctx.mesh
  with pipeline_lib.make_pipeline(config.data, seed=0, tokenizer=ctx.tokenizer,
                                  stage="sft") as data:
    batch = next(data)
  host = spec.host_inputs(batch, np.random.default_rng(0))
  n_text = len(tokenizer_lib.encode_text_block(ctx.tokenizer, config.instruction))
  expected = aot.abstract_inputs(aot.step_input_shapes(config, ctx.model.config, n_text), mesh)
  describe = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype).name), tree)
  assert describe(host) == describe(expected)


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
  fits, line = aot.verdict(r)
  assert fits and line.startswith("FITS"), line
  fits, line = aot.verdict(r, hbm_gib=r.device_bytes / 2 / aot.GIB)
  assert not fits and line.startswith("DOES NOT FIT") and "2.0x" in line, line
  text = aot.report(r, hbm_gib=1e-6)
  assert "VERDICT: DOES NOT FIT" in text and "FLOPs per step" in text


def test_parse_oom_reads_the_tpu_compiler_refusal():
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
             "space hbm. Used 1.50T of 95.74G hbm. Exceeded hbm capacity by 1.41T.\n\n"
             "Total hbm usage >= 1.41T:\n    reserved        530.00M\n    program          1.50T\n"
             "\n  Largest program allocations in hbm:\n\n  1. Size: 896.00G\n")
  oom = aot.parse_oom(message)
  assert oom["used"] == int(1.5 * 1024 ** 4) and oom["capacity"] == int(95.74 * 1024 ** 3)
  assert oom["exceeded"] == int(1.41 * 1024 ** 4)
  assert "Size: 896.00G" in oom["details"] and oom["what"] == "the whole program"
  # The form measured for configs/sft.py:bagel_7b (remat=none) on v5p-64.
  oom = aot.parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                      "for HLO temporaries (38.15T) exceeds available HBM (95.74G).")
  assert oom["used"] == int(38.15 * 1024 ** 4) and "lower bound" in oom["what"]
  assert aot.parse_oom("INVALID_ARGUMENT: something else") is None


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
  fits, line = aot.verdict(r)
  assert fits and "HBM of one TPU v5" in line, line
