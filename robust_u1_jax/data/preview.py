r"""Look at what a config feeds the model: a grid of clean / corrupted pairs, and one question.

  python -m robust_u1_jax.data.preview --config configs/sft.py:tiny --out grid.png [--rows 4]
  python -m robust_u1_jax.data.preview --config configs/reason.py:tiny \
      --config.init_from=random --config.data.corruption=imagenet_c --out grid.png

The images come from the configured pipeline (`make_pipeline(config.data, seed=config.seed,
stage=config.stage)`), so they are exactly what training reads first. Each cell shows the clean
image, the corrupted one, and below them the applied corruptions with their levels. Then one
question of the data with its target answer is printed (for sft/rl configs, from the same records
through the 'reason' stage; sources without questions say so). A bad config, a missing data path or
an unwritable --out is one `error:` line and exit status 2.
"""

from __future__ import annotations

from robust_u1_jax import cli  # first: its quiet environment is set before jax loads

import math
import sys
from collections.abc import Mapping, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from robust_u1_jax import config_inputs, config_lib
from robust_u1_jax.data import packing
from robust_u1_jax.data import pipeline, sources

PAD = 8  # around cells
GAP = 2  # between the clean and the corrupted tile of a cell
LINE_HEIGHT = 12  # PIL's default bitmap font is about 11 px tall
MIN_TILE = 128
QUESTION_SOURCES = ("shapes", "vqa_tsv", "vqa_parquet")  # sources whose records hold questions


def _define_flags() -> dict:
  # Defined when run as a program, so importing the drawing helpers (tests, notebooks, the
  # training loop's image logs) never collides with another entry module's --config / --out.
  return {
      "config": config_flags.DEFINE_config_file("config", None, "Stage config file[:variant].",
                                                lock_config=True),
      "out": flags.DEFINE_string("out", "preview.png", "Output PNG path."),
      "rows": flags.DEFINE_integer("rows", 4, "Rows of the grid."),
      "cols": flags.DEFINE_integer("cols", 4, "Clean/corrupted pairs per row."),
  }


def tile_size(image_hw: Sequence[int]) -> int:
  """Tile side: the image's longest side, scaled up by an integer factor to at least MIN_TILE."""
  side = int(max(image_hw))
  return side * max(1, math.ceil(MIN_TILE / side))


def grid_size(rows: int, cols: int, tile: int, label_lines: int) -> tuple[int, int]:
  """(width, height) in pixels of a grid drawn by `draw_grid`."""
  cell_w = 2 * tile + GAP
  cell_h = tile + label_lines * LINE_HEIGHT + 4
  return cols * cell_w + (cols + 1) * PAD, rows * cell_h + (rows + 1) * PAD


def label_lines(steps: str) -> list[str]:
  """'robust_r1/lens_blur(0.42)+robust_r1/jpeg_compression(0.10)' -> one short name a line."""
  return [s.split("/", 1)[-1] for s in str(steps).split("+")] if steps else ["none"]


def _fit(image: np.ndarray, tile: int) -> Image.Image:
  im = Image.fromarray(image)
  scale = tile / max(im.size)
  size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
  resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
  return im.resize(size, resample)


def draw_grid(samples: Sequence[Mapping[str, object]], rows: int, cols: int) -> Image.Image:
  """Samples {'clean', 'corrupted' (uint8 H x W x 3), 'corruption_steps'} -> labelled grid."""
  samples = list(samples)[:rows * cols]
  if not samples:
    raise ValueError("draw_grid: no samples to draw")
  tile = tile_size(max((s["clean"].shape[:2] for s in samples), key=max))
  labels = [label_lines(s["corruption_steps"]) for s in samples]
  n_lines = max(len(lines) for lines in labels)
  width, height = grid_size(rows, cols, tile, n_lines)
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  cell_h = tile + n_lines * LINE_HEIGHT + 4
  for k, (sample, lines) in enumerate(zip(samples, labels)):
    r, c = divmod(k, cols)
    x = PAD + c * (2 * tile + GAP + PAD)
    y = PAD + r * (cell_h + PAD)
    canvas.paste(_fit(sample["clean"], tile), (x, y))
    canvas.paste(_fit(sample["corrupted"], tile), (x + tile + GAP, y))
    for i, line in enumerate(lines):
      draw.text((x + 1, y + tile + 2 + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
  return canvas


def _unbatch(batch: Mapping[str, np.ndarray]) -> list[dict]:
  """Per-sample dicts of a batch, unpacked (packing.unpack_row) and cropped to each image."""
  if "segment_ids" in batch:  # packed rows
    return [s for r in range(len(batch["num_samples"]))
            for s in packing.unpack_row({k: v[r] for k, v in batch.items()})]
  samples = []
  for i in range(len(batch["index"])):
    sample = {k: v[i] for k, v in batch.items()}
    for key in ("clean", "corrupted"):
      h, w = batch[f"{key}_hw"][i]
      sample[key] = batch[key][i, :h, :w]
    samples.append(sample)
  return samples


def take_samples(p: pipeline.Pipeline, n: int) -> list[dict]:
  """The first `n` samples of a pipeline: 'clean', 'corrupted', 'corruption_steps', 'index'."""
  out = []
  while len(out) < n:
    for sample in _unbatch(next(p)):
      out.append({"clean": sample["clean"], "corrupted": sample["corrupted"],
                  "corruption_steps": str(sample["corruption_steps"]),
                  "index": int(sample["index"])})
  return out[:n]


def question_and_answer(config) -> tuple[str, str] | None:
  """(question, target answer) of the first sample the config's data gives, or None."""
  # A JSONL row holds a question where the config's stage answers (it requires one there).
  if config.data.source not in QUESTION_SOURCES and not (
      config.data.source == "jsonl" and config.stage in sources.ANSWERING_STAGES):
    return None
  stage = config.stage if config.stage in ("reason", "vqa") else "reason"
  p = pipeline.make_pipeline(config.data, seed=config.seed, stage=stage)
  try:
    first = _unbatch(next(p))[0]
  finally:
    p.close()
  return str(first["question_text"]), str(first["answer_text"])


def no_questions_line(config) -> str:
  """What the preview says where it shows no question."""
  if config.data.source == "jsonl":  # its rows may hold questions all the same
    return (f"the {config.stage} stage reads no question from jsonl records; the reason stage "
            "does (--config configs/reason.py:<variant> shows a row's question and answer)")
  return f"{config.data.source} records carry no questions"


def preview(config, out_path: str, rows: int, cols: int) -> tuple[Image.Image, tuple | None]:
  """Writes the grid to `out_path`; returns (grid, (question, answer) or None)."""
  if rows < 1 or cols < 1:
    raise ValueError(f"rows={rows}, cols={cols}: both must be >= 1")
  p = pipeline.make_pipeline(config.data, seed=config.seed, stage=config.stage or "sft")
  try:
    samples = take_samples(p, rows * cols)
  finally:
    p.close()
  if bad := p.tracker.summary():  # as training ends: its cells hold other records' copies
    print(f"{bad}; each took the place of a copy of another record, as in training",
          file=sys.stderr, flush=True)
  grid = draw_grid(samples, rows, cols)
  grid.save(out_path)
  return grid, question_and_answer(config)


def main(argv, flag_values: Mapping) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flag_values["config"].value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/sft.py:tiny")
  if "data" not in config:  # the eval and demo configs read their data otherwise
    raise app.UsageError(f"--config: stage {config.get('stage')!r} has no data pipeline to "
                         "preview; give a stage's (configs/sft.py, rl.py, reason.py)")
  config_lib.validate_data(config.data, "data")
  config_inputs.check_data_inputs(config.data, "data")
  try:  # the stage's own needs of the rows (RL's one size): the data is still worth a look
    config_inputs.check_data_rows(config)
  except config_lib.ConfigError as e:
    print(f"note: train would refuse this config: {e}", file=sys.stderr, flush=True)
  out, rows, cols = (flag_values[k].value for k in ("out", "rows", "cols"))
  if rows < 1 or cols < 1:
    raise app.UsageError(f"--rows {rows} --cols {cols}: both must be >= 1")
  cli.output_file(out, "--out", image=True)
  grid, qa = preview(config, out, rows, cols)
  if qa is None:
    print(no_questions_line(config))
  else:
    print(f"question:\n{qa[0]}\nanswer:\n{qa[1]}")
  # Last, where it is seen: the file written.
  pairs = rows * cols
  print(f"wrote {out} ({grid.width}x{grid.height}): {pairs} clean / corrupted "
        f"pair{'' if pairs == 1 else 's'} from {config.data.source} ({config.data.corruption})")
  return 0


if __name__ == "__main__":
  _flag_values = _define_flags()
  cli.run(lambda argv: main(argv, _flag_values))
