"""Run reporting: averaged windows (extremes kept), throughput fields, TensorBoard events,
image grids."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_u1_jax.training import metrics_log


def test_windows_are_averaged_and_written(tmp_path):
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=4, every=2, step_flops=1e9,
                                  show_progress=False)
  assert log.log_step(1, {"loss": jnp.asarray(1.0)}, samples=8) is None
  row = log.log_step(2, {"loss": jnp.asarray(3.0)}, samples=8)
  assert row["loss"] == 2.0
  assert row["samples_per_s"] == pytest.approx(8 * row["steps_per_s"])
  assert row["tflops_per_device"] > 0
  log.log_images(2, "grid", np.zeros((8, 8, 3)), path=str(tmp_path / "g" / "grid.png"))
  log.close()
  assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
  assert os.path.exists(tmp_path / "g" / "grid.png")


def test_a_non_finite_value_is_written_without_tensorboardx_s_warning(tmp_path, caplog):
  # A diverged run printed tensorboardX's "NaN or Inf found in input tensor." before its own
  # error line (checkpoint.NonFiniteLoss), which names the step and the metric.
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=1, every=1, show_progress=False)
  with caplog.at_level("WARNING"):
    row = log.log_step(1, {"loss": jnp.asarray(jnp.nan)}, samples=8)
  log.close()
  assert np.isnan(row["loss"]) and not caplog.records
  assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))


def test_a_window_keeps_its_extremes(tmp_path):
  # RL's ratio_max_last was averaged over the window: a one-step spike did not show.
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=3, every=3, tensorboard=False,
                                  show_progress=False)
  for step, (ratio_max, ratio_min, loss) in enumerate([(1.0, 0.99, 1.0), (1.5, 0.9, 2.0),
                                                        (1.1, 0.95, 3.0)], start=1):
    row = log.log_step(step, {"ratio_max_last": jnp.asarray(ratio_max),
                              "ratio_min_last": jnp.asarray(ratio_min),
                              "advantage_abs_max": jnp.asarray(loss), "loss": jnp.asarray(loss)},
                       samples=8)
  log.close()
  assert row["ratio_max_last"] == 1.5 and row["ratio_min_last"] == pytest.approx(0.9)
  assert row["advantage_abs_max"] == 3.0 and row["loss"] == 2.0


def test_model_flops_give_mfu_against_the_peak(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics_log, "peak_flops", lambda: 1e12)  # as on a known accelerator
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=2, every=2, tensorboard=False,
                                  show_progress=False)
  log.log_step(1, {"loss": jnp.asarray(1.0)}, samples=8, model_flops=2e12)
  row = log.log_step(2, {"loss": jnp.asarray(1.0)}, samples=8, model_flops=4e12)
  log.close()
  assert row["model_tflops_per_step"] == pytest.approx(3.0)
  seconds = 1 / row["steps_per_s"]
  assert row["mfu"] == pytest.approx(3e12 / seconds / (jax.device_count() * 1e12))
  assert "compiled_util" not in row  # no compiled figure given


def test_compiled_flops_from_cost_analysis():
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  flops = metrics_log.compiled_flops(compiled)
  assert flops is not None and abs(flops - 2 * 64 * 32 * 16) / (2 * 64 * 32 * 16) < 0.1


def test_peak_table_knows_accelerators_not_cpu():
  assert metrics_log.peak_flops(jax.devices("cpu")[0]) is None
  class Fake:
    device_kind = "TPU v5 lite"
  assert metrics_log.peak_flops(Fake()) == 197e12


def test_titled_grid_scales_the_cells_under_their_titles():
  black, white = np.zeros((64, 48, 3), np.uint8), np.full((64, 48, 3), 255, np.uint8)
  out = metrics_log.titled_grid([[black], [white]], ["left", "right"])
  plain = (metrics_log.image_grid([[black], [white]]) * 255).round().astype(np.uint8)
  header = out.shape[0] - 3 * plain.shape[0]  # 64-pixel cells: 3x, to 192 >= 160
  np.testing.assert_array_equal(out[header:], plain.repeat(3, 0).repeat(3, 1))
  assert out.shape[1] == 3 * plain.shape[1] and (out[:header] < 100).any()  # the titles


def test_a_titled_grid_s_heading_goes_above_its_titles_and_fits_its_width():
  black, white = np.zeros((64, 48, 3), np.uint8), np.full((64, 48, 3), 255, np.uint8)
  plain = metrics_log.titled_grid([[black], [white]], ["left", "right"])
  for heading in ("fog s5", "robust_r1_pipeline 100%: the first 3 of 256 images"):
    out = metrics_log.titled_grid([[black], [white]], ["left", "right"], heading=heading)
    above = out.shape[0] - plain.shape[0]
    assert out.shape[1] == plain.shape[1] and above > 10
    np.testing.assert_array_equal(out[above:], plain)  # the titles and cells as without
    assert (out[:above] < 100).any()
    assert (out[:above, -2:] > 200).all()  # shrunk to fit, not cut at the right edge


def test_image_grid_layout():
  a = np.zeros((2, 4, 5, 3), np.uint8)
  b = np.full((2, 4, 5, 3), 255, np.uint8)
  grid = metrics_log.image_grid([a, b], pad=1)
  assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
  assert grid[1, 1, 0] == 0.0 and grid[1, 7, 0] == 1.0
  # Images of other sizes sit top-left in cells of the largest, white around them.
  small = [np.zeros((2, 3, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)]
  grid = metrics_log.image_grid([small, [np.zeros((4, 5, 3))] * 2], pad=1)
  assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
  assert grid[1:3, 1:4].max() == 0.0 and grid[3, 1, 0] == 1.0 and grid[1, 4, 0] == 1.0
  assert grid[6:10, 1:6].max() == 0.0


def test_read_rows_keeps_each_steps_last_row_and_skips_a_cut_line(tmp_path):
  # A run logged steps 10 and 20 and evaluated at 20, was killed after its checkpoint at 10
  # (mid-line), and resumed: steps 20 and its evaluation logged again.
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "eval": True, "x": 1},
          {"step": 20, "loss": 1.5}, {"step": 20, "eval": True, "x": 2}, {"step": 30, "loss": 1.0}]
  path.write_text("\n".join(json.dumps(r) for r in rows[:3]) + '\n{"step": 30, "lo')
  # The resumed run's logger starts its rows on a line of their own.
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=30, every=10, start_step=10,
                                  tensorboard=False, show_progress=False)
  with open(path, "a") as f:  # the resumed rows, as the logger writes them
    f.write("".join(json.dumps(r) + "\n" for r in rows[3:]))
  log.close()
  assert metrics_log.read_rows(str(path)) == [rows[0], rows[3], rows[4], rows[5]]


def test_a_resumed_run_leaves_one_row_a_step(tmp_path):
  # A helper's run killed after step 9 and resumed from its checkpoint at 8 logged step 9 twice
  # (8, 9, 9, 10 ...): each reader of the file had to know to keep the last row.
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": float(s)} for s in range(1, 10)] + [{"step": 8, "eval": True}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "lo')
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=12, every=1, start_step=8,
                                  tensorboard=False, show_progress=False)
  log.log_step(9, {"loss": jnp.asarray(-9.0)}, samples=1)
  log.close()
  written = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r["step"], r.get("eval", False)) for r in written] == [
      *((s, False) for s in range(1, 9)), (8, True), (9, False)]
  assert written[-1]["loss"] == -9.0 and not (tmp_path / "metrics.jsonl.tmp").exists()


def test_the_last_step_is_written_whatever_the_cadence(tmp_path):
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=5, every=2, tensorboard=False,
                                  show_progress=False)
  written = [log.log_step(s, {"loss": jnp.asarray(float(s))}, samples=1) for s in range(1, 6)]
  log.close()
  assert [row["step"] for row in metrics_log.read_rows(str(tmp_path / "metrics.jsonl"))] == [
      2, 4, 5]
  assert written[4]["loss"] == 5.0  # the last window: step 5 alone


def test_packed_rows_count_the_samples_they_hold(tmp_path):
  # 8 rows a step, packing 13 and then 19 samples: 16 samples a step, not 8.
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=2, every=2, tensorboard=False,
                                  show_progress=False)
  log.log_step(1, {"loss": jnp.asarray(1.0)}, samples=8, process_samples=13)
  row = log.log_step(2, {"loss": jnp.asarray(1.0)}, samples=8, process_samples=19)
  log.close()
  assert row["samples_per_s"] == pytest.approx(16 * row["steps_per_s"])


def test_processes_reading_one_data_shard_count_its_rows_once(tmp_path, monkeypatch):
  # Two processes whose devices share the batch rows (mesh.tensor over both) count the same 13
  # packed samples and 2e12 FLOPs: the step did that work once.
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(metrics_log.multihost_utils, "process_allgather",
                      lambda x: np.stack([x, x]))
  rows = {}
  for replicas in (1, 2):
    (tmp_path / str(replicas)).mkdir()
    log = metrics_log.MetricsLogger(str(tmp_path / str(replicas)), total_steps=1, every=1,
                                    tensorboard=False, show_progress=False, replicas=replicas)
    rows[replicas] = log.log_step(1, {"loss": jnp.asarray(1.0)}, samples=8, process_samples=13,
                                  model_flops=2e12)
    log.close()
  assert rows[2]["model_tflops_per_step"] == pytest.approx(2.0)
  assert rows[1]["model_tflops_per_step"] == pytest.approx(4.0)  # two shards of the batch
  assert rows[2]["samples_per_s"] == pytest.approx(13 * rows[2]["steps_per_s"])


def test_a_resumed_run_writes_the_window_an_uninterrupted_one_would(tmp_path):
  # Windows of 4 steps; a checkpoint at step 3 keeps steps 1-3's metrics for the resumed run.
  def run(workdir, steps, start=0, pending=()):
    log = metrics_log.MetricsLogger(str(workdir), total_steps=8, every=4, start_step=start,
                                    tensorboard=False, show_progress=False, pending=pending)
    for s in steps:
      log.log_step(s, {"loss": jnp.asarray(float(s * s))}, samples=1)
    log.close()
    return log

  (tmp_path / "straight").mkdir()
  (tmp_path / "resumed").mkdir()
  run(tmp_path / "straight", range(1, 9))
  stopped = run(tmp_path / "resumed", range(1, 4))
  assert stopped.pending() == [{"loss": 1.0}, {"loss": 4.0}, {"loss": 9.0}]
  run(tmp_path / "resumed", range(4, 9), start=3, pending=stopped.pending())
  assert (metrics_log.read_rows(str(tmp_path / "resumed" / "metrics.jsonl"))[0]["loss"]
          == metrics_log.read_rows(str(tmp_path / "straight" / "metrics.jsonl"))[0]["loss"]
          == 7.5)


def test_kept_steps_of_another_version_average_what_they_share(tmp_path):
  # Kept by an older version: no grad_norm yet, and a metric this step no longer logs.
  log = metrics_log.MetricsLogger(str(tmp_path), total_steps=2, every=2, start_step=1,
                                  tensorboard=False, show_progress=False,
                                  pending=[{"loss": 1.0, "gone": 5.0}])
  row = log.log_step(2, {"loss": jnp.asarray(3.0), "grad_norm": jnp.asarray(0.5)}, samples=1)
  log.close()
  assert (row["loss"], row["grad_norm"]) == (2.0, 0.5) and "gone" not in row


def test_kept_steps_average_as_the_uninterrupted_run_does(tmp_path):
  # float32 metrics, kept as JSON floats: the window's mean must stay float32's, not float64's.
  values = np.random.default_rng(0).random((50, 3)).astype(np.float32)
  for n, steps in enumerate(values):
    rows = []
    for kept in (0, 2):
      workdir = tmp_path / f"{n}_{kept}"
      workdir.mkdir()
      log = metrics_log.MetricsLogger(str(workdir), total_steps=3, every=3, start_step=kept,
                                      tensorboard=False, show_progress=False,
                                      pending=[{"loss": float(v)} for v in steps[:kept]])
      for s in range(kept + 1, 4):
        row = log.log_step(s, {"loss": jnp.asarray(steps[s - 1])}, samples=1)
      log.close()
      rows.append(row["loss"])
    assert rows[0] == rows[1], steps
