"""`bench train_step` (robust_u1_jax/benchmarks/train_step.py) on the tiny SFT config: the
trainer's step and a recovery run and are timed, the model FLOPs are the trainer's count, and the
one-H200 config loads with its preset."""

import math
import os

import jax
import pytest

from robust_u1_jax import config_lib, flops
from robust_u1_jax.benchmarks import train_step
from robust_u1_jax.models import bagel
from robust_u1_jax.training import run_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft.py")
SMALL = ["data.batch_size=2", "eval_data.batch_size=1", "steps=2", "batches=2", "recovery_steps=2",
         "recoveries=1", "recovery_side=32"]


def test_tiny_step_and_recovery_are_timed(monkeypatch, random_bagel, capsys):
  # The model from numpy draws: compiling the tiny model's initialisers is what would make this
  # test slow, and the trainer's initialisation is tested elsewhere.
  monkeypatch.setattr(run_setup, "init_model", lambda config, mesh, mc: random_bagel(mc))
  r = train_step.run(seconds=0.0, config=f"{SFT}:tiny", overrides=SMALL)
  printed = capsys.readouterr().out
  assert "model-FLOPs MFU: n/a" in printed and "peak device memory" in printed
  assert r["platform"] == "cpu" and r["mfu"] is None and r["peak_bytes"] is None
  assert r["step_s"] > 0 and r["step_spread"].rounds >= 2
  assert all(math.isfinite(x) for x in r["losses"])
  assert 0 < r["tokens"] <= r["slots"] and r["tokens_per_s"] > 0
  f = r["model_flops"]
  assert f["total"] > f["forward"] > 0 and r["trainable"] < r["params"]
  rec = r["recovery"]
  assert rec["size"] == (32, 32) and rec["steps"] == 2 and rec["median_s"] > 0
  # A compile read back from the persistent cache (the tests share one) is said to be, not timed
  # as a compile.
  for cached, line in ((r["warmup_cached"], "warm-up steps with the compile"),
                       (rec["first_cached"], "first call (compile + run)")):
    shown = next(x for x in printed.splitlines() if line in x)
    assert isinstance(cached, bool) and (train_step.CACHED_COMPILE in shown) == cached, shown


def test_options_and_config_overrides_are_split():
  options, fields = train_step.split_overrides(["steps=3", "remat=dots", "data.batch_size=1"])
  assert options == {**train_step.OPTIONS, "steps": 3}
  assert fields == {"remat": "dots", "data.batch_size": 1}
  with pytest.raises(SystemExit, match="recovery_steps >= 2"):
    train_step.split_overrides(["recovery_steps=1"])
  # An override that is neither names both kinds (it listed the config's fields alone).
  with pytest.raises(config_lib.ConfigError, match=r"no field nosuch; the fields are .*; or one of "
                     r"train_step's own --override options: steps, batches, recovery_steps"):
    train_step.run(config=train_step.DEFAULT_CONFIG, overrides=["nosuch=1"])


def test_gpu_config_is_bagel_at_1p5b_per_expert():
  config = config_lib.load(f"{SFT}:gpu_1p5b")
  assert (config.model, config.compute_dtype, config.attention) == ("bagel_1p5b", "bfloat16",
                                                                    "cudnn")
  mc = bagel.preset(config.model)
  run_setup.check_data_fits_model(config, mc)
  llm = mc.llm
  # Qwen2.5-1.5B's decoder: 1.31 B parameters per expert (embeddings and lm_head apart).
  per_layer = (llm.hidden_size * (2 * llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim
               + 3 * llm.hidden_size * llm.intermediate_size)
  assert 1.30e9 < per_layer * llm.num_layers < 1.32e9
  assert flops.expert_flops_per_token(llm) == 2.0 * per_layer * llm.num_layers


def test_a_train_state_larger_than_the_host_is_refused_before_it_is_built(monkeypatch):
  sixteen_gib = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 16 * 2 ** 30 // 4096}
  monkeypatch.setattr(os, "sysconf", lambda name, real=os.sysconf: sixteen_gib.get(name) or
                      real(name))
  cpu = jax.devices("cpu")[0]
  # The tiny model's state fits; the 1.5B one's (3.58 B float32 weights, Adam and EMA on the
  # generation expert's 1.5 B) does not, and is counted without allocating it.
  train_step._check_state_fits_host(config_lib.load(f"{SFT}:tiny"), cpu, "tiny")
  with pytest.raises(ValueError, match=r"train_step: gpu_1p5b: the train state alone .* needs "
                                       r"28\.0\d GiB, and this machine has 16\.00 GiB"):
    train_step._check_state_fits_host(config_lib.load(f"{SFT}:gpu_1p5b"), cpu, "gpu_1p5b")
