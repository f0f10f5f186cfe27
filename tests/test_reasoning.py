"""Stage III on the tiny model: rows (packed or not) carry the answer labels, the step overfits one
batch, and the stage runs through the trainer with recoveries generated on the fly or read from a
cache that `recovery_cache.build` wrote."""

import base64
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from robust_u1_jax import config_lib
from robust_u1_jax.data import answer_format, packing, shapes, shapes_answers, stage_fields
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.inference import images, recovery
from robust_u1_jax.models import bagel
from robust_u1_jax.training import reasoning, recovery_cache, run_setup, trainer
from robust_u1_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = os.path.join(ROOT, "configs", "reason.py") + ":tiny"


def _batch(config):
  tok = tokenizer_lib.load_tokenizer()
  data = pipeline_lib.make_pipeline(config.data, seed=0, tokenizer=tok, stage="reason")
  batch = next(data)
  data.close()
  markers = run_setup.markers(tok)
  instruction = tokenizer_lib.encode_text_block(tok, config.instruction)
  return tok, batch, markers, instruction


def test_labels_are_the_answer_tokens():
  config = config_lib.load(REASON, {"init_from": "random", "data.batch_size": 2})
  tok, batch, markers, instruction = _batch(config)
  cfg = bagel.BagelConfig.tiny(vocab_size=len(tok))
  inputs, labels, _ = reasoning.reasoning_rows(batch, cfg, markers, instruction)
  im_start = tokenizer_lib.special_token_ids(tok)["im_start"]
  for i in range(2):
    answer = batch["answer_ids"][i][:batch["answer_lengths"][i]]
    # The release's loop: the model opens the recovery after the prompt (`<|vision_start|>`
    # after a lone `<|im_start|>`), then writes the answer and ends the reply.
    np.testing.assert_array_equal(labels[i][labels[i] >= 0],
                                  [markers.vision_start, *answer[1:], markers.end_of_text])
    where = np.nonzero(labels[i] >= 0)[0]
    assert inputs.text_ids[i][where[0]] == im_start and inputs.text_ids[i][where[0] - 1] != im_start
    # Each label but the last is the text token right after its position.
    np.testing.assert_array_equal(inputs.text_ids[i][where[:-1] + 1], labels[i][where[:-1]])
  assert "<ANSWER>" in tok.decode(labels[0][labels[0] >= 0])


def test_step_overfits_one_batch():
  config = config_lib.load(REASON, {"init_from": "random", "data.batch_size": 2})
  tok, batch, markers, instruction = _batch(config)
  cfg = bagel.BagelConfig.tiny(vocab_size=len(tok))
  model = bagel.Bagel(cfg, rngs=nnx.Rngs(0))
  graphdef, params, frozen = state_lib.split_model(model, reasoning.UNDERSTANDING_PARAMS)
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 0
  tx = state_lib.make_optimizer(config.optimizer, 100)
  state = state_lib.create_state(params, frozen, tx, jax.random.PRNGKey(0), False)
  sampler = recovery.Sampler(num_steps=3, guidance=recovery.NO_GUIDANCE)
  rules = images.ImageRules.from_data_config(config.data)
  assert rules.vit_size(*batch["corrupted"].shape[1:3]) == batch["corrupted_vit"].shape[1:3]
  step = jax.jit(reasoning.make_step(graphdef, tx, 0.0, (sampler, rules)))
  inputs = jax.tree.map(jnp.asarray, reasoning.reasoning_rows(batch, cfg, markers, instruction))
  losses = []
  for _ in range(12):
    state, metrics = step(state, inputs)
    losses.append(float(metrics["ce_loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_reason_stage_runs_through_the_trainer(tmp_path):
  config = config_lib.load(REASON, {
      "init_from": "random", "total_steps": 2, "log_every": 1, "checkpoint_every": 2,
      "data.batch_size": 8, "mesh.data": -1, "mesh.fsdp": 1, "reason.recovery_steps": 3,
      "tensorboard": False})
  history = trainer.train(config, str(tmp_path), reasoning.build)
  assert np.isfinite(history[-1]["ce_loss"]) and 0 <= history[-1]["token_accuracy"] <= 1


def test_a_recovery_on_the_fly_of_non_square_images_sits_on_their_canvas(tmp_path):
  # 96 x 80 photos are 48 x 64 at the tiny rule, on a 64 x 64 canvas. The step stacked the
  # corrupted image and its recovery at their own size, where the rows read latents at canvas
  # positions: the gather fell outside them and the loss was NaN from step 1.
  rng = np.random.default_rng(0)
  table = tmp_path / "photos.tsv"
  with open(table, "w") as f:
    f.write("index\timage\tquestion\tA\tB\tanswer\n")
    for i in range(2):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (80, 96, 3), np.uint8)).save(buf, format="PNG")
      f.write(f"{i}\t{base64.b64encode(buf.getvalue()).decode()}\tWhich?\tx\ty\tA\n")
  config = config_lib.load(REASON, {"init_from": "random", "data.batch_size": 2,
                                    "data.source": "vqa_tsv", "data.path": str(table)})
  tok, batch, markers, instruction = _batch(config)
  assert batch["corrupted"].shape[1:3] == (64, 64) and batch["corrupted_hw"][0].tolist() == [48, 64]
  cfg = bagel.BagelConfig.tiny(vocab_size=len(tok))
  model = bagel.Bagel(cfg, rngs=nnx.Rngs(0))
  graphdef, params, frozen = state_lib.split_model(model, reasoning.UNDERSTANDING_PARAMS)
  tx = state_lib.make_optimizer(config.optimizer, 10)
  state = state_lib.create_state(params, frozen, tx, jax.random.PRNGKey(0), False)
  sampler = recovery.Sampler(num_steps=2, guidance=recovery.NO_GUIDANCE)
  rules = images.ImageRules.from_data_config(config.data)
  step = reasoning.make_step(graphdef, tx, 0.0, (sampler, rules))
  inputs, labels, (recovery_inputs, on_canvas) = reasoning.reasoning_rows(
      batch, cfg, markers, instruction)
  # The recovery is made at the image's size and put on the canvas beside the corrupted image,
  # where the rows read both (the precomputed path places its recoveries the same way).
  assert recovery_inputs.corrupted.shape[2:4] == (48, 64)
  np.testing.assert_array_equal(on_canvas[:, 0], batch["corrupted"])
  _, metrics = jax.jit(step)(state, jax.tree.map(jnp.asarray, (inputs, labels, (
      recovery_inputs, on_canvas))))
  assert np.isfinite(float(metrics["ce_loss"])) and np.isfinite(float(metrics["grad_norm"]))


def test_packed_rows_label_every_sample_answer():
  config = config_lib.load(REASON, {"init_from": "random", "data.batch_size": 2,
                                    "data.token_budget": 768,
                                    "reason.recovered_images": "cache"})
  tok, batch, markers, instruction = _batch(config)
  cfg = bagel.BagelConfig.tiny(vocab_size=len(tok))
  samples = packing.batch_samples(batch)
  assert all(len(row) >= 2 for row in samples)
  recovered = [[np.full_like(s["corrupted"], 7) for s in row] for row in samples]
  inputs, labels, images = reasoning.reasoning_rows(batch, cfg, markers, instruction, recovered)
  assert images.shape[:2] == (2, 2 * batch["corrupted"].shape[1])
  # The rows hold the samples where the packer put them.
  np.testing.assert_array_equal(inputs.layout.sample_id + 1, batch["segment_ids"])
  for r, row in enumerate(samples):
    expected = np.concatenate([[markers.vision_start, *s["answer_ids"][1:], markers.end_of_text]
                               for s in row])
    np.testing.assert_array_equal(labels[r][labels[r] >= 0], expected)
    where = np.nonzero((labels[r] >= 0) & (labels[r] != markers.end_of_text))[0]
    np.testing.assert_array_equal(inputs.text_ids[r][where + 1], labels[r][where])
    np.testing.assert_array_equal(images[r, 1::2][:len(row)].max(axis=(1, 2, 3)), 7)


def test_reasoning_rows_pair_each_question_with_its_own_answer():
  # Shapes records ask several questions (colour, shape, count, ...) with different answers; the
  # row's question and its answer must come from the same drawn question, or the stage trains the
  # model to answer one question with another's reasoning and letter.
  instruction = "Please restore this corrupted image to its clean version."
  fields = stage_fields.StageFields("reason", seed=0, instruction=instruction,
                                    vit_rule={"max_side": 64, "min_side": 32, "stride": 8})
  world = shapes.ShapesWorld("train", size=24)
  not_first = 0
  for index in range(len(world)):
    rec = world.record(index)
    questions = rec["questions"]
    assert len(questions) >= 2
    out = fields.map({**rec, "clean": rec["image"], "corrupted": rec["image"], "epoch": 0})
    # Which of the record's questions the row asks: its prompt is that question's, exactly.
    asked = [q for q in questions
             if out["question"] == answer_format.format_question(q, instruction)]
    assert len(asked) == 1, out["question"]
    q = asked[0]
    # The clean record has no corruption steps: the answer text is the question's own.
    assert out["answer"] == shapes_answers.answer_text(q), (q["question"], out["answer"])
    assert out["answer_letter"] == q["answer"]
    assert answer_format.parse_answer(out["answer"]) == q["answer"]
    # Count rows where pairing with the record's first question instead would be visible.
    not_first += shapes_answers.answer_text(q) != shapes_answers.answer_text(questions[0])
  # The draw must pick other questions than the first, so a wrong pairing shows above.
  assert not_first >= len(world) // 3, not_first


def test_on_the_fly_recovery_refuses_packing():
  with pytest.raises(config_lib.ConfigError, match="data.token_budget"):
    config_lib.load(REASON, {"init_from": "random", "data.token_budget": 512})


def test_a_recovery_cache_knows_its_model_by_its_files(tmp_path):
  # However init_from names the model, the cache is its; another model in its place is not.
  model = tmp_path / "sft" / "model"
  model.mkdir(parents=True)
  (model / "weights").write_bytes(b"12")
  configs = [config_lib.load(REASON, {"init_from": path, "reason.recovery_cache": str(tmp_path)})
             for path in (str(tmp_path / "sft"), str(model), str(model) + "/")]
  assert len({recovery_cache.model_files(c) for c in configs}) == 1
  with open(tmp_path / recovery_cache.MANIFEST, "w") as f:
    json.dump({"fingerprint": recovery_cache.fingerprint(configs[0]), "stage": "reason",
               "init_from": configs[0].init_from}, f)
  recovery_cache.RecoveryCache.open(str(tmp_path), configs[2])
  (model / "weights").write_bytes(b"345")  # another model written in its place
  with pytest.raises(config_lib.ConfigError, match=r"another config \(the model: built from "
                     r"'.*sft' as its files were then, and init_from '.*model/' has other files"):
    recovery_cache.RecoveryCache.open(str(tmp_path), configs[2])


def test_a_cache_build_counts_repeated_records_and_says_what_was_bad(tmp_path):
  # A table of 8 rows, one of them no image: the bad row's replacement is another row of the
  # same epoch, read twice. The build said "already there" of it in an empty folder, and nothing
  # of the bad row.
  tsv = tmp_path / "rows.tsv"
  lines = ["index\timage\tquestion\tA\tB\tanswer"]
  for i in range(8):
    pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue() if i != 5 else b"no image").decode()
    lines.append(f"{i}\t{image}\tIs it {i}?\tyes\tno\tA")
  tsv.write_text("\n".join(lines) + "\n")
  cache = str(tmp_path / "cache")
  config = config_lib.load(REASON, {
      "init_from": "random", "total_steps": 1, "data.batch_size": 8, "mesh.data": -1,
      "mesh.fsdp": 1, "reason.recovery_steps": 2, "reason.recovered_images": "cache",
      "reason.recovery_cache": cache, "data.source": "vqa_tsv", "data.path": str(tsv),
      "data.max_skip_ratio": 0.5})
  counts = recovery_cache.build(config, cache, progress=False)
  assert (counts["written"], counts["skipped"], counts["repeated"]) == (7, 0, 1)
  assert counts["bad"].startswith("vqa_tsv data (reason): 1 of 8 records read were unreadable")
  assert len(os.listdir(os.path.join(cache, "epoch_0000"))) == 7


@pytest.mark.slow
def test_precomputed_recoveries_feed_the_reasoning_stage(tmp_path):
  cache = str(tmp_path / "cache")
  overrides = {"init_from": "random", "total_steps": 2, "log_every": 1, "checkpoint_every": 2,
               "data.batch_size": 8, "mesh.data": -1, "mesh.fsdp": 1, "tensorboard": False,
               "reason.recovery_steps": 2, "reason.recovered_images": "cache",
               "reason.recovery_cache": cache}
  config = config_lib.load(REASON, overrides)
  assert recovery_cache.build(config, cache, progress=False) == {"written": 16, "skipped": 0,
                                                                    "repeated": 0, "bad": None}
  files = sorted(os.listdir(os.path.join(cache, "epoch_0000")))
  assert len(files) == 16
  image = np.asarray(Image.open(os.path.join(cache, "epoch_0000", files[0])))
  assert image.shape == (64, 64, 3) and image.std() > 0
  # Re-running resumes: nothing is recomputed.
  assert recovery_cache.build(config, cache, progress=False) == {"written": 0, "skipped": 16,
                                                                    "repeated": 0, "bad": None}

  history = trainer.train(config, str(tmp_path / "run"), reasoning.build)
  assert len(history) == 2 and np.isfinite(history[-1]["ce_loss"])

  opened = recovery_cache.RecoveryCache.open(cache, config)
  with pytest.raises(FileNotFoundError, match="no recovery of record 99999 .epoch 0"):
    opened.load({"index": 99999, "epoch": 0, "corrupted": image})
  # A cache of another config is a bad input: one error line from the commands (ConfigError).
  other = config_lib.load(REASON, {**overrides, "seed": 1})
  with pytest.raises(config_lib.ConfigError, match="seed: cache 0, config 1"):
    recovery_cache.RecoveryCache.open(cache, other)
  other = config_lib.load(REASON, {**overrides, "guidance.text_scale": 1.5})
  with pytest.raises(config_lib.ConfigError, match="guidance.text_scale: cache 4.0, config 1.5"):
    recovery_cache.RecoveryCache.open(cache, other)
  with pytest.raises(config_lib.ConfigError, match="needs reason.recovery_cache"):
    recovery_cache.RecoveryCache.open("", config)
  # A run longer than the steps the cache was built for is refused at start, not at the step
  # that first misses a record; a build for more steps extends the cache (and what it covers).
  longer = config_lib.load(REASON, {**overrides, "total_steps": 3})
  with pytest.raises(config_lib.ConfigError,
                     match="covers the first 2 steps of this run's batches, and the run has "
                           "total_steps 3: extend it with .* --steps 3"):
    recovery_cache.RecoveryCache.open(cache, longer)
  other_batches = config_lib.load(REASON, {**overrides, "total_steps": 3, "data.batch_size": 4})
  recovery_cache.RecoveryCache.open(cache, other_batches)  # another layout: not known here
  assert recovery_cache.build(longer, cache, progress=False) == {"written": 8, "skipped": 16,
                                                                     "repeated": 0, "bad": None}
  recovery_cache.RecoveryCache.open(cache, longer)
