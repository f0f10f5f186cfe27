"""The data preview CLI: a labelled grid of clean / corrupted pairs and one question."""

import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from robust_u1_jax.data import preview

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_preview_cli_on_tiny_config(tmp_path):
  out = tmp_path / "grid.png"
  # A cheap corruption keeps the run short; everything else is the tiny config.
  cmd = [sys.executable, "-m", "robust_u1_jax.data.preview",
         "--config", os.path.join(ROOT, "configs", "sft.py") + ":tiny",
         "--config.data.corruption=gaussian_noise", "--out", str(out), "--rows", "2"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with Image.open(out) as im:
    assert im.format == "PNG" and im.mode == "RGB"
    # 64 x 64 shapes images drawn as 128-pixel tiles; one label line (a single corruption).
    assert im.size == preview.grid_size(rows=2, cols=4, tile=128, label_lines=1)
    grid = np.asarray(im)
  # The first cell holds a picture, not background.
  cell = grid[preview.PAD:preview.PAD + 128, preview.PAD:preview.PAD + 2 * 128]
  assert cell.std() > 5
  assert "question:" in result.stdout and "<ANSWER>" in result.stdout
  assert "Please restore this corrupted image" in result.stdout


def test_reasoning_rows_of_a_jsonl_show_their_question(tmp_path):
  # preview said "jsonl records carry no questions" of rows that hold one.
  import json

  from robust_u1_jax import config_lib

  rng = np.random.default_rng(0)
  for name in ("a.png", "b.png"):
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
  row = {"image": "a.png", "target_image": "b.png", "question": "Which colour is the disc?",
         "answer": "<ANSWER>A<ANSWER_END>", "options": ["red", "blue"]}
  (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
  config = config_lib.load(os.path.join(ROOT, "configs", "reason.py") + ":tiny", {
      "init_from": "random", "data.source": "jsonl", "data.path": str(tmp_path / "rows.jsonl"),
      "data.corruption": "none"})
  question, answer = preview.question_and_answer(config)
  # The row's options lettered as `answer --options` letters them (they were left out).
  from robust_u1_jax.data import answer_format
  assert question == answer_format.prompt("Which colour is the disc?", ["red", "blue"])
  assert answer == "<ANSWER>A<ANSWER_END>"
  # Through the SFT stage the same rows show no question: said of the stage, not of the rows.
  config = config_lib.load(os.path.join(ROOT, "configs", "sft.py") + ":tiny", {
      "init_from": "random", "data.source": "jsonl", "data.path": str(tmp_path / "rows.jsonl"),
      "data.corruption": "none"})
  assert preview.question_and_answer(config) is None
  assert preview.no_questions_line(config).startswith(
      "the sft stage reads no question from jsonl records; the reason stage does")


def test_draw_grid_labels_and_size():
  rng = np.random.default_rng(0)
  samples = [{"clean": rng.integers(0, 255, (48, 32, 3), dtype=np.uint8),
              "corrupted": np.zeros((48, 32, 3), np.uint8),
              "corruption_steps": "robust_r1/lens_blur(0.50)+robust_r1/scan_lines(0.10)"}
             for _ in range(3)]
  grid = preview.draw_grid(samples, rows=2, cols=2)
  tile = preview.tile_size((48, 32))
  assert tile == 144  # 48 scaled by 3
  assert grid.size == preview.grid_size(2, 2, tile, 2)
  assert preview.label_lines(samples[0]["corruption_steps"]) == ["lens_blur(0.50)",
                                                                 "scan_lines(0.10)"]
  pixels = np.asarray(grid)
  label_y = preview.PAD + tile + 2
  label = pixels[label_y:label_y + 2 * preview.LINE_HEIGHT, preview.PAD:preview.PAD + tile]
  assert (label < 128).any()  # text was drawn
  # The fourth cell is empty (three samples): background only.
  x4 = preview.PAD + (2 * tile + preview.GAP + preview.PAD)
  y4 = preview.PAD + (tile + 2 * preview.LINE_HEIGHT + 4 + preview.PAD)
  assert (pixels[y4:y4 + tile, x4:x4 + 2 * tile] == 255).all()


def test_a_config_training_would_refuse_is_previewed_with_a_note(tmp_path, monkeypatch, capsys):
  """RL on a folder of two model sizes: training refuses it at start; the preview drew it
  without a word, though its help says it shows what training reads."""
  import types

  from robust_u1_jax import config_lib

  (tmp_path / "mixed").mkdir()
  for name, size in (("a.png", (64, 64)), ("b.png", (64, 48))):
    Image.new("RGB", size).save(tmp_path / "mixed" / name)
  config = config_lib.load(os.path.join(ROOT, "configs", "rl.py") + ":tiny", {
      "init_from": "random", "data.source": "folder", "data.path": str(tmp_path / "mixed")})
  drawn = []
  monkeypatch.setattr(preview, "preview", lambda c, out, rows, cols: drawn.append(out) or (
      Image.new("RGB", (8, 8)), None))
  flag = lambda value: types.SimpleNamespace(value=value)
  out = str(tmp_path / "grid.png")
  assert preview.main(["preview"], {"config": flag(config), "out": flag(out), "rows": flag(1),
                                    "cols": flag(1)}) == 0
  assert drawn == [out]
  err = capsys.readouterr().err
  assert err.startswith("note: train would refuse this config: ") and "several model sizes" in err


def test_bad_records_in_the_preview_are_counted_at_its_end(tmp_path, capsys):
  """Its replacements are copies of other cells: said, as a training run's end says its bad
  records (a preview of few rows ended without a count)."""
  from robust_u1_jax import config_lib

  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  (tmp_path / "bad.png").write_text("text")
  config = config_lib.load(os.path.join(ROOT, "configs", "sft.py") + ":tiny", {
      "data.source": "folder", "data.path": str(tmp_path), "data.corruption": "gaussian_noise",
      "data.max_skip_ratio": 0.5})
  preview.preview(config, str(tmp_path / "grid.png"), 1, 6)
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert re.fullmatch(r"folder data \(sft\): \d+ of \d+ records read were unreadable or unusable "
                      r".*; each took the place of a copy of another record, as in training", last)
