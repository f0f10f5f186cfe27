"""What a training run reports: TensorBoard events, a summary line every N steps, a progress bar
with ETA, throughput and image grids at evaluation steps.

Throughput: samples/s (packed rows: the samples they hold); `model_tflops_per_step`, the
step's useful work (`flops.py`: each token through its own expert, the attention the mask allows,
the backward the trainable set needs) and `mfu`, that work per second against the devices' peak;
`tflops_per_device` and `compiled_util` from the compiled step's cost analysis, which counts
whatever the program computes (and each loop body, such as the layer scan, once), so it is a
check, not the utilisation.

Only process 0 writes; every process computes the same global metrics.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from robust_u1_jax import pixels, progress

# Dense bf16 peak FLOP/s per chip (vendor figures); MFU is reported only on these devices.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return flops
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a lowered or compiled jit function (whole program), if XLA says."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # Not every backend implements cost analysis.
    return None
  if isinstance(analysis, Sequence) and analysis:
    analysis = analysis[0]
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def read_rows(path: str) -> list[dict[str, Any]]:
  """A run's metrics.jsonl: its training rows and evaluation rows (`eval`: true) in step order.

  A resumed run drops the rows after its checkpoint before it logs those steps again (files of
  older versions kept both: each step's last row is the one read); a last line cut off by a
  kill is left out."""
  rows = {}
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows[row["step"], bool(row.get("eval"))] = row
  return [rows[key] for key in sorted(rows)]


def _keep_rows_up_to(path: str, step: int) -> None:
  """Leaves in the metrics.jsonl at `path` the whole rows of steps up to `step`: a run resumed
  from its checkpoint at `step` logs the steps after it again, and a killed run's last line may be
  cut. Rewritten through a temporary file, so an interruption leaves the old file or the new."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if line.endswith("\n") and isinstance(row, dict) and row.get("step", step + 1) <= step:
      kept.append(line)
  if kept != lines:
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def window_reduction(name: str) -> Callable[[Sequence[float]], float]:
  """How a logged row combines its window's steps for metric `name`: an extreme stays the
  window's extreme (`ratio_max_last`, `advantage_abs_max`: a one-step spike must show), the rest
  are averaged."""
  words = name.split("_")
  return np.max if "max" in words else np.min if "min" in words else np.mean


class MetricsLogger:
  """Accumulates step metrics and writes them out every `every` steps."""

  def __init__(self, workdir: str, *, total_steps: int, every: int, start_step: int = 0,
               tensorboard: bool = True, step_flops: float | None = None,
               show_progress: bool = True, replicas: int = 1,
               pending: Sequence[Mapping[str, float]] = ()):
    """`replicas`: the processes that read each data shard (a mesh axis other than the batch's
    spanning processes, say `mesh.tensor` over hosts); they count the same rows, once.
    `pending`: the metrics of the steps a checkpoint saved between two written windows
    (`pending()` then): the resumed run writes the window an uninterrupted one would."""
    self.every = every
    self.replicas = replicas
    self.total_steps = total_steps
    self.is_writer = jax.process_index() == 0
    self.writer = None
    if tensorboard and self.is_writer:
      from tensorboardX import SummaryWriter

      # A diverged run's NaN is written (TensorBoard draws it as a gap) and told by the run's own
      # error line (checkpoint.NonFiniteLoss); tensorboardX warned of each value before it.
      logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    # One JSON line per logged window: machine-readable history that survives restarts.
    self.jsonl = None
    if self.is_writer:
      path = os.path.join(workdir, "metrics.jsonl")
      _keep_rows_up_to(path, start_step)
      self.jsonl = open(path, "a")
    self.step_flops = step_flops
    self.peak = peak_flops()
    self.bar = progress.bar(total=total_steps, initial=start_step, dynamic_ncols=True,
                         disable=not (show_progress and self.is_writer), unit="step")
    # As float32, the steps' own dtype: the window's means round as an uninterrupted run's.
    self._window: list[Mapping[str, Any]] = [{k: np.float32(v) for k, v in m.items()}
                                              for m in pending]
    # Of this process's steps only: the counts and the clock are its own.
    self._counts: list[tuple[int | None, float | None]] = []
    self._t0 = time.perf_counter()
    self.history: list[dict[str, float]] = []

  def log_step(self, step: int, metrics: Mapping[str, jax.Array], *, samples: int,
               process_samples: int | None = None, model_flops: float | None = None
               ) -> dict[str, float] | None:
    """Records one step; every `every` steps, and at the run's last, writes the averaged window
    and returns it.

    `samples`: the step's samples over all processes. `process_samples`: this process's, where
    the count varies (packed rows hold as many samples as fit); the written window sums them
    over processes in place of `samples`. `model_flops`: the model FLOPs of this process's rows
    of the step (`flops.step_flops(...)['total']`); the written window sums them over processes.
    """
    self._window.append(metrics)
    self._counts.append((process_samples, model_flops))
    self.bar.update(1)
    if step % self.every and step != self.total_steps:  # the last window too, however short
      return None
    host = jax.device_get(self._window)
    # This step's metrics, each over the window's steps that have it (a resumed run's kept steps
    # may come from an older version's step).
    row = {k: float(window_reduction(k)([m[k] for m in host if k in m])) for k in host[-1]}
    seconds = (time.perf_counter() - self._t0) / len(self._counts)
    row["steps_per_s"] = 1.0 / seconds
    # Given on every step or never, the same on every process (the data and stage decide).
    counted = [all(c[i] is not None for c in self._counts) for i in (0, 1)]
    # Per step of this process: (samples, model FLOPs); each process counted its own rows.
    step_counts = np.mean([[c[i] or 0.0 for i in (0, 1)] for c in self._counts], axis=0)
    if jax.process_count() > 1 and any(counted):
      step_counts = np.sum(multihost_utils.process_allgather(step_counts.astype(np.float32)),
                           axis=0) / self.replicas
    row["samples_per_s"] = (float(step_counts[0]) if counted[0] else samples) / seconds
    if counted[1]:
      work = float(step_counts[1])
      row["model_tflops_per_step"] = work / 1e12
      if self.peak:
        row["mfu"] = work / seconds / (jax.device_count() * self.peak)
    if self.step_flops:
      per_device = self.step_flops / seconds / jax.device_count()
      row["tflops_per_device"] = per_device / 1e12
      if self.peak:
        row["compiled_util"] = per_device / self.peak
    self._window, self._counts, self._t0 = [], [], time.perf_counter()
    self.history.append({"step": step, **row})
    if self.is_writer:
      self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
      self.jsonl.flush()
      for k, v in row.items():
        if self.writer:
          self.writer.add_scalar(k, v, step)
      shown = "  ".join(f"{k}={v:.4g}" for k, v in row.items())
      self.bar.write(f"step {step}: {shown}")
      self.bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if "loss" in k})
    return row

  def pending(self) -> list[dict[str, float]]:
    """The recorded steps' metrics not yet written (for a checkpoint: `pending=` on resume)."""
    return [{k: float(v) for k, v in m.items()} for m in jax.device_get(self._window)]

  def log_eval(self, step: int, metrics: Mapping[str, float],
               columns: Mapping[str, Sequence[np.ndarray]], path: str):
    """Evaluation scalars (TensorBoard, metrics.jsonl, a summary line) and the grid of its image
    `columns` ({title: images}), drawn by the writing process only."""
    if not self.is_writer:
      return
    for k, v in metrics.items():
      if self.writer:
        self.writer.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({"step": step, "eval": True, **metrics}) + "\n")
    self.jsonl.flush()
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    self.bar.write(f"eval at step {step}: {shown}  grid: {path}")
    grid = titled_grid(list(columns.values()), list(columns))
    self.log_images(step, f"eval grid ({' | '.join(columns)})", grid, path)

  def log_images(self, step: int, name: str, grid_hwc: np.ndarray, path: str | None = None):
    """Writes an image grid (uint8 or [0, 1] float) to TensorBoard and optionally a PNG."""
    if not self.is_writer:
      return
    grid = np.asarray(grid_hwc)
    if grid.dtype != np.uint8:
      grid = pixels.to_uint8(grid)
    if self.writer:
      self.writer.add_image(name, grid, step, dataformats="HWC")
    if path:
      from PIL import Image

      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(grid).save(path)

  def close(self):
    self.bar.close()
    if self.jsonl:
      self.jsonl.close()
    if self.writer:
      self.writer.close()


def image_grid(columns: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
  """Rows of samples, one column per image kind (e.g. corrupted | recovered | clean).

  Images (uint8, or float in [0, 1]) may differ in size: each sits top-left in a cell of the
  largest; the rest of the grid is white.
  """
  cols = [[pixels.to_float(np.asarray(im)) for im in col] for col in columns]
  n = len(cols[0])
  h = max(im.shape[0] for col in cols for im in col)
  w = max(im.shape[1] for col in cols for im in col)
  grid = np.ones((n * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), np.float32)
  for j, col in enumerate(cols):
    for i, im in enumerate(col):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + im.shape[0], x:x + im.shape[1]] = np.clip(im, 0, 1)
  return grid


def titled_grid(columns: Sequence[Sequence[np.ndarray]], titles: Sequence[str], *,
                heading: str = "", pad: int = 2, min_cell: int = 160) -> np.ndarray:
  """`image_grid` under a header naming each column (and a `heading` line above, if given),
  scaled up (nearest, a whole factor) until a cell is at least `min_cell` pixels tall: the tiny
  world's 64-pixel images are too small to read beside a title. uint8 (H, W, 3)."""
  from PIL import Image, ImageDraw, ImageFont

  h = max(np.asarray(im).shape[0] for col in columns for im in col)
  w = max(np.asarray(im).shape[1] for col in columns for im in col)
  scale = max(1, -(-min_cell // h))
  grid = pixels.to_uint8(image_grid(columns, pad)).repeat(scale, 0).repeat(scale, 1)
  font = ImageFont.load_default(size=max(10, min(24, w * scale // 13)))  # 14 over 192 pixels
  line = int(font.size * 1.6)
  header = line * (2 if heading else 1)
  canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
  canvas.paste(Image.fromarray(grid), (0, header))
  draw = ImageDraw.Draw(canvas)
  if heading:  # in the column titles' size, smaller where it would not fit the width
    size = font.size
    while size > 8 and draw.textlength(heading, font=ImageFont.load_default(size=size)) > (
        canvas.width - 2 * pad * scale):
      size -= 1
    draw.text((pad * scale, line * 0.2), heading, fill="black",
              font=ImageFont.load_default(size=size))
  cell = (w + pad) * scale
  for j, title in enumerate(titles):
    width = draw.textlength(title, font=font)
    draw.text((pad * scale + j * cell + max(0, (w * scale - width) / 2), header - line * 0.8),
              title, fill="black", font=font)
  return np.asarray(canvas)
