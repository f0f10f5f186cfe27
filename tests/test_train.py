"""The training loop end to end on the built-in world: SFT learns, runs resume exactly after
SIGKILL, a non-finite loss stops the run without touching the last good checkpoint."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from robust_u1_jax import config_defaults, config_lib
from robust_u1_jax.checkpoints import orbax_io
from robust_u1_jax.data import packing, pipeline
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.eval import evaluation as eval_lib
from robust_u1_jax.training import checkpoint as checkpoint_lib
from robust_u1_jax.training import evaluation, metrics_log, sft, stages, trainer
from robust_u1_jax.training import state as state_lib
from robust_u1_jax.training.stage_spec import StageSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft.py") + ":tiny"
SMALL = {"data.batch_size": 8, "log_every": 1, "checkpoint_every": 2, "mesh.data": -1,
         "mesh.fsdp": 1, "tensorboard": False, "eval_every": 0}


def _config(steps, **extra):
  return config_lib.load(SFT, {**SMALL, "total_steps": steps, **extra})


def _history(workdir):
  rows = metrics_log.read_rows(os.path.join(workdir, "metrics.jsonl"))
  return {row["step"]: row for row in rows if not row.get("eval")}


def _train_command(workdir, steps, **extra):
  overrides = [f"--config.{k}={v}" for k, v in {**SMALL, "total_steps": steps, **extra}.items()]
  return [sys.executable, "-m", "robust_u1_jax.train", "--config", SFT, "--workdir", workdir,
          *overrides]


@pytest.mark.slow
def test_sft_resumes_exactly_after_sigkill(tmp_path):
  """Every run is a fresh process, as a user's would be: uninterrupted; killed with SIGKILL once
  its step-4 checkpoint is complete; restarted from the killed run's workdir (with a setting
  changed that the first six steps never read). Rows average 3 steps, so the checkpoint falls
  inside the window of steps 4-6: it keeps step 4's metrics for the resumed run's row."""
  steps = 6
  straight = str(tmp_path / "straight")
  subprocess.run(_train_command(straight, steps, log_every=3), check=True, cwd=ROOT,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  reference = _history(straight)

  killed = str(tmp_path / "killed")
  # Step 6's checkpoint follows step 4's by about 0.4 s: a test process stalled that long (the
  # other test worker's load) kills too late, and that try is run again.
  for _ in range(3):
    shutil.rmtree(killed, ignore_errors=True)
    proc = subprocess.Popen(_train_command(killed, steps, log_every=3), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(killed, "checkpoints", "4", "meta")
    deadline = time.time() + 600
    while not os.path.isdir(marker) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(marker), "the subprocess never wrote its step-4 checkpoint"
    if checkpoint_lib.latest_step(killed) == 4:
      break
  assert not os.path.isdir(os.path.join(killed, "model")), "the run finished before the kill"
  assert checkpoint_lib.results_line(killed, steps).startswith(
      "stopped at step 4 of 6; checkpoints in")  # a stopped run's last line

  # Restarted keeping more checkpoints, which the steps never read: the run says what differs.
  out = subprocess.run(_train_command(killed, steps, log_every=3, keep_checkpoints=4), check=True,
                       cwd=ROOT, capture_output=True, text=True)
  assert f"resuming from step 4 in {killed}" in out.stdout
  assert "with settings other than its checkpoint's: keep_checkpoints 3, now 4" in out.stdout
  resumed = _history(killed)
  assert sorted(resumed) == sorted(reference) == [3, 6]
  for s in (3, 6):
    assert resumed[s]["loss"] == reference[s]["loss"], (s, resumed[s], reference[s])
    assert resumed[s]["grad_norm"] == reference[s]["grad_norm"]


@pytest.mark.slow
def test_a_run_stopped_by_ctrl_c_saves_and_exits_130(tmp_path):
  # Not 0: `train A && train B` must not go on to B, nor a scheduler count the run as done.
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_train_command(workdir, 1000, checkpoint_every=1000), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and proc.poll() is None \
      and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 130, stderr[-3000:]
  step = checkpoint_lib.latest_step(workdir)
  assert step is not None and step < 1000
  assert stdout.rstrip().endswith(f"stopped at step {step} of 1000; checkpoints in "
                                  f"{os.path.join(workdir, 'checkpoints')}: run the same command "
                                  "to resume"), stdout
  assert stdout.count("stopped at step") == 1, stdout  # the trainer said it too, above its bar
  assert "Traceback" not in stderr and "interrupted" not in stderr


@pytest.mark.slow
def test_sft_lowers_its_loss(tmp_path):
  config = _config(40, **{"optimizer.warmup_steps": 5, "log_every": 10, "checkpoint_every": 40})
  history = trainer.train(config, str(tmp_path), sft.build)
  first, last = history[0]["loss"], history[-1]["loss"]
  assert last < 0.9 * first, (first, last)
  # The learning rate is logged (a row: its steps' mean), as the optimizer's schedule has it.
  schedule = state_lib.learning_rate_schedule(config.optimizer, 40)
  for row in history:
    steps = range(row["step"] - 10, row["step"])  # the schedule counts updates from 0
    assert row["learning_rate"] == pytest.approx(np.mean([schedule(s) for s in steps]), rel=1e-5)
  # Model FLOPs of the rows (flops.py) are logged; MFU only where the device's peak is known.
  assert history[-1]["model_tflops_per_step"] > 0
  assert "mfu" not in history[-1]


def test_packed_rows_log_the_samples_they_hold(tmp_path):
  # A 400-token budget packs 3 tiny SFT samples into each of the 8 rows.
  history = trainer.train(_config(2, **{"data.token_budget": 400}),
                          str(tmp_path), sft.build)
  for row in history:
    assert row["samples_per_s"] == pytest.approx(24 * row["steps_per_s"])


@pytest.mark.slow
def test_evaluation_scores_its_own_images_whatever_the_batch(tmp_path):
  """The evaluation recovers the first EVAL_IMAGES validation samples, more than the training batch
  of 8 holds (the demo's RL trains on 2): stages of any batch score the same images. Beside the
  recoveries it scores doing nothing. A run shorter than eval_every evaluates at its last step
  (it wrote no grid at all)."""
  from PIL import Image

  trainer.train(_config(2, **{"eval_every": 500, "eval_num_steps": 3}), str(tmp_path), sft.build)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    evals = [row for row in map(json.loads, f) if row.get("eval")]
  assert len(evals) == 1 and evals[0]["step"] == 2 and 0.0 <= evals[0]["eval_ssim"] <= 1.0
  assert os.listdir(os.path.join(tmp_path, "images")) == ["step_0000002.png"]

  # The same validation samples, drawn here from the pipeline.
  data_config = _config(2).eval_data
  data_config.token_budget, data_config.batch_size = 0, evaluation.EVAL_IMAGES
  data = pipeline.make_pipeline(data_config, seed=0, tokenizer=tokenizer_lib.load_tokenizer(),
                                stage="rl")
  samples = [row[0] for row in packing.batch_samples(next(data))]
  data.close()
  corrupted = np.stack([s["corrupted"] for s in samples])
  clean = np.stack([s["clean"] for s in samples])
  assert len(samples) == evaluation.EVAL_IMAGES > _config(2).data.batch_size
  expected = eval_lib.ssim(corrupted, clean).mean()
  assert evals[0]["eval_ssim_corrupted"] == pytest.approx(expected, abs=1e-6)

  # The grid: its first GRID_IMAGES, corrupted | recovered | clean, 64 px cells, 2 px apart,
  # scaled 3x under the columns' titles.
  titled = np.asarray(Image.open(os.path.join(tmp_path, "images", "step_0000002.png")))
  header = titled.shape[0] - 3 * (evaluation.GRID_IMAGES * 66 + 2)
  assert titled.shape[1] == 3 * (3 * 66 + 2) and 10 < header < 40
  grid = titled[header:][::3, ::3]
  for i in range(evaluation.GRID_IMAGES):
    y = 2 + 66 * i
    np.testing.assert_array_equal(grid[y:y + 64, 2:66], corrupted[i])
    np.testing.assert_array_equal(grid[y:y + 64, 2 + 2 * 66:2 * 66 + 66], clean[i])


def test_evaluation_on_a_small_folder_scores_each_image_once(tmp_path):
  """A folder of 3 images fills the evaluation's batch of EVAL_IMAGES by repeating them; the
  evaluation keeps each once, so its mean and grid count no image twice."""
  from PIL import Image

  for i in range(3):
    Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
  data_config = _config(2, **{"eval_data.source": "folder",
                              "eval_data.path": str(tmp_path)}).eval_data
  data_config.token_budget, data_config.batch_size = 0, evaluation.EVAL_IMAGES
  data = pipeline.make_pipeline(data_config, seed=0, tokenizer=tokenizer_lib.load_tokenizer(),
                                stage="rl")
  samples = [row[0] for row in packing.batch_samples(next(data))]
  data.close()
  assert len(samples) == evaluation.EVAL_IMAGES
  kept = evaluation.once_each(samples)
  assert sorted(int(s["index"]) for s in kept) == [0, 1, 2]
  assert [s["index"] for s in kept] == [s["index"] for s in samples[:3]]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path):
  workdir = str(tmp_path)

  def build(ctx):
    spec = sft.build(ctx)

    def make_step(graphdef, tx):
      real = spec_make(graphdef, tx)

      def step(state, inputs):
        state, metrics = real(state, inputs)
        bad = state.step >= 3
        metrics["loss"] = jnp.where(bad, jnp.nan, metrics["loss"])
        return state, metrics
      return step

    spec_make = spec.make_step
    spec.make_step = make_step
    return spec

  from robust_u1_jax.training import checkpoint
  with pytest.raises(checkpoint.NonFiniteLoss, match="step 3"):
    trainer.train(_config(6), workdir, build)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]


@pytest.mark.slow
def test_sharded_sft_step_matches_single_device():
  """The same SFT step on 8 fake devices (fsdp 4 x tensor 2) and on one device."""
  import jax
  import numpy as np
  from flax import nnx

  from robust_u1_jax import sharding
  from robust_u1_jax.data import shapes
  from robust_u1_jax.data import sequence
  from robust_u1_jax.models import bagel

  cfg = bagel.BagelConfig.tiny()
  model = bagel.Bagel(cfg, rngs=nnx.Rngs(0))
  model.llm2vae.kernel.set_value(
      0.05 * jax.random.normal(jax.random.PRNGKey(1), model.llm2vae.kernel.shape))
  world = shapes.ShapesWorld("train")
  images = np.stack([world[i]["image"] for i in range(8)])
  batch = {"clean": images, "corrupted": images // 2,
           "instruction_ids": np.tile(np.arange(3, 9), (8, 1)),
           "instruction_lengths": np.full(8, 6)}
  inputs = sft.sft_rows(batch, cfg, sequence.Markers(1, 2), np.random.default_rng(0),
                        (0.1, 0.3, 0.3))
  optimizer = config_defaults.get_optimizer_config()
  tx = state_lib.make_optimizer(optimizer, 10)
  graphdef, params, frozen = state_lib.split_model(model, sft.GENERATION_PARAMS)
  step = sft.make_step(graphdef, tx, timestep_shift=1.0, ema_decay=0.0)
  state = state_lib.create_state(params, frozen, tx, jax.random.PRNGKey(0), False)
  _, single = jax.jit(step)(state, jax.tree.map(jnp.asarray, inputs))

  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  placed = lambda part: jax.device_put(
      part, sharding.state_shardings(part, bagel.COMPONENTS, mesh))
  config = _config(2)
  sharded_params = placed(params)
  sharded_state = trainer.state_creator(config, tx, sharded_params)(
      sharded_params, placed(frozen), jax.random.PRNGKey(0), {})
  assert "tensor" in str(sharded_state.params["language_model"]["layers"]["gen"]["mlp"]
                         ["up_proj"]["kernel"].get_value().sharding.spec)
  # Adam's moments and the EMA live on the parameters' shards, not replicated.
  want = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, sharded_state.params))
  adam = sharded_state.opt_state[1][0]
  for tree in (adam.mu, adam.nu, sharded_state.ema):
    got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, tree))
    assert all(g.is_equivalent_to(w, x.ndim) for g, w, x in zip(
        got, want, jax.tree.leaves(tree))), (got[:3], want[:3])
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  spec = StageSpec(trainable=sft.GENERATION_PARAMS, host_inputs=None,
                   make_step=lambda g, t: step, samples_per_step=8)
  shardings = jax.tree.map(lambda x: x.sharding, sharded_state)
  with jax.set_mesh(mesh):
    new_state, sharded = trainer.jit_step(spec, graphdef, tx, shardings)(
        sharded_state, jax.device_put(jax.tree.map(jnp.asarray, inputs), batch_sharding))
  assert jax.tree.map(lambda x: x.sharding, new_state) == shardings
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(float(sharded[key]), float(single[key]), rtol=1e-5)


def _regression_loss(params, frozen, batch, key):
  """Mean squared error of a two-layer tanh network: a per-sample mean, so the gradient of a
  k b batch is the mean of its k micro-batches' gradients."""
  del frozen, key
  x_bd, y_bo = batch
  hidden_bh = jnp.tanh(x_bd @ params["w1"])
  loss = jnp.mean((hidden_bh @ params["w2"] - y_bo) ** 2)
  return loss, {}


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("schedule", ["warmup_cosine", "constant"])
def test_grad_accumulation_matches_one_k_fold_batch(k, schedule):
  """k micro-batches of b samples per update follow, update for update, the run that takes the
  k b samples in one batch: same losses, parameters and EMA, the learning-rate schedule (warmup
  and cosine) and the EMA counted in updates. At a constant rate only the EMA could differ."""
  import jax
  import numpy as np


  updates, b, d, h = 6, 2, 5, 7
  rng = np.random.default_rng(0)
  x_nbd = rng.normal(size=(updates, k * b, d)).astype(np.float32)
  y_nbo = rng.normal(size=(updates, k * b, 1)).astype(np.float32)
  params = {"w1": jnp.asarray(rng.normal(size=(d, h)), jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(h, 1)), jnp.float32)}
  ema_decay = 0.8

  def run(accum, steps, batches):
    o = config_defaults.get_optimizer_config()
    # A schedule that changes at every update and clipping that engages, so any miscount shows.
    o.update(learning_rate=0.05, end_learning_rate=0.0, warmup_steps=2 * accum, grad_clip=0.5,
             weight_decay=0.01, grad_accum_steps=accum)
    if schedule == "constant":
      o.update(end_learning_rate=o.learning_rate, warmup_steps=0)
    tx = state_lib.make_optimizer(o, steps)
    step = jax.jit(state_lib.loss_step(_regression_loss, tx, ema_decay))
    state = state_lib.create_state(params, {}, tx, jax.random.PRNGKey(0), ema=True)
    losses, states = [], []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
      states.append(state)
    return losses, states

  big_losses, big = run(1, updates, [(x_nbd[i], y_nbo[i]) for i in range(updates)])
  micro = [(x_nbd[i, j * b:(j + 1) * b], y_nbo[i, j * b:(j + 1) * b])
           for i in range(updates) for j in range(k)]
  micro_losses, small = run(k, updates * k, micro)
  for i in range(updates):
    np.testing.assert_allclose(np.mean(micro_losses[i * k:(i + 1) * k]), big_losses[i],
                               rtol=1e-5)
    done = small[(i + 1) * k - 1]  # the micro step that applied update i
    for name, got, want in (("params", done.params, big[i].params),
                            ("ema", done.ema, big[i].ema)):
      for leaf in want:
        np.testing.assert_allclose(got[leaf], want[leaf], rtol=2e-5, atol=1e-6,
                                   err_msg=f"{name}[{leaf}] after update {i}")
  # Between updates nothing moves: the micro steps only bank their gradients.
  for j in range(k - 1):
    for leaf in params:
      np.testing.assert_array_equal(small[j].params[leaf], params[leaf])
      np.testing.assert_array_equal(small[j].ema[leaf], params[leaf])


def test_total_steps_must_end_on_an_update():
  with pytest.raises(config_lib.ConfigError, match="optimizer.grad_accum_steps = 4"):
    _config(6, **{"optimizer.grad_accum_steps": 4})
  _config(8, **{"optimizer.grad_accum_steps": 4})


@pytest.mark.slow
def test_a_stopped_run_resumes_and_writes_its_model_only_at_the_last_step(tmp_path, monkeypatch):
  from robust_u1_jax.training import checkpoint

  workdir = str(tmp_path / "run")
  instructions = []
  make_pipeline = pipeline.make_pipeline

  def recording(*args, **kwargs):
    instructions.append(kwargs.get("instruction"))
    return make_pipeline(*args, **kwargs)

  monkeypatch.setattr(pipeline, "make_pipeline", recording)
  # A signal as the run starts: it stops after step 1 with a checkpoint and no model.
  monkeypatch.setattr(checkpoint.Checkpointer, "install_signal_handlers",
                      lambda self: setattr(self, "stop_requested", True))
  config = _config(4, instruction="Clean this image.")
  with pytest.raises(checkpoint.Stopped) as stopped:
    trainer.train(config, workdir, sft.build)
  # 143: the service of several processes stops on SIGTERM, and no handler saw another signal.
  assert stopped.value.step == 1 and stopped.value.exit_status == 143 and stopped.value.history
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  assert not os.path.exists(os.path.join(workdir, "model"))
  # The rows (training and evaluation) are built with the config's instruction, not the
  # built-in one.
  assert instructions and set(instructions) == {"Clean this image."}
  monkeypatch.undo()
  trainer.train(config, workdir, sft.build)
  assert checkpoint.finished(workdir, 4)
  # The final checkpoint without its model (a run stopped while writing it): the next run
  # writes the model from that checkpoint instead of answering "nothing to train" forever.
  model_files = sorted(os.listdir(os.path.join(workdir, "model")))
  os.rename(os.path.join(workdir, "model"), str(tmp_path / "first_model"))
  assert trainer.train(config, workdir, sft.build) == []
  assert checkpoint.finished(workdir, 4)
  assert sorted(os.listdir(os.path.join(workdir, "model"))) == model_files


def test_a_run_resumed_with_other_total_steps_says_its_schedule_changes(tmp_path, capsys):
  trainer.train(_config(1), str(tmp_path), sft.build)
  capsys.readouterr()
  trainer.train(_config(2), str(tmp_path), sft.build)
  out = capsys.readouterr().out
  assert "total_steps 1, now 2" in out
  assert "the learning-rate schedule spans the run's optimizer updates, which total_steps sets" \
      in out
  # Finished, asked again with another setting: nothing trains, and the run says what differs
  # (it said "nothing to train" alone).
  assert trainer.train(_config(2, **{"optimizer.learning_rate": 0.5}), str(tmp_path),
                       sft.build) == []
  out = capsys.readouterr().out
  assert "is already at the final step 2; nothing to train" in out
  assert "its model was trained with settings other than these: optimizer.learning_rate" in out
  # Fields the caller counts as the same training (the demo's chained paths) are no other setting.
  assert trainer.train(_config(2, **{"optimizer.learning_rate": 0.5}), str(tmp_path), sft.build,
                       same_training=("optimizer.learning_rate",)) == []
  assert "settings other than these" not in capsys.readouterr().out
  # Its model lost and total_steps lowered: the model written is of the checkpoint's later step,
  # and said so (it said "already holds the final step 2" and that the new schedule applies).
  shutil.rmtree(tmp_path / "model")
  assert trainer.train(_config(1), str(tmp_path), sft.build) == []
  out = capsys.readouterr().out
  assert (f"{tmp_path}'s checkpoint is of step 2, past total_steps=1: writing the model of step 2"
          in out) and "total_steps 2, now 1" in out and "schedule" not in out
  # Its checkpoints deleted, the model kept: the run trains again and says why.
  shutil.rmtree(tmp_path / "checkpoints")
  trainer.train(_config(2), str(tmp_path), sft.build)
  assert "holds a model but no checkpoint in" in capsys.readouterr().out
  assert checkpoint_lib.finished(str(tmp_path), 2)


def test_a_run_stopped_by_bad_records_keeps_its_steps(tmp_path, capsys, caplog):
  """Past data.max_skip_ratio mid-run, the steps since the last checkpoint were lost: they are
  saved, and the run resumes from them once the data is mended."""
  from PIL import Image

  from robust_u1_jax.data import bad_records

  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(24):
    path = folder / f"img_{i:02d}.png"
    if i in (5, 11, 17):
      path.write_bytes(b"not an image")
    else:
      Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
  workdir = str(tmp_path / "run")
  data = {"data.source": "folder", "data.path": str(folder), "data.corruption": "gaussian_noise",
          "data.num_epochs": 0, "checkpoint_every": 100}
  with pytest.raises(bad_records.TooManyBadRecords):
    trainer.train(_config(12, **data, **{"data.max_skip_ratio": 0.05}), workdir, sft.build)
  step = max(_history(workdir))
  assert 1 <= step < 12 and checkpoint_lib.latest_step(workdir) == step
  assert (f"checkpoint of step {step} in {os.path.join(workdir, 'checkpoints')}: with the data "
          "mended (or data.max_skip_ratio raised) the same command resumes there"
          in capsys.readouterr().out)
  stops = checkpoint_lib.Checkpointer(workdir, every=100, keep=1)
  assert stops.stopped_for_bad_records(step) and not stops.stopped_for_bad_records(step - 1)
  stops.close()
  for i in (5, 11, 17):  # mended
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        folder / f"img_{i:02d}.png")
  # The 3 bad of 24 counted before the stop were carried into the resumed run's ratio: it stopped
  # again at its next epoch's end (3 of 48), and again, until the good records outweighed them.
  with caplog.at_level(logging.WARNING):
    trainer.train(_config(12, **data, **{"data.max_skip_ratio": 0.05}), workdir, sft.build)
  assert f"resuming from step {step}" in capsys.readouterr().out
  assert checkpoint_lib.finished(workdir, 12)
  logged = "\n".join(r.getMessage() for r in caplog.records)
  assert "the 3 bad of 24 records counted before this resume are set aside" in logged, logged


def test_evaluations_fall_every_eval_every_steps_and_at_the_last():
  assert [s for s in range(1, 8) if trainer.evaluates_at(_config(7, eval_every=3), s)] == [3, 6, 7]
  assert not any(trainer.evaluates_at(_config(7, eval_every=0), s) for s in range(1, 8))
  with pytest.raises(config_lib.ConfigError, match="eval_every = -1"):
    _config(7, eval_every=-1)


def test_a_changed_count_of_rl_updates_is_said_to_move_the_schedule():
  # RL's schedule spans total_steps x rl.updates_per_rollout updates: resumed with 4 instead of
  # 2, it stood where step 1.5 would be, not 3, and nothing said so.
  rl = os.path.join(ROOT, "configs", "rl.py") + ":tiny"
  saved = json.loads(config_lib.load(rl, {"init_from": "random"}).to_json_best_effort())
  now = config_lib.load(rl, {"init_from": "random", "rl.updates_per_rollout": 4})
  assert config_lib.differing_fields(saved, now) == [("rl.updates_per_rollout", 2, 4)]
  assert "which rl.updates_per_rollout sets:" in trainer.schedule_note(["rl.updates_per_rollout"])
  assert trainer.schedule_note(["rl.beta"]) is None


@pytest.mark.slow
def test_data_that_runs_out_before_the_last_step_is_a_config_error(tmp_path):
  # 8 records, one pass: one batch of 8 for a run of 3 steps.
  config = _config(3, **{"data.shapes_size": 8, "data.num_epochs": 1})
  with pytest.raises(config_lib.ConfigError, match=r"data.num_epochs = 1: the data ran out "
                     r"before step 3"):
    trainer.train(config, str(tmp_path), sft.build)


def test_data_several_shards_would_batch_apart_is_refused_before_the_stage_is_built(
    tmp_path, monkeypatch):
  # Two data shards. Packed rows: each process packs its own records, so a finite epoch could end
  # at other steps on each. Unpacked rows: each host would pad its texts to its own width. Refused
  # before the model is built: on a pod, minutes of reading weights (3 min 20 s in a 2-process CPU
  # rehearsal of the tiny model, when the check came after the build).
  from robust_u1_jax.data import multihost

  def build(ctx):
    raise AssertionError("the stage was built")

  monkeypatch.setitem(stages.BUILDERS, "sft", build)
  monkeypatch.setattr(multihost, "data_shard", lambda mesh, **_: (0, 2))
  config = _config(3, **{"data.token_budget": 512, "data.num_epochs": 2})
  with pytest.raises(config_lib.ConfigError, match=r"data.num_epochs = 2 with packed rows .* "
                     r"read as 2 data shards"):
    trainer.train(config, str(tmp_path), build)
  config = _config(3, **{"data.text_pad_to": 0})
  with pytest.raises(config_lib.ConfigError, match=r"a multi-host run of unpacked batches needs "
                     r"data.text_pad_to > 0"):
    trainer.train(config, str(tmp_path / "run"), build)


def test_a_batch_the_mesh_does_not_split_is_refused_before_the_stage_is_built(tmp_path):
  # 8 fake devices on the data axis: 6 rows do not split. The stage (and its model) is never built.
  def build(ctx):
    raise AssertionError("the stage was built")

  config = _config(3, **{"data.batch_size": 6})
  with pytest.raises(config_lib.ConfigError, match=r"data.batch_size=6 does not split over mesh "
                     r"axes \('data', 'fsdp'\) of sizes \[8, 1\]: use a multiple of 8"):
    trainer.train(config, str(tmp_path / "run"), build)
  assert not (tmp_path / "run").exists()


def test_check_config_validates_and_touches_nothing(tmp_path):
  # The paths a config names are not looked at: a launcher runs this where they do not exist.
  command = _train_command(str(tmp_path / "run"), 3, **{"init_from": "/nowhere/model"})
  result = subprocess.run([*command, "--check_config"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout == "the sft config is valid (the paths it names were not checked)\n"
  assert not (tmp_path / "run").exists()


def test_an_evaluation_of_another_source_than_the_training_data_is_noted():
  # eval_data is the config file's copy of data: overriding data.source alone leaves it behind.
  config = _config(4, **{"data.source": "folder", "data.path": "/images", "eval_every": 2})
  note = evaluation.other_source_note(config)
  assert note == ("note: the evaluation (every 2 steps and at the last) reads eval_data.source = "
                  "'shapes', not the training data's data.source = 'folder'; give "
                  "--config.eval_data.source and "
                  "--config.eval_data.path to evaluate on yours")
  assert evaluation.other_source_note(_config(4, **{"eval_every": 2})) is None
  config = _config(4, **{"data.source": "folder", "data.path": "/images", "eval_every": 0})
  assert evaluation.other_source_note(config) is None  # a run that never evaluates


@pytest.mark.slow
def test_a_resume_that_cannot_read_its_checkpoints_names_the_changed_settings(tmp_path):
  # Packed rows read their data in another order: the saved data position cannot be restored.
  workdir = str(tmp_path / "run")
  trainer.train(_config(2), workdir, sft.build)
  with pytest.raises(checkpoint_lib.UnreadableCheckpoints,
                     match=r"no checkpoint can be restored .*; this run's settings differ from "
                     r"the checkpoint's: data.token_budget 0, now 512; total_steps 2, now 4$"):
    trainer.train(_config(4, **{"data.token_budget": 512}), workdir, sft.build)


def test_a_resume_with_another_lora_rank_is_one_line_before_anything_is_built():
  # Resumed at rank 8 from rank-4 checkpoints: three error lines of Orbax's shape errors, cut
  # off mid-word, and the rank last. The alpha scales the update and shapes nothing.
  saved = json.loads(_config(4, **{"lora.rank": 4, "init_from": "/m"}).to_json_best_effort())
  with pytest.raises(checkpoint_lib.UnreadableCheckpoints,
                     match=r"^/w/checkpoints: saved by a run that trained a state of another "
                     r"shape: lora.rank 4, now 8; resume with the checkpoint's settings"):
    trainer.check_same_state(saved, _config(4, **{"lora.rank": 8, "init_from": "/m"}),
                             where="/w/checkpoints")
  trainer.check_same_state(saved, _config(6, **{"lora.rank": 4, "lora.alpha": 8.0,
                                                "init_from": "/m"}))
  trainer.check_same_state(None, _config(4))  # no checkpoint yet


@pytest.mark.slow
def test_a_run_refused_at_its_first_batch_leaves_no_workdir(tmp_path):
  # As RL's recovery refuses images of two sizes: found in the first batch, after the model and
  # the empty checkpoints/ folder were made.
  def build(ctx):
    def refuse(batch, rng):
      raise config_lib.ConfigError("images of two sizes")

    return dataclasses.replace(sft.build(ctx), host_inputs=refuse)

  with pytest.raises(config_lib.ConfigError, match="images of two sizes"):
    trainer.train(_config(2), str(tmp_path / "runs" / "w"), build)
  assert os.listdir(tmp_path) == []


def test_checkpoints_hold_the_trained_part_and_older_whole_ones_still_resume(tmp_path, monkeypatch):
  """A checkpoint holds step, params, optimizer state, EMA and rng; the frozen weights (the whole
  base model under LoRA) are built again from the config on resume. A checkpoint of the whole
  state, as runs wrote before, resumes too, to the same model as an uninterrupted run."""
  import orbax.checkpoint as ocp

  from robust_u1_jax.training import checkpoint

  def stopped_after_step_1(workdir):
    with monkeypatch.context() as m:
      m.setattr(checkpoint.Checkpointer, "install_signal_handlers",
                lambda self: setattr(self, "stop_requested", True))
      with pytest.raises(checkpoint.Stopped):
        trainer.train(config, workdir, sft.build)

  config = _config(3)
  straight = str(tmp_path / "straight")
  trainer.train(config, straight, sft.build)

  resumed = str(tmp_path / "resumed")
  stopped_after_step_1(resumed)
  tree = ocp.StandardCheckpointer().metadata(os.path.join(resumed, "checkpoints", "1", "state"))
  saved = tree.item_metadata.tree if hasattr(tree, "item_metadata") else tree
  assert set(saved) == set(state_lib.SAVED_FIELDS), set(saved)
  trainer.train(config, resumed, sft.build)

  whole = str(tmp_path / "whole")
  with monkeypatch.context() as m:  # the code before: the whole state, no marker
    m.setattr(state_lib, "saved_part", lambda state: state)
    m.setattr(trainer, "SAVED_PART", "not_the_marker")
    stopped_after_step_1(whole)
  trainer.train(config, whole, sft.build)

  reference = _history(straight)
  want = nnx.state(orbax_io.load_orbax(os.path.join(straight, "model")), nnx.Param)
  for workdir in (resumed, whole):
    assert _history(workdir)[3]["loss"] == reference[3]["loss"], workdir
    got = nnx.state(orbax_io.load_orbax(os.path.join(workdir, "model")), nnx.Param)
    chex.assert_trees_all_equal(got, want)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
  # A run whose reader hung (a named pipe among its images, a hung mount) acknowledged every
  # Ctrl-C and SIGTERM and went on waiting: only SIGKILL ended it.
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every=1, keep=1)
  ckpt.install_signal_handlers()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a service's repeated stop still saves first
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C, after a SIGTERM, too
    # The same Ctrl-C passed on twice (`timeout` forwards what the terminal sent the group).
    os.kill(os.getpid(), signal.SIGINT)
    assert ckpt.stop_requested and ckpt.stop_signal == signal.SIGTERM
    time.sleep(checkpoint_lib.AGAIN_AFTER_S + 0.2)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)  # the handler raises in the main thread, ending the wait
  finally:
    ckpt.restore_signal_handlers()
    ckpt.close()
