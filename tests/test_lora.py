"""LoRA on the generation expert (training/lora.py): the factors, the exact merge, a step that
learns through them only, and a trainer run whose saved model is the base plus scale * A @ B."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import config_defaults, config_lib, sharding
from robust_u1_jax.data import sequence
from robust_u1_jax.data import shapes
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.models import bagel
from robust_u1_jax.training import flow_matching, lora, reasoning, sft, trainer
from robust_u1_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft.py") + ":tiny"
KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj",
           "mlp.down_proj")


@pytest.fixture(scope="module")
def model(random_bagel):
  """The tiny BAGEL with random parameters (llm2vae nonzero, so the generation expert matters)."""
  return random_bagel(bagel.BagelConfig.tiny())


def _dotted(path):
  return ".".join(str(p) for p in path)


def _split(model, rank=2, alpha=4.0):
  graphdef, params, frozen = state_lib.split_model(model, sft.GENERATION_PARAMS)
  return lora.setup(graphdef, params, frozen, rank, alpha, jax.random.PRNGKey(7))


def _sft_inputs(cfg, n=2):
  world = shapes.ShapesWorld("train")
  images = np.stack([world[i]["image"] for i in range(n)])
  batch = {"clean": images, "corrupted": images // 2,
           "instruction_ids": np.tile(np.arange(3, 9), (n, 1)),
           "instruction_lengths": np.full(n, 6)}
  inputs = sft.sft_rows(batch, cfg, sequence.Markers(1, 2), np.random.default_rng(0),
                        (0.0, 0.0, 0.0))
  return jax.tree.map(jnp.asarray, inputs)


def test_factors_cover_the_generation_kernels_only(model):
  cfg = model.config
  view, factors, base = _split(model, rank=3, alpha=6.0)
  assert view.scale == 2.0
  flat = {_dotted(p): v for p, v in nnx.to_flat_state(factors)}
  layers = cfg.llm.num_layers
  assert len(flat) == 2 * len(KERNELS)  # one stacked pair per kernel: a pair per layer
  base_flat = {_dotted(p): v for p, v in nnx.to_flat_state(base)}
  for name in KERNELS:
    kernel = f"language_model.layers.gen.{name}.kernel"
    n, d_in, d_out = base_flat[kernel].shape
    assert n == layers
    a, b = flat[kernel + ".lora_a"].get_value(), flat[kernel + ".lora_b"].get_value()
    assert a.shape == (layers, d_in, 3) and b.shape == (layers, 3, d_out)
    assert a.dtype == b.dtype == jnp.float32
    assert np.all(np.asarray(b) == 0) and np.std(np.asarray(a)) > 0
    assert not np.array_equal(a[0], a[1])  # each layer its own draw
  # The base holds every parameter of the model (the stage's trainable ones included).
  model_paths = {_dotted(p) for p, _ in nnx.to_flat_state(nnx.state(model))}
  assert set(base_flat) == model_paths


def test_factors_follow_the_kernel_sharding(model):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  _, params, _ = state_lib.split_model(model, sft.GENERATION_PARAMS)
  params = jax.device_put(params, sharding.state_shardings(params, bagel.COMPONENTS, mesh))
  factors = lora.init(params, 2, jax.random.PRNGKey(0))
  gen = factors["language_model"]["layers"]["gen"]["mlp"]["up_proj"]["kernel"]
  kernel = params["language_model"]["layers"]["gen"]["mlp"]["up_proj"]["kernel"].get_value()
  assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
  assert tuple(gen["lora_a"].get_value().sharding.spec) == (None, "fsdp", None)
  assert tuple(gen["lora_b"].get_value().sharding.spec) == (None, None, "tensor")
  assert gen["lora_a"].get_metadata()["out_sharding"] == ("layers", "embed", None)
  assert gen["lora_b"].get_metadata()["out_sharding"] == ("layers", None, "mlp")


@pytest.mark.slow
def test_zero_b_merge_is_the_base_model_exactly(model):
  cfg = model.config
  view, factors, base = _split(model)
  merged = view.merge_state(factors, base)
  for (p, x), (q, y) in zip(nnx.to_flat_state(merged), nnx.to_flat_state(base)):
    assert p == q
    np.testing.assert_array_equal(x.get_value(), y.get_value(), err_msg=_dotted(p))

  inputs, images = _sft_inputs(cfg)
  key = jax.random.PRNGKey(3)
  loss = lambda m: flow_matching.flow_matching_loss(m, inputs, images, key, 1.0)[0]
  run = jax.jit(lambda state: loss(nnx.merge(view.graphdef, state)))  # one compile for both
  assert float(run(base)) == float(run(merged))

  # A nonzero B: the targeted kernels move by exactly scale * A @ B, nothing else moves.
  factors = jax.tree.map(lambda x: x + 0.1, factors)
  moved = {_dotted(p): v.get_value() for p, v in nnx.to_flat_state(view.merge_state(factors,
                                                                                     base))}
  fl = {_dotted(p): v.get_value() for p, v in nnx.to_flat_state(factors)}
  for p, w in ((_dotted(p), v.get_value()) for p, v in nnx.to_flat_state(base)):
    if p + ".lora_a" in fl:
      want = np.asarray(w) + view.scale * np.asarray(fl[p + ".lora_a"]) @ np.asarray(
          fl[p + ".lora_b"])
      np.testing.assert_allclose(moved[p], want, rtol=1e-6, atol=1e-6, err_msg=p)
    else:
      np.testing.assert_array_equal(moved[p], w, err_msg=p)


def test_lora_step_overfits_one_batch(model):
  cfg = model.config
  view, factors, base = _split(model, rank=4, alpha=8.0)
  optimizer = config_defaults.get_optimizer_config()
  optimizer.learning_rate, optimizer.warmup_steps = 1e-2, 0
  tx = state_lib.make_optimizer(optimizer, 100)
  state = state_lib.create_state(factors, base, tx, jax.random.PRNGKey(0), False)
  step = jax.jit(sft.make_step(view, tx, timestep_shift=1.0, ema_decay=0.0))
  inputs = _sft_inputs(cfg)
  key = state.rng
  losses = []
  for _ in range(8):
    state, metrics = step(state.replace(rng=key), inputs)  # the same t and noise every step
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  # Only the factors moved.
  assert jax.tree.structure(state.params) == jax.tree.structure(factors)
  for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_trainer_run_with_lora_changes_only_the_targeted_kernels(tmp_path, random_bagel,
                                                               bagel_params):
  from robust_u1_jax.checkpoints import orbax_io

  tok = tokenizer_lib.load_tokenizer()
  initial = random_bagel(bagel.BagelConfig.tiny(vocab_size=max(len(tok), 64)))
  init_dir = orbax_io.save_orbax(initial, str(tmp_path / "init"))
  workdir = str(tmp_path / "run")
  overrides = {"init_from": init_dir, "lora.rank": 2, "data.batch_size": 8, "log_every": 1,
               "checkpoint_every": 2, "mesh.data": -1, "mesh.fsdp": 1, "tensorboard": False,
               "eval_every": 0, "optimizer.learning_rate": 1e-2,
               "optimizer.warmup_steps": 0, "optimizer.ema_decay": 0.0}
  config = config_lib.load(SFT, {**overrides, "total_steps": 3})
  history = trainer.train(config, workdir, sft.build)
  assert [row["step"] for row in history] == [1, 2, 3]
  before = bagel_params(initial)
  after = bagel_params(orbax_io.load_orbax(os.path.join(workdir, "model")))
  assert before.keys() == after.keys()
  targeted = {p for p in before if p.endswith(".kernel") and ".gen." in p and
              any(f".gen.{k}.kernel" in p for k in KERNELS)}
  assert len(targeted) == len(KERNELS)  # stacked over the layers
  for p in before:
    if p not in targeted:  # untargeted generation parameters included: bit-identical
      np.testing.assert_array_equal(after[p], before[p], err_msg=p)
      continue
    for layer, diff in enumerate(after[p].astype(np.float64) - before[p]):
      singular = np.linalg.svd(diff, compute_uv=False)
      assert singular[0] > 1e-4, (p, layer)  # trained ...
      assert np.all(singular[2:] < 1e-5 * singular[0]), (p, layer, singular[:4])  # rank <= 2

  # Resuming from the step-2 checkpoint (LoRA factors, their Adam moments) ends in the same model.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  shutil.rmtree(os.path.join(workdir, "model"))
  history = trainer.train(config, workdir, sft.build)
  assert [row["step"] for row in history] == [3]
  resumed = bagel_params(orbax_io.load_orbax(os.path.join(workdir, "model")))
  for p in after:
    np.testing.assert_array_equal(resumed[p], after[p], err_msg=p)

  # The factors are the checkpoint, the base is read from init_from again: resumed onto another
  # base, they would sit on weights they were not trained with. Refused before the model is built;
  # the same model moved whole resumes.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  shutil.rmtree(os.path.join(workdir, "model"))
  other = orbax_io.save_orbax(random_bagel(initial.config, seed=1), str(tmp_path / "other"))
  with pytest.raises(config_lib.ConfigError, match=r"init_from '.*other' is not the model this "
                     r"run started from \('.*init'\): its checkpoint holds only its LoRA factors"):
    trainer.train(config_lib.load(SFT, {**overrides, "total_steps": 3, "init_from": other}),
                  workdir, sft.build)
  moved = str(tmp_path / "moved")
  os.rename(init_dir, moved)
  history = trainer.train(config_lib.load(SFT, {**overrides, "total_steps": 3, "init_from": moved}),
                          workdir, sft.build)
  assert [row["step"] for row in history] == [3]
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  shutil.rmtree(os.path.join(workdir, "model"))
  orbax_io.save_orbax(random_bagel(initial.config, seed=2), init_dir)  # written again in place
  with pytest.raises(config_lib.ConfigError, match=r"init_from '.*init' holds another model "
                     r"than when this run started \(its files changed\)"):
    trainer.train(config, workdir, sft.build)


@pytest.mark.parametrize("field,value,message", [
    ("lora.rank", -1, "lora.rank"),
    ("lora.alpha", 0.0, "lora.alpha"),
    ("lora.targets", "(", "lora.targets"),
])
def test_bad_lora_config_names_the_field(field, value, message):
  overrides = {"lora.rank": 4, field: value}
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(SFT, overrides)


def test_lora_on_random_weights_is_refused():
  # llm2vae starts at zero and LoRA keeps it frozen: the factors would get no gradient.
  with pytest.raises(config_lib.ConfigError, match=r"lora.rank = 4 with init_from = 'random': "
                     r"LoRA adapts a trained model"):
    config_lib.load(SFT, {"lora.rank": 4})
  config_lib.load(SFT, {"lora.rank": 4, "init_from": "/models/sft"})
  config_lib.load(SFT, {"lora.rank": 4, "lora.targets": r"^llm2vae\.kernel$"})  # the head learns


def test_targets_selecting_nothing_are_refused(model):
  graphdef, params, frozen = state_lib.split_model(model, sft.GENERATION_PARAMS)
  with pytest.raises(config_lib.ConfigError, match="lora.targets = .* selects no kernel"):
    lora.setup(graphdef, params, frozen, 2, 4.0, jax.random.PRNGKey(0), r"\.und\.")
  with pytest.raises(config_lib.ConfigError, match=r"\(in, out\) kernels only"):
    lora.setup(graphdef, params, frozen, 2, 4.0, jax.random.PRNGKey(0), r"\.gen\..*scale$")
  # The reasoning stage trains the understanding expert: the default targets the other one, and
  # the line names targets that work there (the user had to guess them; `q_proj` hit a bias).
  graphdef, params, frozen = state_lib.split_model(model, reasoning.UNDERSTANDING_PARAMS)
  with pytest.raises(config_lib.ConfigError, match=r"e.g. language_model\.layers\.und\..*; the "
                     r"default targets the generation expert.*lora.targets='\\.\(q\|k\|v\|o\)"):
    lora.setup(graphdef, params, frozen, 2, 4.0, jax.random.PRNGKey(0), lora.DEFAULT_TARGETS)
  lora.setup(graphdef, params, frozen, 2, 4.0, jax.random.PRNGKey(0), lora.ATTENTION_TARGETS)
  # A rank of 1000 on the tiny model's 64-wide kernels trained 2,048,000 factors, unsaid.
  with pytest.raises(config_lib.ConfigError, match=r"lora.rank = 1000 is above the side of the "
                     r"kernel language_model.layers.und.k_proj.kernel \(32\).*lora.rank <= 32"):
    lora.setup(graphdef, params, frozen, 1000, 4.0, jax.random.PRNGKey(0),
               lora.ATTENTION_TARGETS)
