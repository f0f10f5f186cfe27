"""Training checkpoints: state + iterator round trip, fallback past a damaged checkpoint."""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from robust_u1_jax.training import checkpoint


class CountingIterator:
  def __init__(self):
    self.position = 0

  def __next__(self):
    self.position += 1
    return self.position

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _state(value):
  return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def test_round_trip_restores_state_iterator_and_meta(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  it = CountingIterator()
  for step in (1, 2):
    next(it)
    assert ckpt.save(step, _state(step), it, {"step": step, "note": "ok"})
  ckpt.close()

  fresh = CountingIterator()
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  step, state, meta = ckpt.restore(checkpoint.abstract_like(_state(0.0)), fresh)
  assert step == 2 and meta["note"] == "ok" and fresh.position == 2
  np.testing.assert_array_equal(state["w"], 2.0)
  ckpt.close()


def _save_steps(workdir, steps):
  ckpt = checkpoint.Checkpointer(str(workdir), every=1, keep=3)
  it = CountingIterator()
  for step in steps:
    next(it)
    ckpt.save(step, _state(step), it, {"step": step})
  ckpt.close()


def _damage(workdir, step):
  for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "*"),
                     recursive=True):
    if os.path.isfile(f):
      with open(f, "r+b") as fh:
        fh.truncate(max(os.path.getsize(f) // 3, 0))


def test_damaged_latest_checkpoint_falls_back_to_previous_and_saves_its_step_again(tmp_path,
                                                                                   capsys):
  _save_steps(tmp_path, (1, 2))
  _damage(tmp_path, 2)
  fresh = CountingIterator()
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  step, state, _ = ckpt.restore(checkpoint.abstract_like(_state(0.0)), fresh)
  assert step == 1 and fresh.position == 1
  np.testing.assert_array_equal(state["w"], 1.0)
  out = capsys.readouterr().out
  assert os.path.join("checkpoints", "2") in out and "2.damaged" in out
  # Moved aside: the resumed run saves step 2 again, and a later run resumes from it.
  assert ckpt.latest_step() == 1
  next(fresh)
  assert ckpt.save(2, _state(2.0), fresh, {"step": 2}, force=True)
  ckpt.close()
  assert checkpoint.latest_step(str(tmp_path)) == 2
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "2.damaged"))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  step, state, _ = ckpt.restore(checkpoint.abstract_like(_state(0.0)), CountingIterator())
  assert step == 2
  np.testing.assert_array_equal(state["w"], 2.0)
  ckpt.close()


def test_no_readable_checkpoint_stops_instead_of_starting_again(tmp_path):
  _save_steps(tmp_path, (1, 2))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  # A state of another shape (a changed model): no checkpoint fits it.
  other = {"w": jnp.zeros((5, 3), jnp.float32), "step": jnp.asarray(0, jnp.int32)}
  with pytest.raises(checkpoint.UnreadableCheckpoints, match=r"checkpoints.*no checkpoint can be"
                     r" restored .*checkpoints.2.*another --workdir"):
    ckpt.restore(checkpoint.abstract_like(other), CountingIterator())
  ckpt.close()
  assert checkpoint.latest_step(str(tmp_path)) == 2  # nothing moved or deleted


def test_no_checkpoint_returns_none(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  assert ckpt.restore(checkpoint.abstract_like(_state(0.0)), CountingIterator()) is None
  ckpt.close()


def test_non_finite_loss_names_step_losses_and_the_checkpoint_kept():
  checkpoint.check_finite(3, {"loss": 1.0, "reward_mean": float("nan")}, kept=lambda: 2)
  with pytest.raises(checkpoint.NonFiniteLoss, match="grad_norm"):
    checkpoint.check_finite(3, {"loss": 1.0, "grad_norm": float("nan")}, kept=lambda: 2)
  with pytest.raises(checkpoint.NonFiniteLoss,
                     match=r"step 7.*'loss': nan.*the checkpoint of step 6 is kept"):
    checkpoint.check_finite(7, {"loss": float("nan"), "mse_loss": 1.0}, kept=lambda: 6)
  # It said "the last good checkpoint is kept" of a run that had none.
  with pytest.raises(checkpoint.NonFiniteLoss,
                     match="no checkpoint was saved before it, so the run starts again"):
    checkpoint.check_finite(2, {"loss": float("nan")}, kept=lambda: None)
  # The first step's loss comes before any update: no learning rate or clipping made it.
  with pytest.raises(checkpoint.NonFiniteLoss, match="step 1.*it came before any update, so "
                     "from the data or the model, not the learning rate") as info:
    checkpoint.check_finite(1, {"loss": float("nan")}, kept=lambda: None)
  assert "grad_clip" not in str(info.value)


def test_saved_config_reads_the_newest_checkpoints_config(tmp_path):
  workdir = str(tmp_path)
  assert checkpoint.saved_config(workdir) is None  # no checkpoint yet
  ckpt = checkpoint.Checkpointer(workdir, every=1, keep=3)
  it = CountingIterator()
  for step in (1, 2):
    next(it)
    ckpt.save(step, _state(step), it, {"step": step,
                                       "config": json.dumps({"total_steps": step, "seed": 0})})
  ckpt.close()
  assert checkpoint.saved_config(workdir) == {"total_steps": 2, "seed": 0}


def test_saved_config_is_none_without_a_config_in_the_metadata(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  ckpt.save(1, _state(1), CountingIterator(), {"step": 1})
  ckpt.close()
  assert checkpoint.saved_config(str(tmp_path)) is None


def test_a_checkpoint_of_another_process_count_is_refused_by_name(tmp_path):
  # As if two processes had saved step 1: each wrote its own data position.
  _save_steps(tmp_path, [1])
  data = tmp_path / "checkpoints" / "1" / "data"
  (own,) = data.glob("process_*.json")
  assert own.name == "process_0-of-1.json"
  for i in (0, 1):
    (data / f"process_{i}-of-2.json").write_text(own.read_text())
  own.unlink()
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  with pytest.raises(checkpoint.UnreadableCheckpoints,
                     match=r"checkpoints/1 was saved by 2 process\(es\), this run has 1: .* "
                           r"resume with 2 process\(es\)"):
    ckpt.restore(checkpoint.abstract_like(_state(0.0)), CountingIterator())
  ckpt.close()


def test_a_damaged_data_position_falls_back_before_the_collective_restore(tmp_path, capsys):
  # Every process reads every process's position first: one that only its own process could not
  # read would stop that process inside Orbax's restore while the others wait for it there.
  _save_steps(tmp_path, (1, 2))
  (position,) = (tmp_path / "checkpoints" / "2" / "data").glob("process_*.json")
  position.write_text(position.read_text()[:5])
  fresh = CountingIterator()
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  asked = []
  restore = ckpt.manager.restore
  ckpt.manager.restore = lambda step, **kwargs: asked.append(step) or restore(step, **kwargs)
  step, _, _ = ckpt.restore(checkpoint.abstract_like(_state(0.0)), fresh)
  ckpt.close()
  assert step == 1 and fresh.position == 1
  assert asked == [1]  # step 2 never reached Orbax's (collective) restore
  assert "2.damaged" in capsys.readouterr().out


def test_a_missing_data_position_falls_back_before_the_collective_restore(tmp_path,
                                                                         monkeypatch):
  # As if process 1 of 2 had not written its position: process 1 alone would fail in Orbax.
  _save_steps(tmp_path, [1, 2])
  for step in (1, 2):
    data = tmp_path / "checkpoints" / str(step) / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  (tmp_path / "checkpoints" / "1" / "data" / "process_1-of-2.json").write_text(
      (tmp_path / "checkpoints" / "1" / "data" / "process_0-of-2.json").read_text())
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=3)
  with monkeypatch.context() as m:  # one of two processes, for the check alone
    m.setattr(checkpoint.jax, "process_count", lambda: 2)
    ckpt._read_data_positions(1)  # both positions there
    with pytest.raises(ValueError, match=r"data position\(s\) process_1-of-2.json are missing"):
      ckpt._read_data_positions(2)
  ckpt.close()
