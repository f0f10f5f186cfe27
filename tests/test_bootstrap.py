"""The bootstrap stages of the built-in world (configs/demo.py, 'quick' settings, with the steps
each part needs to learn something measurable): the VAE learns to reconstruct, the CLIP to
retrieve captions and loads as the RL reward's tower, the base model's losses fall with the VAE
left bit for bit as part 1 wrote it, and runs resume."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import config_lib
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.inference import recovery
from robust_u1_jax.models import vae as vae_lib
from robust_u1_jax.training import bootstrap_clip, bootstrap_vae, run_setup, stages, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' 8 fake devices: batches split over them (test_train.py does the same).
MESH = {"mesh.data": -1, "mesh.fsdp": 1}


def _demo():
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs",
                                                                            "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Steps after which each part has learnt something these tests can measure; the quick demo runs
# fewer, since it checks the wiring only.
LEARNING_STEPS = {"vae": 80, "clip": 120, "vit": 120}


def _config(part: str, overrides=None, **kwargs) -> ml_collections.ConfigDict:
  demo = _demo()
  config = getattr(demo, f"{part}_config")("quick", **kwargs)
  if part in LEARNING_STEPS:
    demo._schedule(config, LEARNING_STEPS[part])  # as the demo schedules its parts' steps
  config.lock()
  for dotted, value in {**MESH, **(overrides or {})}.items():
    parent = config
    *head, leaf = dotted.split(".")
    for name in head:
      parent = parent[name]
    parent[leaf] = value
  return config_lib.validate(config)


def _train(config, workdir):
  return trainer.train(config, str(workdir), stages.builder(config.stage))


def _rows(workdir, evals: bool):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row for row in map(json.loads, f) if bool(row.get("eval")) == evals]


def _mean(rows, key, part):
  return float(np.mean([r[key] for r in part(rows)]))


def _pretrain_losses(model, config) -> dict[str, float]:
  """pretrain_loss's parts on the first 32 validation records, with fixed draws."""
  from robust_u1_jax.data import pipeline
  from robust_u1_jax.data import sequence
  from robust_u1_jax.training import pretrain

  tok = tokenizer_lib.load_tokenizer(None)
  special = tokenizer_lib.special_token_ids(tok)
  data_config = config.eval_data.copy_and_resolve_references()
  data_config.batch_size = 32
  with pipeline.make_pipeline(data_config, seed=0, tokenizer=tok, stage="pretrain") as data:
    batch = next(data)
  rows = pretrain.pretrain_rows(batch, model.config, sequence.Markers(special["vision_start"],
                                                                      special["vision_end"]),
                                np.random.default_rng(0), pretrain.row_settings(config, tok))
  graphdef, state = nnx.split(model)
  loss = jax.jit(lambda s, r: pretrain.pretrain_loss(nnx.merge(graphdef, s), r,
                                                     jax.random.PRNGKey(0),
                                                     **pretrain.loss_weights(config))[1])
  return {k: float(v) for k, v in loss(state, jax.tree.map(jnp.asarray, rows)).items()}


def _row_inputs():
  """(base config, tokenizer, markers, tiny BagelConfig, the first validation batch) for
  `pretrain_rows`."""
  from robust_u1_jax.data import pipeline
  from robust_u1_jax.models import bagel
  from robust_u1_jax.training import run_setup

  config = _config("base")
  tok = tokenizer_lib.load_tokenizer(None)
  markers = run_setup.markers(tok)
  model_config = bagel.BagelConfig.tiny()
  with pipeline.make_pipeline(config.eval_data, seed=0, tokenizer=tok, stage="pretrain") as data:
    batch = next(data)
  return config, tok, markers, model_config, batch


def test_two_image_rows_take_the_reasoning_layout():
  """With two_image_fraction = 1 every question row is the reasoning stage's layout (`sequence.
  reasoning_blocks`: [VAE][ViT] [question] [VAE][ViT] [answer]) with the clean image in both
  places, the question followed by the recovery instruction token for token as the reasoning
  stage's pipeline writes it, its answer labelled after the second image; with 0 the rows hold
  one image."""
  from robust_u1_jax.data import packing
  from robust_u1_jax.data import pipeline
  from robust_u1_jax.data import sequence
  from robust_u1_jax.training import pretrain

  config, tok, markers, model_config, batch = _row_inputs()
  with pipeline.make_pipeline(config.eval_data, seed=0, tokenizer=tok, stage="reason") as data:
    reason = next(data)
  np.testing.assert_array_equal(batch["index"], reason["index"])
  np.testing.assert_array_equal(batch["recovery_question_ids"], reason["question_ids"])
  assert not np.array_equal(batch["recovery_question_ids"], batch["question_ids"])
  settings = {**pretrain.row_settings(config, tok), "caption_fraction": 0.0}
  und, labels, images = pretrain.pretrain_rows(batch, model_config, markers,
                                               np.random.default_rng(0),
                                               {**settings, "two_image_fraction": 1.0})[:3]
  np.testing.assert_array_equal(images[:, 0], images[:, 1])  # the clean image twice
  np.testing.assert_array_equal(images[:, 0], batch["clean"])
  (sample,) = packing.batch_samples(batch)[0]  # texts cut to their lengths, as the rows take them
  size = sequence.canvas(batch, "clean")
  blocks = sequence.reasoning_blocks(
      {**sample, "corrupted": sample["clean"], "question_ids": sample["recovery_question_ids"]},
      size, recovered_vit=sample["corrupted_vit"])
  ref = sequence.build_rows([[blocks]], model_config, markers, seq_len=und.token_kind.shape[1],
                            max_vit=und.vit_patches.shape[1],
                            max_latent=und.latent_seq_index.shape[1], images_per_sample=2)
  for name in ("token_kind", "text_ids", "positions", "vit_patches", "vit_segment_ids",
               "latent_image_index"):
    np.testing.assert_array_equal(getattr(und, name)[0], getattr(ref, name)[0], err_msg=name)
  start = sequence.lengths(blocks[:-1], *sequence.strides(model_config))[0]
  answer = blocks[-1].ids
  np.testing.assert_array_equal(labels[0, start:start + len(answer) - 1], answer[1:])
  assert labels[0, start + len(answer) - 1] == markers.end_of_text >= 0  # the reply ends
  # Before the answer, only the lone <|im_start|> after the question is labelled: with the
  # <|vision_start|> that opens the second image, as the release's loop asks of the model.
  opener = sequence.lengths(blocks[:3], *sequence.strides(model_config))[0]
  assert isinstance(blocks[3], sequence.Open) and labels[0, opener] == markers.vision_start
  assert (np.delete(labels[0, :start], opener) == -1).all()
  one = pretrain.pretrain_rows(batch, model_config, markers, np.random.default_rng(0),
                               {**settings, "two_image_fraction": 0.0})
  assert one[2].shape[1] == 1 and set(np.unique(one[0].vit_segment_ids[0])) <= {0, 1}


def test_answer_vae_dropout_leaves_the_vae_tokens_out_of_one_image_rows():
  """answer_vae_dropout = 1: every one-image answer row is [ViT] [prompt] [answer] (no latent
  token, its answer labelled right after the prompt); 0 keeps them in every row."""
  from robust_u1_jax.data import packing
  from robust_u1_jax.data import sequence
  from robust_u1_jax.models import bagel
  from robust_u1_jax.training import pretrain

  config, tok, markers, model_config, batch = _row_inputs()
  settings = {**pretrain.row_settings(config, tok), "two_image_fraction": 0.0}

  def rows(dropout, caption_fraction):
    return pretrain.pretrain_rows(batch, model_config, markers, np.random.default_rng(0),
                                  {**settings, "answer_vae_dropout": dropout,
                                   "caption_fraction": caption_fraction})

  for caption_fraction in (0.0, 1.0):
    und, labels = rows(1.0, caption_fraction)[:2]
    assert not (und.token_kind == bagel.LATENT).any()
    (sample,) = packing.batch_samples(batch)[0]
    prompt = (settings["caption_prompt_ids"] if caption_fraction else sample["question_ids"])
    answer = sample["caption_ids"] if caption_fraction else sample["answer_ids"]
    blocks = sequence.understanding_blocks(sample, prompt, answer, sequence.canvas(batch, "clean"),
                                           use_vae=False)
    start = sequence.lengths(blocks[:-1], *sequence.strides(model_config))[0]
    np.testing.assert_array_equal(labels[0, start:start + len(answer) - 1], answer[1:])
  kept = rows(0.0, 0.0)[0]
  assert (kept.token_kind == bagel.LATENT).sum(axis=1).min() > 0  # every row holds its image


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
  """Part 1 once for the module: (workdir, config, logged rows)."""
  workdir = tmp_path_factory.mktemp("vae")
  config = _config("vae", {"log_every": 5})
  history = _train(config, workdir)
  return workdir, config, history


def test_demo_configs_validate():
  demo = _demo()
  for variant in demo.VARIANTS:
    for make in (demo.vae_config, demo.clip_config, demo.vit_config, demo.base_config):
      config = make(variant)
      config.lock()
      config_lib.validate(config)
  with pytest.raises(ValueError, match="unknown variant"):
    demo.vae_config("huge")
  bad = _config("vae")
  bad.data.corruption = "gaussian_noise"
  with pytest.raises(config_lib.ConfigError, match="data.corruption"):
    config_lib.validate(bad)
  bad = _config("base")
  bad.pretrain.caption_fraction = 1.5
  with pytest.raises(config_lib.ConfigError, match="pretrain.caption_fraction"):
    config_lib.validate(bad)


@pytest.mark.slow
def test_vae_part_learns_and_beats_an_untrained_vae(vae_run):
  workdir, config, history = vae_run
  first = _mean(history, "l1_loss", lambda r: r[:2])
  last = _mean(history, "l1_loss", lambda r: r[-2:])
  assert last < 0.9 * first, (first, last)
  trained_psnr = _rows(workdir, evals=True)[-1]["eval_psnr"]
  images = bootstrap_vae.validation_images(config, tokenizer_lib.load_tokenizer(None))
  untrained = vae_lib.AutoEncoder(vae_lib.VAEConfig.tiny(), rngs=nnx.Rngs(0))
  untrained_psnr = bootstrap_vae.reconstruction_psnr(untrained, images)
  assert trained_psnr > untrained_psnr + 2.0, (trained_psnr, untrained_psnr)
  assert os.path.isfile(os.path.join(workdir, "images", f"step_{config.total_steps:07d}.png"))
  # The saved VAE carries a latent normalisation of its own, not FLUX's.
  with open(os.path.join(workdir, "model", "bagel_config.json")) as f:
    saved = json.load(f)["vae"]
  assert saved["scale_factor"] != vae_lib.VAEConfig.tiny().scale_factor
  assert saved["ch"] == vae_lib.VAEConfig.tiny().ch


@pytest.mark.slow
def test_finished_part_rerun_has_nothing_to_train(vae_run, capsys):
  workdir, config, _ = vae_run
  assert _train(config, workdir) == []
  assert "nothing to train" in capsys.readouterr().out


def test_caption_tokens_fit_the_tiny_tower():
  from robust_u1_jax.data import shapes
  from robust_u1_jax.models import clip as clip_lib

  c = clip_lib.CLIPConfig.tiny()
  assert bootstrap_clip.min_vocab_size() <= c.vocab_size
  world = shapes.ShapesWorld("train")
  captions = [world.record(i, render=False)["caption"] for i in range(300)]
  tokens = bootstrap_clip.caption_batch(captions, c)
  unk = bootstrap_clip.TOKEN_IDS["<unk>"]
  assert not (tokens == unk).any()
  # Every caption ends in its own end-of-text token (the largest id: argmax pooling finds it).
  assert (tokens.max(axis=1) == c.vocab_size - 1).all()
  assert (np.sum(tokens == c.vocab_size - 1, axis=1) == 1).all()
  # Different captions get different token rows (nothing is lost to the phrase merging).
  rows = {}
  for caption, row in zip(captions, map(tuple, tokens)):
    rows.setdefault(row, set()).add(caption)
  assert all(len(v) == 1 for v in rows.values())


@pytest.mark.slow
def test_clip_part_beats_chance_and_loads_as_the_reward_tower(tmp_path):
  config = _config("clip")
  _train(config, tmp_path)
  result = _rows(tmp_path, evals=True)[-1]
  assert result["eval_retrieval_accuracy"] > 3 * result["eval_retrieval_chance"], result
  path = os.path.join(tmp_path, "model", bootstrap_clip.CLIP_FILE)
  from robust_u1_jax.training import rl

  graphdef, state = rl.load_clip_tower(ml_collections.ConfigDict(
      {"clip_checkpoint": path, "clip_model": "tiny"}))
  model = nnx.merge(graphdef, state)
  from robust_u1_jax.checkpoints import tensor_files

  stored = tensor_files.open_tensor_files(path)
  np.testing.assert_array_equal(np.asarray(model.visual.proj[...]), stored.load("visual.proj"))
  embedding = model.encode_image(jnp.zeros((2, 32, 32, 3)))
  assert embedding.shape == (2, 16) and bool(jnp.all(jnp.isfinite(embedding)))


@pytest.mark.slow
def test_clip_part_resumes_exactly_after_a_crash(tmp_path):
  steps = {"total_steps": 12, "checkpoint_every": 4, "log_every": 1, "eval_every": 0,
           "data.batch_size": 16, "optimizer.warmup_steps": 2}
  straight = _train(_config("clip", steps), tmp_path / "straight")

  class Crash(RuntimeError):
    pass

  def crashing(ctx):
    spec = bootstrap_clip.build(ctx)
    host_inputs, calls = spec.host_inputs, [0]

    def host(batch, rng):
      calls[0] += 1
      if calls[0] == 7:  # the inputs of step 7: steps 1..6 ran, step 4's checkpoint is saved
        raise Crash()
      return host_inputs(batch, rng)

    spec.host_inputs = host
    return spec

  crashed = str(tmp_path / "crashed")
  with pytest.raises(Crash):
    trainer.train(_config("clip", steps), crashed, crashing)
  resumed = _train(_config("clip", steps), crashed)
  assert [r["step"] for r in resumed] == list(range(5, 13))
  reference = {r["step"]: r for r in straight}
  for row in resumed:
    assert row["loss"] == reference[row["step"]]["loss"], row["step"]
    assert row["grad_norm"] == reference[row["step"]]["grad_norm"], row["step"]


@pytest.mark.slow
def test_vit_part_beats_chance_and_changes_only_the_vit(vae_run, tmp_path, bagel_params):
  """The contrastive ViT part retrieves captions above chance, and its model is the VAE part's
  with the ViT replaced: every other weight and the config as they were."""
  vae_dir, _, _ = vae_run
  config = _config("vit", init_from=str(vae_dir))
  history = _train(config, tmp_path)
  assert history[-1]["loss"] < 0.85 * history[0]["loss"], (history[0], history[-1])
  result = _rows(tmp_path, evals=True)[-1]
  # Either direction of retrieval: 120 steps leave few images retrieved right (4 of 64 here).
  retrieved = max(result["eval_retrieval_accuracy"], result["eval_text_retrieval_accuracy"])
  assert retrieved > 3 * result["eval_retrieval_chance"], result
  from robust_u1_jax.checkpoints import orbax_io

  before = bagel_params(orbax_io.load_pretrained(os.path.join(vae_dir, "model")))
  after = bagel_params(orbax_io.load_pretrained(os.path.join(tmp_path, "model")))
  assert before.keys() == after.keys()
  vit_keys = [k for k in before if k.startswith("vit_model.")]
  assert vit_keys and all(not np.array_equal(after[k], before[k]) for k in vit_keys
                          if k.endswith("kernel"))
  for k in before.keys() - set(vit_keys):
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  with open(os.path.join(vae_dir, "model", "bagel_config.json")) as f:
    expected = json.load(f)
  with open(os.path.join(tmp_path, "model", "bagel_config.json")) as f:
    assert json.load(f) == expected
  # Neither part trains a recovery, so neither model says what guidance or instruction it
  # recovers by: a guidance.json there said 4 / 2, and the demo's base part noted it recovered at
  # other guidance.
  for model in (vae_dir, tmp_path):
    for side_file in ("guidance.json", "instruction.json"):
      assert not os.path.exists(os.path.join(model, "model", side_file))
  # What they say instead: `recover` and `answer` note that such a model draws noise.
  assert "the bootstrap_vit stage, which trains no recovery" in recovery.untrained_note(
      os.path.join(tmp_path, "model"))
  base = _config("base", {"guidance.text_scale": 1.5, "guidance.image_scale": 1.5},
                 init_from=str(tmp_path))  # as the demo sets every recovering part
  assert run_setup.guidance_note(base) is None


def test_freeze_vit_leaves_the_vit_out_of_the_trained_parameters(random_bagel):
  from robust_u1_jax.models import bagel
  from robust_u1_jax.training import pretrain, state

  model = random_bagel(bagel.preset("tiny"))
  names = lambda patterns: {str(path[0]) for path, _ in nnx.to_flat_state(
      nnx.state(model, state.trainable_filter(patterns)))}
  assert "vit_model" in names(pretrain.BASE_PARAMS)
  assert "vit_model" not in names(pretrain.BASE_PARAMS_FROZEN_VIT)
  assert "vae" not in names(pretrain.BASE_PARAMS) | names(pretrain.BASE_PARAMS_FROZEN_VIT)
  assert {"language_model", "connector"} <= names(pretrain.BASE_PARAMS_FROZEN_VIT)


def test_pretrain_part_learns_and_keeps_the_vae_and_vit_frozen(vae_run, tmp_path, bagel_params):
  """The demo's base part (pretrain.freeze_vit) trains the rest of the model and leaves the VAE
  and the ViT bit for bit as the earlier parts wrote them."""
  vae_dir, _, _ = vae_run
  # Long enough for the zero-initialised velocity head to move (the flow loss is flat before).
  config = _config("base", {"total_steps": 50, "log_every": 1, "checkpoint_every": 50,
                            "data.batch_size": 8, "optimizer.warmup_steps": 5,
                            "optimizer.learning_rate": 2e-3}, init_from=str(vae_dir))
  history = _train(config, tmp_path)
  assert len(history) == 50
  early, late = (lambda r: r[:10]), (lambda r: r[-10:])
  assert _mean(history, "ce_loss", late) < 0.5 * _mean(history, "ce_loss", early)
  from robust_u1_jax.checkpoints import orbax_io

  initial = orbax_io.load_pretrained(os.path.join(vae_dir, "model"))
  trained = orbax_io.load_pretrained(os.path.join(tmp_path, "model"))
  # Both losses of the model before and after, on the same validation rows, times and noise:
  # the flow loss is too noisy from step to step to read its fall off 50 training batches.
  before_loss, after_loss = (_pretrain_losses(m, config) for m in (initial, trained))
  assert after_loss["ce_loss"] < 0.5 * before_loss["ce_loss"], (before_loss, after_loss)
  assert after_loss["mse_loss"] < 0.9 * before_loss["mse_loss"], (before_loss, after_loss)
  before, after = bagel_params(initial), bagel_params(trained)
  assert config.pretrain.freeze_vit
  frozen_keys = [k for k in before if k.startswith(("vae.", "vit_model."))]
  assert any(k.startswith("vit_model.") for k in frozen_keys)
  for k in frozen_keys:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  # ... while the rest of the model trained.
  assert not np.array_equal(after["llm2vae.kernel"], before["llm2vae.kernel"])
  with open(os.path.join(vae_dir, "model", "bagel_config.json")) as f:
    vae_config = json.load(f)["vae"]
  with open(os.path.join(tmp_path, "model", "bagel_config.json")) as f:
    assert json.load(f)["vae"] == vae_config
