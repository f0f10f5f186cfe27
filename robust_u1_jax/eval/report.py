"""The evaluation report: report.json (every number) and report.md (tables and the paper's claims
in miniature, each with its measured margin); its PNG figures are `figures.py`'s."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from robust_u1_jax import config_lib, files
from robust_u1_jax.eval import evaluation


def _pct(x: float) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _percent(x: float) -> str:
  """An accuracy in a sentence: '34.0 %' (`_pct` is a table cell's, under a % heading)."""
  text = _pct(x)
  return text if text == "n/a" else f"{text} %"


def _signed(d: float, digits: int) -> str:
  """A difference at `digits` decimals, or in exponent form where those would show it as zero
  (a claim that holds on +0.00002 must not read +0.0000)."""
  return f"{d:+.1e}" if d and abs(d) < 0.5 * 10 ** -digits else f"{d:+.{digits}f}"


def _pm(se: float | None, scale: float = 1.0, digits: int = 1) -> str:
  """' ± se' (scaled) where a standard error was measured, in exponent form where `digits`
  decimals would show it as zero."""
  return "" if se is None or math.isnan(se) else f" ± {_signed(scale * se, digits)[1:]}"


def _margin(beyond: float, se: float | None) -> float | None:
  """How many standard errors a difference lies `beyond` a claim's line (negative: short of it);
  None without a standard error."""
  return None if se is None or not se > 0 else float(beyond / se)


def claims(result: Mapping[str, Any], compare: Mapping[str, Mapping[str, Any]] | None = None
           ) -> list[dict[str, Any]]:
  """The paper's claims in miniature, each {'claim', 'measured', 'holds', 'margin_se', 'bound'};
  never tuned on. 'measured' states each difference with its standard error (± one, paired over
  the same samples) where the result has one; 'holds' compares the difference itself;
  'margin_se' says how many of those standard errors it lies beyond the claim's line (negative:
  short of it; None without one): under 2, another draw of as many samples could turn the
  verdict. 'bound' (may be empty) is what the model reaches with a perfect recovery, measured in
  the same run: where a claim fails, whether the recovery or the model's reading is short."""
  out = []
  pipeline = [c for c in result["conditions"] if c["family"] == evaluation.PIPELINE]
  round_trip = result.get("vae_round_trip")
  for c in pipeline:
    gain = {m: c["recovered"][m] - c["corrupted"][m] for m in ("ssim", "psnr")}
    se = c.get("gain_se", {})
    measured = (f"SSIM {c['corrupted']['ssim']:.3f} -> {c['recovered']['ssim']:.3f} "
                f"({gain['ssim']:+.3f}{_pm(se.get('ssim'), digits=3)}), "
                f"PSNR {c['corrupted']['psnr']:.2f} -> {c['recovered']['psnr']:.2f} dB "
                f"({gain['psnr']:+.2f}{_pm(se.get('psnr'), digits=2)})")
    if "through_vae" in c:
      # Doing nothing in the recovery's own output space: what restoration adds beyond the VAE.
      vae, vae_se = c["through_vae"], c["beyond_vae_se"]
      measured += (f"; the corrupted image through the VAE alone: SSIM {vae['ssim']:.3f}, PSNR "
                   f"{vae['psnr']:.2f} dB, the recovery "
                   f"{c['recovered']['ssim'] - vae['ssim']:+.3f}"
                   f"{_pm(vae_se.get('ssim'), digits=3)}, "
                   f"{c['recovered']['psnr'] - vae['psnr']:+.2f}"
                   f"{_pm(vae_se.get('psnr'), digits=2)} dB beyond it")
    # Read by no claim, stated beside: through the VAE a recovery can lose CLIP similarity
    # where it gains SSIM and PSNR.
    if "clip" in c["recovered"]:
      measured += (f"; CLIP similarity {c['corrupted']['clip']:.3f} -> "
                   f"{c['recovered']['clip']:.3f} (read by no claim)")
    margins = [_margin(gain[m], se.get(m)) for m in ("ssim", "psnr")]
    out.append({"claim": f"recovery beats the corrupted image at {c['level']} (SSIM and PSNR "
                         "both)",
                "measured": measured,
                "holds": bool(gain["ssim"] > 0 and gain["psnr"] > 0),
                "margin_se": None if None in margins else min(margins),
                "bound": (f"the VAE's round trip of the clean image: SSIM "
                          f"{round_trip['ssim']:.3f}, PSNR {round_trip['psnr']:.2f} dB"
                          if round_trip else "")})
  full = [c for c in pipeline if c["level"] == "100%"]
  if full and "corrupted+recovered" in full[0]["accuracy"]:
    acc = full[0]["accuracy"]
    gain = acc["corrupted+recovered"] - acc["corrupted"]
    bound = []
    if "oracle_accuracy" in full[0]:
      oracle = full[0]["oracle_accuracy"]
      bound.append(f"the clean image in the recovery's place: {_percent(oracle)} "
                   f"({100 * (oracle - acc['corrupted']):+.1f} points)")
    if "clean" in result:
      bound.append(f"the clean image alone: {_percent(result['clean']['accuracy'])}")
    se = full[0].get("gain_se", {}).get("accuracy")
    out.append({"claim": "at 100 % intensity, corrupted + recovered answers >= 10 points above "
                         "corrupted only",
                "measured": f"{_percent(acc['corrupted'])} -> "
                            f"{_percent(acc['corrupted+recovered'])} "
                            f"({100 * gain:+.1f}{_pm(se, 100)} points)",
                "holds": bool(gain >= 0.10), "margin_se": _margin(gain - 0.10, se),
                "bound": "; ".join(bound)})
  if compare and {"sft", "rl"} <= set(compare):
    for metric in ("ssim", "clip"):
      sft, rl = compare["sft"].get(metric), compare["rl"].get(metric)
      if sft is not None and rl is not None:
        se = result.get("rl_minus_sft_se", {}).get(metric)
        # The comparison recovers the first num_samples images of every condition.
        measured = (f"{result['num_samples']} images, each the mean of its "
                    f"{len(result['conditions'])} conditions: " if "num_samples" in result
                    else "")
        measured += f"SFT {sft:.4f}, RL {rl:.4f} ({_signed(rl - sft, 4)}{_pm(se, digits=4)})"
        pipe = result.get("rl_minus_sft_pipeline", {}).get(metric)
        if pipe:  # stated beside the claim, which reads every condition
          measured += (f"; on the Robust-R1 pipeline's conditions alone (the corruptions RL "
                       f"trains on, as the paper's Robust-R1 validation set): SFT "
                       f"{pipe['sft']:.4f}, RL {pipe['rl']:.4f} "
                       f"({_signed(pipe['rl'] - pipe['sft'], 4)}{_pm(pipe['se'], digits=4)})")
        out.append({"claim": f"RL's mean {metric.upper()} above SFT's", "measured": measured,
                    "holds": bool(rl > sft), "margin_se": _margin(rl - sft, se), "bound": ""})
  if "clean_with_recovery" in result and "clean" in result:
    off, on = result["clean"]["accuracy"], result["clean_with_recovery"]["accuracy"]
    se = result["clean_with_recovery"].get("minus_off_se")
    out.append({"claim": "recovery always on keeps clean accuracy within 2 points",
                "measured": f"off {_percent(off)}, on {_percent(on)} "
                            f"({100 * (on - off):+.1f}{_pm(se, 100)} points)",
                "holds": bool(abs(on - off) <= 0.02),
                "margin_se": _margin(0.02 - abs(on - off), se), "bound": ""})
  return out


def margin_words(claim: Mapping[str, Any]) -> str:
  """' (0.7 standard errors clear)' or ' (3.4 standard errors short)': how far the difference
  lies from the claim's line; '' without a standard error."""
  margin = claim.get("margin_se")
  if margin is None:
    return ""
  return f" ({abs(margin):.1f} standard errors {'clear' if margin >= 0 else 'short'})"


def _verdict(claim: Mapping[str, Any]) -> str:
  return ("yes" if claim["holds"] else "**no**") + margin_words(claim)


def benchmark_figure_name(name: str) -> str:
  return f"benchmark_{name}.png"


def _columns_line(metrics: Sequence[tuple[str, int]], modes: Sequence[str]) -> str:
  """What the per-condition table's columns measure."""
  meaning = {"psnr": "PSNR (dB)", "ssim": "SSIM",
             "clip": "CLIP (the cosine similarity of the evaluation's CLIP image embeddings)"}
  modes_meaning = {"corrupted": "the corrupted image alone",
                   "corrupted+recovered": "the corrupted image and, after the question, the "
                                          "model's recovery (Robust-U1's layout)",
                   "recovered": "the recovery alone"}
  line = ("Columns: " + ", ".join(meaning[m] for m, _ in metrics)
          + " of each image to its clean one, averaged over the condition's images")
  if modes:
    line += ("; answer accuracy (acc.) from " + "; ".join(
        f"{m}: {modes_meaning[m]}" for m in modes if m in modes_meaning))
  return line + "."


def chance_rate(answers: Sequence[Mapping[str, Any]]) -> float | None:
  """The accuracy of a random option per question; None with open questions (or none)."""
  options = [a.get("options", 0) for a in answers]
  return float(np.mean([1 / n for n in options])) if options and all(options) else None


def _chance(answers: Sequence[Mapping[str, Any]]) -> str:
  """`chance_rate` as a table cell: a percentage, '-' for open questions."""
  rate = chance_rate(answers)
  return "-" if rate is None else _pct(rate)


def _accuracy_cell(row: Mapping[str, Any], mode: str) -> str:
  """A condition's accuracy in `mode`; corrupted+recovered's with its gain over corrupted only
  and that gain's paired standard error: on a condition's few questions a gain of several points
  can be the draw of the questions alone."""
  accuracy = row["accuracy"]
  cell = _pct(accuracy[mode])
  if mode != "corrupted+recovered" or "corrupted" not in accuracy:
    return cell
  gain = 100 * (accuracy[mode] - accuracy["corrupted"])
  return f"{cell} ({gain:+.1f}{_pm(row.get('gain_se', {}).get('accuracy'), 100)})"


def by_kind_table(result: Mapping[str, Any], modes: Sequence[str]) -> list[str]:
  """Markdown lines: accuracy per question kind on clean images and, per mode, its mean over
  the conditions: which kinds the model reads from the image at all, and which a recovery
  gives back."""
  if "by_kind" not in result.get("clean", {}):
    return []
  clean = result["clean"]["by_kind"]
  answers = result["clean"]["answers"]
  counts = {k: str(sum(a["kind"] == k for a in answers)) for k in clean}
  more_clean = len(answers) > result["num_samples"]  # the other conditions' are the first
  if more_clean:
    counts = {k: f"{n} / {sum(a['kind'] == k for a in answers[:result['num_samples']])}"
              for k, n in counts.items()}
  conds = [c for c in result["conditions"] if c.get("by_kind")]
  questions = ("questions (clean and pipeline / other conditions)" if more_clean
               else "questions")
  lines = ["", "## Per question kind", "",
           "Accuracy (%) on clean images, and per mode its mean over the conditions above. "
           "Chance: what guessing an option at random scores on the same questions (a kind at "
           "chance on clean images is one the model does not read from the image)."
           + (" The modes' means weigh each condition alike, the pipeline's on more questions "
              "than the others: a cell of few questions moves by several points a question."
              if more_clean else ""), "",
           f"| kind | {questions} | chance | clean |" + "".join(f" {m} |" for m in modes),
           "|" + " --- |" * (len(modes) + 4)]
  for kind, acc in clean.items():
    cells = [kind, counts[kind], _chance([a for a in answers if a["kind"] == kind]), _pct(acc)]
    for m in modes:  # a kind may be missing from the conditions on fewer samples
      accs = [c["by_kind"][m][kind] for c in conds if kind in c["by_kind"].get(m, {})]
      cells.append(_pct(float(np.mean(accs))) if accs else "-")
    lines.append("| " + " | ".join(cells) + " |")
  counts = [c["no_option"][m] for c in conds if "no_option" in c for m in modes
            if m in c["no_option"]]
  lines += ["", "Replies naming no option (scored wrong): "
            f"{sum(not a['answer'] for a in answers)} of {len(answers)} on clean images"
            + (f", {sum(n for n, _ in counts)} of {sum(k for _, k in counts)} under the conditions "
               "(every mode)" if counts else "") + "."]
  return lines


def rl_minus_sft_table(result: Mapping[str, Any]) -> list[str]:
  """Markdown lines: RL's recoveries against SFT's per condition, paired over the samples."""
  difference = result.get("rl_minus_sft_by_condition")
  if not difference:
    return []
  metrics = [m for m in ("psnr", "ssim", "clip") if m in next(iter(difference.values()))]
  digits = {"psnr": 2, "ssim": 4, "clip": 4}
  lines = ["", "## RL against SFT per condition", "",
           f"RL's recovery minus SFT's on the first {result['num_samples']} images of every "
           "condition (the pipeline's too), ± one standard error paired over the same samples "
           "(the claims average each sample over the conditions first).", "",
           "| condition | " + " | ".join(f"{m.upper()} RL - SFT" for m in metrics) + " |",
           "|" + " --- |" * (len(metrics) + 1)]
  for label in in_condition_order(result, difference):
    pairs = difference[label]
    # The error in exponent form too where its decimals would read 0.00 (it was unreadable).
    cells = [_signed(pairs[m]["rl"] - pairs[m]["sft"], digits[m])
             + _pm(pairs[m]["se"], digits=digits[m]) for m in metrics]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def in_condition_order(result: Mapping[str, Any], labels) -> list[str]:
  """`labels` in the per-condition table's order (any it lacks after them, sorted)."""
  labels = set(labels)
  order = [c["label"] for c in result.get("conditions", []) if c["label"] in labels]
  return order + sorted(labels - set(order))


# The benchmarks' levels (run.BENCHMARK_CONDITIONS): "25 / 50 / 100 % intensity (I = 0.23 /
# 0.45 / 0.9 at all four stages)".
_INTENSITIES = (" / ".join(k.rstrip("%") for k in config_lib.EVAL_INTENSITIES)
                + " % intensity (I = "
                + " / ".join(f"{v:g}" for v in config_lib.EVAL_INTENSITIES.values())
                + " at all four stages)")


def bad_rows_line(bench: Mapping[str, Any]) -> str:
  """What of a benchmark table was scored: the rows read, and the bad ones left out."""
  line = f"Scored {bench['samples']} of the {bench['rows']} rows read from `{bench['path']}`"
  if bench.get("table_rows", bench["rows"]) > bench["rows"]:
    line += f" (the first of its {bench['table_rows']}: --config.benchmark_samples)"
  if not bench["bad_rows"]:
    return line + "."
  named = "; ".join(reason for _, reason in bench["bad"])  # each reason names its row
  more = bench["bad_rows"] - len(bench["bad"])
  return (f"{line}; {bench['bad_rows']} bad row(s) left out: {named}"
          + (f"; {more} more in the log" if more else "") + ".")


def category_table(bench: Mapping[str, Any]) -> list[str]:
  """Markdown lines: a benchmark's accuracy per category (of two or more), clean and at each
  intensity corrupted only -> corrupted + recovered."""
  by_category = bench.get("by_category", {})
  clean = by_category.get("clean image", {}).get("clean", {})
  if len(clean) < 2:
    return []
  levels = [level for level in by_category if level != "clean image"]
  lines = ["", "Accuracy (%) per category: clean, then at each intensity corrupted only -> "
           "corrupted + recovered.", "",
           "| category | clean |" + "".join(f" {level} |" for level in levels),
           "|" + " --- |" * (len(levels) + 2)]
  for category, acc in clean.items():
    cells = [category or "(none)", _pct(acc)]
    for level in levels:
      modes = by_category[level]
      cells.append(f"{_pct(modes.get('corrupted', {}).get(category))} -> "
                   f"{_pct(modes.get('corrupted+recovered', {}).get(category))}")
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def benchmark_scoring_line(bench: Mapping[str, Any]) -> str:
  """How a benchmark's answers were scored, and what reads a score apart from chance."""
  line = f"Scored as VLMEvalKit reads replies, without its GPT judge: {SCORING}."
  if bench.get("chance") is not None:
    chosen, rows = bench.get("chance_rows") or (0, 0)
    of = f" on its {chosen} multiple-choice rows of {rows}" if chosen < rows else ""
    line += f" Chance (a random option){of}: {_percent(bench['chance'])}."
  missing, asked = bench.get("no_option") or (0, 0)
  if asked:
    line += (f" Replies naming no option (scored wrong): {missing} of {asked}, every mode and "
             "intensity.")
  return line


# How `evaluation.score` reads an answer, for the reports.
SCORING = ("a multiple-choice reply by the option letter it names (the answer field's letter, a "
           "letter it starts with, the one letter standing as a word of it, else the one option "
           "whose text it holds; options written into the question, as MMStar's and "
           "RealWorldQA's parquet tables write them, are its options, asked and scored), an open "
           "answer by exact match, lowercased and without punctuation")


def write_answers(path: str, samples: Sequence[Any], answers: Mapping[tuple[str, str], Any]
                  ) -> None:
  """Every answer of a benchmark table as JSON lines (whole or not at all): per intensity, mode and
  row, the question, its truth, the model's text, the answer read from it and the score.
  `answers`: {(intensity, mode): the answers of `samples`, in their order}."""
  with files.atomic_write(path, "w") as f:
    for (level, mode), rows in answers.items():
      for sample, a in zip(samples, rows, strict=True):
        q = sample.question
        f.write(json.dumps({
            "row": sample.index, "id": q.get("id"), "category": sample.kind,
            "intensity": level, "mode": mode, "question": q["question"],
            "options": list(q.get("options") or ()), "truth": a["truth"],
            "answer": a["answer"], "correct": a["correct"], "text": a["text"]}) + "\n")


def write(out_dir: str, result: Mapping[str, Any], *, title: str,
          settings: Mapping[str, Any], claim_rows: Sequence[Mapping[str, Any]],
          figure_names: Sequence[str], benchmarks: Mapping[str, Any] | None = None,
          notes: Sequence[str] = ()) -> str:
  """report.md and report.json in `out_dir`, each whole or not at all (`files.atomic_write`), the
  JSON last: its settings' stamp says the report is finished (`run.report_is_current`); returns
  the markdown's path. `notes`: what a reader must know first (a model trained no recovery)."""
  os.makedirs(out_dir, exist_ok=True)
  lines = [f"# {title}", ""] + [f"**{note}**\n" for note in notes]
  lines += (_world_lines(result, claim_rows) if result else [
      "The benchmark tables alone (num_samples = 0): no image of the built-in world, so no claim "
      "of the paper's is read."])
  lines += benchmark_lines(benchmarks or {}, figure_names)
  figure_names = [n for n in figure_names if not n.startswith("benchmark_")]  # in their sections
  if figure_names:
    grids = sum(name.startswith("grid_") for name in figure_names)
    lines += ["", "## Figures", "", f"Image grids of the first {grids} conditions, left to right: "
              + " | ".join(evaluation.GRID_COLUMNS) + ".", ""]
    lines += [f"![{n}]({n})" for n in figure_names]
  lines += ["", "## Settings", ""]
  if settings.get("cfg_text", 0) is None or settings.get("cfg_img", 0) is None:
    lines += ["cfg_text / cfg_img null: the recoveries take the model's own guidance (its "
              "scales are the `guidance` field below).", ""]
  shown = {k: v for k, v in settings.items() if k != "fingerprint"}  # report.json keeps it all
  lines += ["```json", json.dumps(shown, indent=1, default=str),
            "```", ""]
  path = os.path.join(out_dir, "report.md")
  with files.atomic_write(path, "w") as f:
    f.write("\n".join(lines))
  public = {k: v for k, v in result.items() if k != "examples"}
  with files.atomic_write(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump({"notes": list(notes), "settings": dict(settings), "result": public,
               "claims": list(claim_rows),
               "benchmarks": benchmarks or {}}, f, indent=1, default=str)
  return path


def _world_lines(result: Mapping[str, Any], claim_rows: Sequence[Mapping[str, Any]]
                 ) -> list[str]:
  """The report's part on the built-in world: the claims, the conditions, the question kinds,
  RL against SFT."""
  n_claims = result.get("num_claim_samples", result["num_samples"])
  lines = [f"{result['num_samples']} held-out samples per condition"
           + (f", {n_claims} for the figures the claims read (the Robust-R1 pipeline's "
              "conditions and the clean images)." if n_claims != result["num_samples"]
              else "."), ""]
  if claim_rows:
    lines += ["## The paper's claims in miniature", "",
              "| claim | measured | holds | with a perfect recovery |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['claim']} | {c['measured']} | {_verdict(c)} | {c.get('bound') or '-'} |"
              for c in claim_rows]
    lines += ["", "In brackets: the difference, ± one standard error of it, paired over the same "
              "samples (the spread another draw of as many samples would show). A claim holds on "
              "the difference itself; beside the verdict, how many standard errors the difference "
              "lies from the claim's line (under 2: another draw of as many samples could give "
              "the other verdict).", ""]
  modes = [m for m in evaluation.MODES[1:]
           if result["conditions"] and m in result["conditions"][0]["accuracy"]]
  lines += ["## Per condition", ""]
  if "clean" in result:
    answers = result["clean"].get("answers", [])
    line = f"Accuracy on clean images: {_percent(result['clean']['accuracy'])}"
    if len(answers) > result["num_samples"]:  # the other conditions ask the first num_samples
      asked = [a["correct"] for a in answers[:result["num_samples"]]]
      line += (f" on the {len(answers)} questions of the claims and the pipeline's conditions, "
               f"{_percent(float(np.mean(asked)))} on the first {len(asked)}, which the other "
               "conditions ask")
    lines += [line + ".", ""]
  if not result["conditions"]:
    return lines + ["No corruption condition was evaluated (intensities, imagenet_c_types and "
                    "robust_r1_types all empty)."] + by_kind_table(result, modes)
  first = result["conditions"][0]
  shown = [k for k in ("corrupted", "through_vae", "recovered") if k in first]
  metrics = [(m, digits) for m, digits in (("psnr", 2), ("ssim", 3), ("clip", 3))
             if m in first.get("recovered", {})]
  names = {"corrupted": "corrupted", "through_vae": "through VAE", "recovered": "recovered"}
  head = ["condition"] + [f"{m.upper()} {names[k]}" for m, _ in metrics for k in shown]
  head += [f"acc. {m} (%)" for m in modes]
  lines += [_columns_line(metrics, modes), ""]
  if "through_vae" in shown:
    lines += ["Through VAE: the corrupted image encoded and decoded by the VAE alone, what a "
              "recovery that copies its input and restores nothing gives back.", ""]
  if "corrupted+recovered" in modes and "corrupted" in modes:
    lines += ["In brackets beside corrupted+recovered: its difference from corrupted only, ± one "
              "standard error paired over the condition's questions. The conditions other than "
              "the pipeline's ask the same questions, so their differences move together.", ""]
  lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for c in result["conditions"]:
    cells = [c["label"]] + [f"{c[k][m]:.{digits}f}" for m, digits in metrics for k in shown]
    cells += [_accuracy_cell(c, m) for m in modes]
    lines.append("| " + " | ".join(cells) + " |")
  lines += by_kind_table(result, modes)
  return lines + rl_minus_sft_table(result)


def benchmark_lines(benchmarks: Mapping[str, Any], figure_names: Sequence[str] = ()
                    ) -> list[str]:
  """The report's part on each benchmark table, its figure too where one was drawn."""
  lines = []
  for name, bench in benchmarks.items():
    lines += ["", f"## {name}", "", bad_rows_line(bench), "",
              "Accuracy (%) per answer mode, on the clean images and under the Robust-R1 pipeline "
              f"at {_INTENSITIES}; every answer "
              f"in `{bench['answers']}`.", "",
              "| intensity | " + " | ".join(bench["modes"]) + " |",
              "|" + " --- |" * (len(bench["modes"]) + 1)]
    for level, accs in bench["accuracy"].items():
      row = {"accuracy": {m: accs.get(m, float("nan")) for m in bench["modes"]},
             "gain_se": {"accuracy": bench.get("gain_se", {}).get(level)}}
      lines.append(f"| {level} | " + " | ".join(
          _accuracy_cell(row, m) if m in accs else "n/a" for m in bench["modes"]) + " |")
    lines += ["", "In brackets beside corrupted+recovered: its difference from corrupted only, ± "
              "one standard error paired over the table's questions.",
              "", benchmark_scoring_line(bench)]
    lines += category_table(bench)
    if benchmark_figure_name(name) in figure_names:
      lines += ["", f"![{name}]({benchmark_figure_name(name)})"]
  return lines
