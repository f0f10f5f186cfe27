"""Stage III on the tiny model: rows carry the answer labels, the step overfits one batch, and the
stage runs through the trainer with recoveries generated on the fly."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import config_lib
from robust_u1_jax.data import pipeline as pipeline_lib
from robust_u1_jax.data import transforms
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.models import bagel, sequence
from robust_u1_jax.training import reasoning, rl, trainer
from robust_u1_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASON = os.path.join(ROOT, "configs", "reason.py") + ":tiny"


def _batch(config):
  tok = tokenizer_lib.load_tokenizer()
  data = pipeline_lib.make_pipeline(config.data, seed=0, tokenizer=tok, stage="reason")
  batch = next(data)
  data.close()
  special = tokenizer_lib.special_token_ids(tok)
  markers = sequence.Markers(special["vision_start"], special["vision_end"])
  instruction = tokenizer_lib.encode_text_block(tok, config.instruction)
  return tok, batch, markers, instruction


def test_labels_are_the_answer_tokens():
  config = config_lib.load(REASON, {"init_from": "random", "data.batch_size": 2})
  tok, batch, markers, instruction = _batch(config)
  cfg = bagel.BagelConfig.tiny(vocab_size=len(tok))
  inputs, labels, _ = reasoning.reasoning_rows(batch, cfg, markers, instruction)
  for i in range(2):
    answer = batch["answer_ids"][i][:batch["answer_lengths"][i]]
    np.testing.assert_array_equal(labels[i][labels[i] >= 0], answer[1:])
    # Each label is the text token right after its position.
    where = np.nonzero(labels[i] >= 0)[0]
    np.testing.assert_array_equal(inputs.text_ids[i][where + 1], labels[i][where])
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
  settings = rl.RLSettings(1, 3, 0, 0.0, 3.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
  vit_rule = transforms.resize_rule(config.data, "vit")
  assert transforms.bagel_size(*batch["corrupted"].shape[1:3], **vit_rule) == \
      batch["corrupted_vit"].shape[1:3]
  step = jax.jit(reasoning.make_step(graphdef, tx, settings, vit_rule, 0.0))
  inputs = jax.tree.map(jnp.asarray, reasoning.reasoning_rows(batch, cfg, markers, instruction))
  losses = []
  for _ in range(12):
    state, metrics = step(state, inputs)
    losses.append(float(metrics["ce_loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


def test_reason_stage_runs_through_the_trainer(tmp_path):
  config = config_lib.load(REASON, {
      "init_from": "random", "total_steps": 2, "log_every": 1, "checkpoint_every": 2,
      "data.batch_size": 8, "mesh.data": -1, "mesh.fsdp": 1, "reason.recovery_steps": 3,
      "tensorboard": False})
  history = trainer.train(config, str(tmp_path), reasoning.build)
  assert np.isfinite(history[-1]["ce_loss"]) and 0 <= history[-1]["token_accuracy"] <= 1
