"""The evaluation report's figures (matplotlib, no display needed): accuracy against intensity per
answer mode, SSIM per corruption type, SFT against RL, RL's rewards over its steps, each benchmark
table's accuracy, and the image grids (corrupted | through the VAE alone | recovered | clean)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from robust_u1_jax.eval import evaluation
from robust_u1_jax.eval.report import benchmark_figure_name, chance_rate, in_condition_order
from robust_u1_jax.training import metrics_log


GRIDS = 6  # conditions drawn as image grids, in the table's order
# The figures besides the grids (grid_NN_<condition>.png), named once: the earlier report's of
# these names that this one does not draw are removed.
FIGURES = ACCURACY_PLOT, SSIM_PER_TYPE, SSIM_SFT_VS_RL, RL_REWARDS = (
    "accuracy_vs_intensity.png", "ssim_per_type.png", "ssim_sft_vs_rl.png", "rl_rewards.png")


def reward_rows(rl_metrics: str) -> list[dict[str, Any]]:
  """The logged rows of an RL run's metrics.jsonl that carry its rewards (none: not an RL run's)."""
  if not os.path.isfile(rl_metrics):
    return []
  return [r for r in metrics_log.read_rows(rl_metrics) if "reward_total_mean" in r]


def figures(result: Mapping[str, Any], out_dir: str, *,
            compare_by_type: Mapping[str, Mapping[str, float]] | None = None,
            rl_rewards: Sequence[Mapping[str, Any]] = (),
            benchmarks: Mapping[str, Any] | None = None) -> list[str]:
  """Writes the report's figures (`rl_rewards`: `reward_rows` of the RL run; `benchmarks`: each
  table's accuracy against intensity, `benchmark_figure`); returns their file names. `result`
  may be empty (the benchmark tables alone)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
    plt.close(fig)
    written.append(name)

  conditions = result.get("conditions", [])
  pipeline = [c for c in conditions if c["family"] == evaluation.PIPELINE]
  if pipeline and pipeline[0]["accuracy"]:
    lines = [(mode, [c["accuracy"][mode] for c in pipeline], {})
             for mode in evaluation.MODES[1:] if mode in pipeline[0]["accuracy"]]
    if "oracle_accuracy" in pipeline[0]:
      lines.append((f"{evaluation.ORACLE} (a perfect recovery)",
                    [c["oracle_accuracy"] for c in pipeline], {"ls": ":", "color": "gray"}))
    # The pipeline's conditions ask the clean images' questions.
    clean = result.get("clean")
    fig = accuracy_plot(
        plt, [c["level"] for c in pipeline], lines, [c["num_samples"] for c in pipeline],
        clean=clean["accuracy"] if clean else None,
        chance=chance_rate(clean.get("answers", [])) if clean else None,
        title=f"Answer accuracy under the Robust-R1 pipeline ({pipeline[0]['num_samples']} "
              "questions a point)",
        xlabel="Robust-R1 pipeline intensity (bars: ± one binomial standard error of each "
               "point;\nthe report's differences are paired over the questions, with smaller "
               "errors)", size=(7.5, 3.6))
    save(fig, ACCURACY_PLOT)
  by_type = [c for c in conditions if c["family"] != evaluation.PIPELINE]
  if by_type:
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(by_type)), 3.8))
    x = np.arange(len(by_type))
    bars = [(k, label) for k, label in (("corrupted", "corrupted"),
                                        ("through_vae", "corrupted, through the VAE alone"),
                                        ("recovered", "recovered")) if k in by_type[0]]
    width = 0.8 / len(bars)
    for j, (key, label) in enumerate(bars):
      ax.bar(x + (j - (len(bars) - 1) / 2) * width, [c[key]["ssim"] for c in by_type], width,
             label=label)
    ax.set_xticks(x, [c["label"] for c in by_type], rotation=70, fontsize=8)
    if "vae_round_trip" in result:  # what nothing decoded by the VAE gets past
      ax.axhline(result["vae_round_trip"]["ssim"], color="gray", ls="--", lw=0.8,
                 label="the clean image through the VAE")
    ax.set_ylabel("SSIM to the clean image")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    ax.set_title(f"Recovery per condition besides the Robust-R1 pipeline's "
                 f"({by_type[0]['num_samples']} images each)", fontsize=10, pad=36)
    save(fig, SSIM_PER_TYPE)
  if compare_by_type:
    labels = in_condition_order(result, set().union(*[set(v) for v in compare_by_type.values()]))
    # Below the two models' SSIM, RL's difference from SFT per condition: the bars above differ
    # by thousandths, which only the difference and its error show.
    difference = result.get("rl_minus_sft_by_condition")
    fig, axes = plt.subplots(2 if difference else 1, 1, sharex=True, squeeze=False,
                             figsize=(max(6, 0.35 * len(labels)), 6.4 if difference else 3.8))
    ax = axes[0, 0]
    x = np.arange(len(labels))
    width = 0.8 / len(compare_by_type)
    for k, (name, values) in enumerate(compare_by_type.items()):
      ax.bar(x + (k - (len(compare_by_type) - 1) / 2) * width,
             [values.get(lab, np.nan) for lab in labels], width, label=name.upper())
    ax.set_ylabel("SSIM of the recovery")
    ax.set_title(f"The SFT and RL stages' recoveries per condition (the first "
                 f"{result['num_samples']} images of each)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    if difference:
      ax = axes[1, 0]
      metrics = [m for m in ("ssim", "clip") if m in next(iter(difference.values()))]
      for k, metric in enumerate(metrics):
        pairs = [difference[lab][metric] if lab in difference else None for lab in labels]
        ax.errorbar(x + 0.15 * (k - (len(metrics) - 1) / 2),
                    [p["rl"] - p["sft"] if p else np.nan for p in pairs],
                    yerr=[p["se"] if p else np.nan for p in pairs], fmt="o", capsize=3,
                    label=f"{metric.upper()}, RL - SFT", color=f"C{k + 2}")
      ax.axhline(0.0, color="gray", lw=0.8)
      ax.set_ylabel("RL - SFT (± one standard error)")
      ax.legend(fontsize=8)
    ax.set_xticks(x, labels, rotation=70, fontsize=8)
    save(fig, SSIM_SFT_VS_RL)
  if rl_rewards:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [r["step"] for r in rl_rewards]
    for key in sorted(k for k in rl_rewards[0] if k.startswith("reward_") and k.endswith("_mean")):
      mean = np.array([r.get(key, np.nan) for r in rl_rewards])
      line, = ax.plot(steps, mean, label=key[len("reward_"):-len("_mean")])
      spread = key[:-len("_mean")] + "_std"  # over a step's rollouts, what GRPO's groups compare
      if spread in rl_rewards[0]:
        std = np.array([r.get(spread, np.nan) for r in rl_rewards])
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_title("The RL stage's rewards (total: the others weighted by rl.reward_weights)",
                 fontsize=9)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward of the rollouts (± their std)")
    ax.legend(fontsize=8)
    save(fig, RL_REWARDS)
  for name, bench in (benchmarks or {}).items():
    save(benchmark_figure(name, bench, plt), benchmark_figure_name(name))
  rows = {row["label"]: row for row in conditions}
  for k, (label, columns) in enumerate(result.get("examples", [])[:GRIDS]):
    grid = metrics_log.titled_grid([list(column) for column in columns],
                                   evaluation.GRID_COLUMNS, heading=grid_heading(rows[label]))
    name = f"grid_{k:02d}_{label.replace(' ', '_').replace('%', 'pct')}.png"
    Image.fromarray(grid).save(os.path.join(out_dir, name))
    written.append(name)
  _remove_earlier_figures(out_dir, written)
  return written


def benchmark_figure(name: str, bench: Mapping[str, Any], plt):
  """A benchmark table's accuracy against the pipeline's intensity per answer mode, beside its
  clean images' and chance: what its table says, at a glance."""
  levels = [level for level in bench["accuracy"] if level != "clean image"]
  lines = [(mode, [bench["accuracy"][level][mode] for level in levels], {})
           for mode in evaluation.MODES[1:] if mode in bench["accuracy"][levels[0]]]
  return accuracy_plot(
      plt, levels, lines, [bench["samples"]] * len(levels),
      clean=bench["accuracy"]["clean image"]["clean"], chance=bench.get("chance"),
      title=f"{name}: {bench['samples']} questions a point",
      xlabel="Robust-R1 pipeline intensity (bars: ± one binomial standard error)",
      size=(6.5, 3.4))


def accuracy_plot(plt, levels: Sequence[str], lines, questions: Sequence[int], *,
                  clean: float | None, chance: float | None, title: str, xlabel: str,
                  size: tuple[float, float]):
  """Accuracy against intensity: `lines` of (label, accuracy per level, line style), each point
  with one binomial standard error over its `questions`, beside the clean images' accuracy and
  chance (None: not drawn)."""
  fig, ax = plt.subplots(figsize=size)
  x = np.arange(len(levels), dtype=float)
  for k, (label, acc, style) in enumerate(lines):
    # Bars: one binomial standard error; the lines sit side by side so the bars stay apart.
    se = [math.sqrt(a * (1 - a) / max(n, 1)) for a, n in zip(acc, questions)]
    ax.errorbar(x + 0.06 * (k - (len(lines) - 1) / 2), [100 * a for a in acc],
                yerr=[100 * e for e in se], marker="o", capsize=3, label=label, **style)
  if clean is not None:
    ax.axhline(100 * clean, color="gray", ls="--", label="clean image")
  if chance is not None:
    ax.axhline(100 * chance, color="black", lw=0.8, ls="-.", label="chance (a random option)")
  ax.set_xticks(x, levels)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.set_ylabel("answer accuracy (%)")
  # No negative accuracies, and at least 10 points of axis: a model that answers nothing right
  # drew its line at 0 on an axis of -0.05 to 0.05 %.
  low, high = ax.get_ylim()
  low = max(0.0, low)
  ax.set_ylim(low, max(high, low + 10.0))
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # off the lines
  return fig


def _remove_earlier_figures(out_dir: str, written: Sequence[str]) -> None:
  """Removes the figures an earlier report in `out_dir` drew that this one did not (another
  evaluation's grid conditions, a comparison it no longer makes), which would read as this
  report's beside it."""
  for name in os.listdir(out_dir):
    ours = name in FIGURES or re.fullmatch(r"(grid_\d{2}_|benchmark_).*\.png", name)
    if ours and name not in written:
      os.remove(os.path.join(out_dir, name))


def grid_heading(row: Mapping[str, Any]) -> str:
  """What a condition's grid shows, written above it: the grids are read apart from the report."""
  parts = [(part, name) for part, name in (("corrupted", "corrupted"),
                                           ("through_vae", "VAE alone"), ("recovered", "recovered"))
           if part in row]
  ssim = ", ".join(f"{row[part]['ssim']:.2f} {name}" for part, name in parts)
  psnr = " / ".join(f"{row[part]['psnr']:.1f}" for part, _ in parts)
  n = row["num_samples"]
  shown = f"the first {evaluation.GRID_ROWS} of {n} images" if n > evaluation.GRID_ROWS else (
      "its one image" if n == 1 else f"all {n} images")
  return f"{row['label']}: {shown}; mean SSIM {ssim}; PSNR {psnr} dB"
