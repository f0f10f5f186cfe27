"""One run setup (training/run_setup.py): the trainer, the recovery cache and the AOT check build
the same context from a config, refuse a data config that disagrees with the model before
building anything, and stage modules depend on the stage contract, not on the trainer."""

import inspect
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import config_lib
from robust_u1_jax.benchmarks import aot
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.inference import recovery
from robust_u1_jax.models import bagel
from robust_u1_jax.training import recovery_cache, run_setup, sft, stages, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft.py") + ":tiny"
REASON = os.path.join(ROOT, "configs", "reason.py") + ":tiny"
SMALL = {"data.batch_size": 8, "tensorboard": False, "mesh.data": -1, "mesh.fsdp": 1,
         "eval_every": 0}

# Values that pass the data config's own checks (sides and image size stay multiples) but
# disagree with the tiny model: ViT patch 8, 16 pixels per latent token.
MISMATCHES = [
    ("data.vit_patch", 16, "vit.patch_size = 8"),
    ("data.vae_stride", 32, "latent_downsample"),
    ("eval_data.vit_patch", 16, "vit.patch_size = 8"),
]


@pytest.mark.parametrize("field,value,model_field", MISMATCHES)
def test_trainer_refuses_data_fields_that_disagree_with_the_model(tmp_path, field, value,
                                                                   model_field):
  config = config_lib.load(SFT, {**SMALL, field: value, "total_steps": 1})
  workdir = str(tmp_path / "run")
  with pytest.raises(config_lib.ConfigError) as e:
    trainer.train(config, workdir, sft.build)
  assert f"{field} = {value}" in str(e.value) and model_field in str(e.value), e.value
  assert "model='tiny'" in str(e.value)
  assert not os.path.exists(workdir)  # refused at start-up: nothing written, nothing built


def test_a_builder_of_another_stage_is_refused_naming_both(tmp_path):
  # From Python, trainer.train(sft_config, workdir, stages.builder("rl")) failed inside the build
  # with AttributeError: 'rl' (the config has no rl block).
  config = config_lib.load(SFT, {**SMALL, "total_steps": 1})
  workdir = str(tmp_path / "run")
  with pytest.raises(config_lib.ConfigError, match=r"a config of stage 'sft' given the 'rl' "
                     r"stage's builder; give stages.builder\(config.stage\)"):
    trainer.train(config, workdir, stages.builder("rl"))
  assert not os.path.exists(workdir)
  assert stages.stage_of(sft.build) == "sft" and stages.stage_of(lambda ctx: None) is None


def test_a_model_that_would_keep_its_starting_weights_is_noted():
  # The model a run writes is its EMA, which starts at the initial weights.
  note = trainer.ema_note(config_lib.load(SFT, {"total_steps": 300,
                                                "optimizer.ema_decay": 0.999}))
  assert note and "still holds 74% of them after 300 optimizer updates (at 0.99: 5%" in note
  for decay in (0.99, 0.0):
    assert trainer.ema_note(config_lib.load(SFT, {"total_steps": 300,
                                                  "optimizer.ema_decay": decay})) is None
  # The EMA moves once per optimizer update: 4 accumulated steps each make 75 of them.
  note = trainer.ema_note(config_lib.load(SFT, {"total_steps": 300, "optimizer.ema_decay": 0.99,
                                                "optimizer.grad_accum_steps": 4}))
  assert note and "holds 47% of them after 75 optimizer updates (at 0: none)" in note
  # RL makes rl.updates_per_rollout of them a step: 60 steps of 4 are 240 (0.99^240 = 9 %).
  rl_config = os.path.join(ROOT, "configs", "rl.py") + ":tiny"
  assert trainer.optimizer_updates(config_lib.load(rl_config, {
      "total_steps": 60, "rl.updates_per_rollout": 4, "init_from": "random"})) == 240
  assert trainer.ema_note(config_lib.load(rl_config, {
      "total_steps": 60, "rl.updates_per_rollout": 4, "optimizer.ema_decay": 0.99,
      "init_from": "random"})) is None
  # The demo's reasoning part holds 74 % of its RL model, by choice (configs/demo.py), and says
  # so; its other parts' models are what their steps trained.
  demo = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py"))
  for part in ("vae", "clip", "vit", "base", "sft", "rl"):
    assert trainer.ema_note(demo[part]) is None, part
  assert "still holds 74%" in trainer.ema_note(demo["reason"])


def test_a_train_state_larger_than_the_host_is_refused_before_it_is_built(tmp_path, monkeypatch):
  # The 1.5B SFT config on a 23.5 GiB CPU machine ran for 3 minutes and was killed by the kernel
  # (a helper's run), leaving its workdir behind. Here the tiny model against a 1 MiB machine.
  monkeypatch.setattr(os, "sysconf", lambda name, real=os.sysconf: {
      "SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 256}.get(name) or real(name))
  built = []
  monkeypatch.setattr(trainer, "initial_state", lambda *a: built.append(a))
  workdir = str(tmp_path / "run")
  with pytest.raises(config_lib.ConfigError, match=r"the sft config 'tiny': the train state alone "
                                                   r"\(weights, optimizer state, EMA\) needs "
                                                   r"[\d.]+ MiB, and this machine has 1\.00 MiB"):
    trainer.train(config_lib.load(SFT, {**SMALL, "total_steps": 1}), workdir, sft.build)
  assert not built and not os.path.exists(workdir)
  # A stage with its own model (the demo's clip and vit parts) is counted on that model, not on
  # the context's Bagel: a small one fits the same 1 MiB.
  config = config_lib.load(SFT, {**SMALL, "total_steps": 1})
  ctx = run_setup.make_context(config, abstract=True)
  small = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
  trainer.check_state_fits_host(config, ctx, (r".",), "small", small)
  with pytest.raises(config_lib.ConfigError, match="big: the train state alone"):
    trainer.check_state_fits_host(config, ctx, (r".",), "big")


def test_recovery_cache_and_aot_refuse_the_same_mismatch(tmp_path):
  config = config_lib.load(REASON, {**SMALL, "init_from": "random", "data.vit_patch": 16})
  directory = str(tmp_path / "cache")
  with pytest.raises(config_lib.ConfigError, match=r"data\.vit_patch = 16 .*vit\.patch_size"):
    recovery_cache.build(config, directory, steps=1, progress=False)
  assert not os.path.exists(directory)
  with pytest.raises(aot.AotError, match=r"data\.vit_patch = 16 .*vit\.patch_size"):
    aot.compile_step(SFT, "cpu:8", {"data.vit_patch": 16}, verbose=False)


def test_unknown_preset_is_refused_naming_the_field():
  config = config_lib.load(SFT, {"model": "huge"})
  with pytest.raises(config_lib.ConfigError, match="model = 'huge'.*tiny, bagel_1p5b, bagel_7b"):
    run_setup.make_context(config)


def test_context_of_a_random_tiny_model():
  config = config_lib.load(SFT, SMALL)
  ctx = run_setup.make_context(config)
  assert dict(ctx.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert ctx.model_config == bagel.preset("tiny", max(len(ctx.tokenizer), 64))
  assert ctx.markers == run_setup.markers(ctx.tokenizer)
  assert ctx.markers.vision_start != ctx.markers.vision_end


def test_abstract_and_real_models_agree_and_a_workdir_gives_its_model_config(tmp_path):
  """The AOT's shape-only model is the trainer's (shapes, dtypes, shardings), and a stage's
  workdir as init_from gives the config it was saved with (the AOT used to fall back to the
  preset for Orbax checkpoints)."""
  config = config_lib.load(SFT, SMALL)
  real = run_setup.make_context(config)
  abstract = run_setup.make_context(config, abstract=True)
  describe = lambda model: jax.tree.map(
      lambda x: (x.shape, x.dtype, x.sharding), nnx.state(model, nnx.Param))
  assert describe(abstract.model) == describe(real.model)
  assert isinstance(jax.tree.leaves(nnx.state(abstract.model))[0], jax.ShapeDtypeStruct)

  # A different model than the preset: a wider LLM vocabulary, saved as a stage's workdir.
  saved = bagel.Bagel(bagel.preset("tiny", 2048), rngs=nnx.Rngs(1))
  with config.unlocked():
    config.guidance.text_scale = 1.5
  run_setup.write_model(saved, str(tmp_path), config)
  # The guidance of the run's recoveries, beside the model for `recover` and `answer`.
  assert recovery.Guidance.for_model_dir(str(tmp_path / "model")) == recovery.Guidance(1.5, 2.0)
  assert recovery.instruction_of_model(str(tmp_path / "model")) == config.instruction
  from_workdir = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path)})
  assert run_setup.model_config(from_workdir, real.tokenizer) == saved.config
  loaded = run_setup.make_context(from_workdir).model
  assert loaded.config == saved.config
  np.testing.assert_array_equal(loaded.llm2vae.kernel.get_value(),
                                saved.llm2vae.kernel.get_value())


def test_a_bagel_directory_gives_the_config_its_weights_load_with(tmp_path, random_bagel):
  """BAGEL's llm_config.json leaves out QK-norm and the generation expert (its code sets them):
  the run's model config settles them from the tensors' names, as loading the weights does, and
  takes the image-side fields of a directory this project wrote (robust_u1_config.json)."""
  from robust_u1_jax.checkpoints import bagel_dir, bagel_export
  from robust_u1_jax.data import tokenizer as tl

  tok = tl.load_tokenizer()
  source = random_bagel(bagel.BagelConfig.tiny(vocab_size=len(tok)))
  path = str(tmp_path / "bagel")
  bagel_export.save_model_dir(source, path, tokenizer_dir=tl.default_tokenizer_dir())
  llm_json = os.path.join(path, bagel_dir.LLM_CONFIG)
  with open(llm_json) as f:
    values = json.load(f)
  del values["qk_norm"]  # as BAGEL's own file
  values.pop("layer_module", None)
  with open(llm_json, "w") as f:
    json.dump(values, f)
  config = config_lib.load(SFT, {**SMALL, "init_from": path})
  read = run_setup.model_config(config, tok)
  assert read == bagel_dir.load_model_dir(path).config
  assert read.llm.qk_norm == source.config.llm.qk_norm and read.llm.mot == source.config.llm.mot
  assert read.max_latent_size == source.config.max_latent_size


def test_a_model_continues_with_the_tokenizer_it_was_saved_with(tmp_path):
  """A stage started from a model reads its text with the tokenizer saved beside it, and writes
  that one on with its own model (the built-in one is rebuilt from the world's texts, so an older
  model's ids are not the current built-in tokenizer's); data.tokenizer_dir still overrides it
  with a tokenizer whose special tokens have the same ids."""
  other = tmp_path / "tokenizer"
  tokenizer_lib._write(other, tokenizer_lib.corpus_texts() + ["zebra okapi giraffe " * 40])
  theirs, builtin = tokenizer_lib.load_tokenizer(str(other)), tokenizer_lib.load_tokenizer()
  encode = lambda tok: tok("the zebra is red")["input_ids"]
  assert encode(theirs) != encode(builtin)

  first = config_lib.load(SFT, {**SMALL, "data.tokenizer_dir": str(other)})
  model = bagel.Bagel(bagel.preset("tiny", len(theirs)), rngs=nnx.Rngs(0))
  run_setup.write_model(model, str(tmp_path / "first"), first)
  later = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path / "first")})
  ctx = run_setup.make_context(later)
  assert encode(ctx.tokenizer) == encode(theirs)
  assert ctx.markers == run_setup.markers(theirs)
  run_setup.write_model(ctx.model, str(tmp_path / "later"), later)
  assert (tmp_path / "later" / "model" / "tokenizer.json").read_text() == (
      other / "tokenizer.json").read_text()
  # data.tokenizer_dir names the tokenizer to read with (here a copy elsewhere), as long as its
  # special tokens keep their ids; the built-in one's image markers are other ids: refused.
  copy = shutil.copytree(other, tmp_path / "copy")
  override = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path / "first"),
                                   "data.tokenizer_dir": str(copy)})
  assert run_setup.make_context(override).tokenizer.name_or_path == str(copy)
  wrong = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path / "first"),
                                "data.tokenizer_dir": tokenizer_lib.default_tokenizer_dir()})
  with pytest.raises(config_lib.ConfigError,
                     match=r"data\.tokenizer_dir = .* gives the special tokens other ids than the "
                           r"tokenizer saved with the model of init_from=.*: im_start \d+ \(saved"):
    run_setup.make_context(wrong)
  # Special tokens in place but two words' ids swapped: the model would read 'red' as 'blue'.
  data = json.loads((copy / "tokenizer.json").read_text())
  vocab = data["model"]["vocab"]
  vocab["Ġred"], vocab["Ġblue"] = vocab["Ġblue"], vocab["Ġred"]
  (copy / "tokenizer.json").write_text(json.dumps(data))
  with pytest.raises(config_lib.ConfigError,
                     match=r"data\.tokenizer_dir = .* reads text other than the tokenizer saved "
                           r"with the model of init_from=.*: 2 of its \d+ tokens have other ids "
                           r"in the saved one \(the first: 'Ġ(red|blue)' is \d+"):
    run_setup.make_context(override)


def test_a_model_without_its_tokenizer_is_not_read_with_the_built_in_one(tmp_path):
  """BAGEL's weights copied without their tokenizer files trained on the built-in tokenizer's
  ids without a word; a model built with the built-in tokenizer (its vocabulary) still is."""
  from robust_u1_jax.checkpoints import orbax_io

  n = len(tokenizer_lib.load_tokenizer())
  for name, vocab in (("other", n + 64), ("own", n)):
    orbax_io.save_orbax(bagel.Bagel(bagel.preset("tiny", vocab), rngs=nnx.Rngs(0)),
                        str(tmp_path / name))
  other = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path / "other")})
  with pytest.raises(config_lib.ConfigError,
                     match=rf"the model of init_from=.*other' has no tokenizer files beside it "
                           rf"\(tokenizer.json, or vocab.json and merges.txt\), and its "
                           rf"vocabulary \({n + 64:,} ids\) is not the built-in tokenizer's "
                           rf"\({n:,}\); copy the tokenizer"):
    run_setup.make_context(other)
  own = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path / "own")})
  assert len(run_setup.make_context(own).tokenizer) == n


def test_a_mesh_the_devices_do_not_fill_is_a_config_error():
  """A plain ValueError (a traceback from `train`, on every host of a pod) before."""
  for axes, says in (({"mesh.tensor": 3}, r"8 devices are not divisible by the fixed axes"),
                     ({"mesh.data": 1, "mesh.fsdp": 16}, r"need 16 devices, but 8 are available")):
    with pytest.raises(config_lib.ConfigError, match=rf"^config field mesh: .*{says}.*; set "
                                                     r"--config\.mesh\.<axis>"):
      run_setup.make_context(config_lib.load(SFT, {**SMALL, **axes}))


def test_a_tokenizer_past_the_model_vocabulary_is_refused(tmp_path):
  """Ids past the embedding table read as NaN at the first step: refused before anything is
  built, naming the tokenizer and the model."""
  config = config_lib.load(SFT, SMALL)
  small = bagel.Bagel(bagel.preset("tiny", 64), rngs=nnx.Rngs(0))
  run_setup.write_model(small, str(tmp_path / "small"), config)
  later = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path / "small")})
  n = len(tokenizer_lib.load_tokenizer())
  with pytest.raises(config_lib.ConfigError,
                     match=rf"tokenizer in .*small/model has {n} tokens, more than the "
                           rf"vocab_size 64 of the model of init_from="):
    run_setup.make_context(later)
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match="vocab_size 64"):
    trainer.train(config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path / "small"),
                                        "total_steps": 1}), str(workdir), sft.build)
  assert not workdir.exists()


def test_stage_modules_depend_on_the_contract_not_the_trainer():
  modules = {inspect.getmodule(build) for build in stages.BUILDERS.values()}
  for module in modules:
    source = inspect.getsource(module)
    assert "training import trainer" not in source and "trainer." not in source.replace(
        "`trainer.", ""), module.__name__
    assert "StageSpec(" in source, module.__name__


def test_a_model_trained_at_other_guidance_is_noted(tmp_path):
  # The reasoning stage from the demo's RL model (1.5 / 1.5) recovered at 4 / 2 without a word.
  recovery.Guidance(text_scale=1.5, image_scale=1.5).save(str(tmp_path))
  config = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path)})
  note = run_setup.guidance_note(config)
  g = config.guidance
  assert note.startswith(f"note: init_from's model recovers at guidance 1.5 / 1.5 (text / image, "
                         f"its guidance.json), this run at {g.text_scale:g} / {g.image_scale:g}")
  assert "--config.guidance.text_scale=1.5 --config.guidance.image_scale=1.5" in note
  same = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path), "guidance.text_scale": 1.5,
                               "guidance.image_scale": 1.5})
  assert run_setup.guidance_note(same) is None
  assert run_setup.guidance_note(config_lib.load(SFT, SMALL)) is None  # random weights


def test_rl_from_a_model_that_trains_no_recovery_is_noted(tmp_path):
  # RL from the demo's vae or vit part: its rollouts are noise and its rewards barely move.
  recovery.save_no_recovery(str(tmp_path), "bootstrap_vit")
  rl = os.path.join(ROOT, "configs", "rl.py") + ":tiny"
  config = config_lib.load(rl, {"init_from": str(tmp_path)})
  assert run_setup.untrained_note(config) == (
      "note: init_from's model is the bootstrap_vit stage's, which trains no recovery: the rl "
      "stage's recoveries from it are noise; give an SFT or RL model (the demo's: runs/demo/sft or "
      "runs/demo/rl)")
  # A stage whose step samples no recovery (SFT teaches it): no note.
  assert run_setup.untrained_note(config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path)})) \
      is None


def test_a_model_trained_by_another_instruction_is_noted(tmp_path):
  recovery.save_instruction(str(tmp_path), "Make this picture clean again.")
  config = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path)})
  assert run_setup.instruction_note(config) == (
      "note: init_from's model recovers by the instruction 'Make this picture clean again.' (its "
      f"instruction.json), this run by {config.instruction!r}; give "
      "--config.instruction='Make this picture clean again.' to keep the model's")
  same = config_lib.load(SFT, {**SMALL, "init_from": str(tmp_path),
                               "instruction": "Make this picture clean again."})
  assert run_setup.instruction_note(same) is None
  assert run_setup.instruction_note(config_lib.load(SFT, SMALL)) is None  # random weights
