"""One evaluation run from a config (`configs/eval.py`): models loaded, conditions evaluated, the
report written. The `evaluate` entry module and the demo's last stage call `run`. A stopped run
resumes: each finished unit (a condition, the clean images, a compared model's condition) is kept
in the report folder until the report is written (eval/partial.py)."""

from __future__ import annotations

import collections
import glob
import itertools
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

from robust_u1_jax import config_lib, files, signals
from robust_u1_jax.data import sources_vqa
from robust_u1_jax.eval import evaluation, figures, partial, report, tables
from robust_u1_jax.inference import engine as engine_lib
from robust_u1_jax.inference import images as images_lib
from robust_u1_jax.inference import recovery as recovery_lib


# The Robust-R1 pipeline's intensities a benchmark's questions are answered at (and clean).
BENCHMARK_CONDITIONS = evaluation.conditions(("25%", "50%", "100%"), (), ())
# A benchmark's rows per unit of work (each intensity, and the clean images): what a stop loses at
# most. A 7B model's unit of 256 rows is minutes; a whole table's (MMStar: 1,500) was hours.
BENCHMARK_UNIT_ROWS = 256


def _clip_similarity(c: ml_collections.ConfigDict):
  if not c.clip_checkpoint:
    return None
  from flax import nnx

  from robust_u1_jax.training import rl

  graphdef, state = rl.load_clip_tower(ml_collections.ConfigDict(
      {"clip_checkpoint": c.clip_checkpoint, "clip_model": c.clip_model}), prefix="")
  return evaluation.clip_similarity_fn(nnx.merge(graphdef, state))


def _evaluator(engine, c, clip_similarity, model: str) -> evaluation.Evaluator:
  """`model`'s evaluator: its own guidance unless the config gives the scales."""
  guidance = recovery_lib.Guidance.of_model(engine_lib.resolve_model_dir(model), c.cfg_text,
                                            c.cfg_img)
  return evaluation.Evaluator(engine, recovery_steps=c.recovery_steps, batch_size=c.batch_size,
                              max_new_tokens=c.max_new_tokens, seed=c.seed, guidance=guidance,
                              clip_similarity=clip_similarity)


def fingerprint(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """What an evaluation's results depend on: its config (not where the report goes; each path as
  the absolute path it names, so `runs/x` and `$PWD/runs/x` are one evaluation), the files of the
  models, the CLIP checkpoint and the benchmark tables it reads, and this package's code."""
  absolute = lambda path: os.path.realpath(path) if path else path
  model_path = lambda path: absolute(engine_lib.resolve_model_dir(path)) if path else path
  models = [c.model] + [path for path in c.compare.values() if path]
  table_files = [file for path in c.benchmarks.values() if path for file in (
      sorted(glob.glob(path, recursive=True)) if sources_vqa.is_pattern(path) else [path])]
  paths = [model_path(m) for m in models] + [
      absolute(path) for path in [c.clip_checkpoint, *table_files] if path]
  # Not max_skip_ratio: raised after a stop on a bad table, it keeps the finished units.
  config = {k: v for k, v in c.to_dict().items() if k not in ("out", "max_skip_ratio")}
  config.update(model=model_path(c.model), clip_checkpoint=absolute(c.clip_checkpoint),
                rl_workdir=absolute(c.rl_workdir),
                compare={k: model_path(v) for k, v in c.compare.items()},
                benchmarks={k: absolute(v) for k, v in c.benchmarks.items()})
  return {"config": config, "files": files.files_fingerprint(paths), "code": files.code_digest()}


def differences(kept: Mapping[str, Any], own: Mapping[str, Any], at_most: int = 3) -> str:
  """What differs between two evaluations' fingerprints, in words: the config fields (with both
  values), the files (added, removed, or of another size or time), the code."""
  own = json.loads(json.dumps(own, default=str))  # as it was kept: tuples as lists
  old, new, fields = _config_changes(kept, own)
  said = [f"config field {k} {old.get(k)!r} -> {new.get(k)!r}" for k in fields[:at_most]]
  old_files = {path: rest for path, *rest in kept.get("files", [])}
  new_files = {path: rest for path, *rest in own["files"]}
  changed = sorted(p for p in old_files.keys() | new_files.keys()
                   if old_files.get(p) != new_files.get(p))

  def change(path: str) -> str:  # a file one evaluation reads and the other does not is no loss
    if path not in old_files:
      return "read by this evaluation only"
    if path not in new_files:
      return "read by the other evaluation only" if os.path.exists(path) else "gone"
    return "of another size or modification time"

  said += [f"file {p} {change(p)}" for p in changed[:at_most]]
  more = max(len(fields) - at_most, 0) + max(len(changed) - at_most, 0)
  if kept.get("code") != own["code"]:
    said.append("this package's code")
  return "; ".join(said) + (f"; and {more} more" if more else "")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {prefix + k: v})
  return out


UNSTAMPED = "unstamped"  # partial.stamp's digests are hex: no evaluation's stamp reads so


def report_dir(c: ml_collections.ConfigDict) -> str:
  """Where the report goes: `c.out`, else `eval` beside the model."""
  return c.out or os.path.join(os.path.dirname(os.path.abspath(c.model.rstrip("/"))), "eval")


def report_is_current(c: ml_collections.ConfigDict) -> bool:
  """Whether the report folder holds this very evaluation's report: the same config and the same
  model, CLIP and benchmark files (`fingerprint`, as the kept units of a stopped run), its
  report.md beside it (report.write writes the JSON last)."""
  written = _report_stamp(report_dir(c))
  return written is not None and written == partial.stamp(fingerprint(c))


def other_evaluation(c: ml_collections.ConfigDict) -> str | None:
  """What the report folder holds of another evaluation (other models, files, settings or code),
  which running `c` there would replace, with what differs: its finished report, or the units a
  stopped one kept; None when it holds neither (or only this evaluation's, which `c` completes
  or writes again)."""
  out_dir = report_dir(c)
  kept = {"the report of another evaluation": (_report_stamp(out_dir), _report_fingerprint),
          "the units another, stopped evaluation kept": (partial.kept_stamp(out_dir),
                                                         partial.kept_fingerprint)}
  if all(stamp is None for stamp, _ in kept.values()):
    return None  # the fingerprint reads every model file's size and time: only when needed
  own = fingerprint(c)
  for what, (stamp, read) in kept.items():
    if stamp not in (None, partial.stamp(own)):
      theirs = read(out_dir)
      if not theirs:  # an older version's, which kept its stamp alone
        return f"{what} (other models, files, settings or code)"
      own = json.loads(json.dumps(own, default=str))  # as it was kept: tuples as lists
      said = f"{what}, which differs in: {differences(theirs, own) or 'its stamp'}"
      return said + (f" ({TABLES_ALONE})" if _tables_added(theirs, own) else "")
  return None


# Scoring tables added to a finished evaluation without evaluating its images and tables again.
TABLES_ALONE = ("a table added: evaluated alone into another --out, with --config.num_samples=0 "
                "and only the new --config.benchmarks.*, nothing is evaluated twice")


def _tables_added(kept: Mapping[str, Any], own: Mapping[str, Any]) -> bool:
  """Whether `own` differs from the `kept` evaluation only in tables it adds (same code)."""
  old, _, fields = _config_changes(kept, own)
  return (kept.get("code") == own["code"] and bool(fields)
          and all(k.startswith("benchmarks.") and not old.get(k) for k in fields))


def _config_changes(kept: Mapping[str, Any], own: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
  """(kept's config fields, own's, the sorted names of those that differ), flat ('a.b')."""
  old, new = _flat(kept.get("config", {})), _flat(own["config"])
  return old, new, sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _report_stamp(out_dir: str) -> str | None:
  """The stamp of the finished report in `out_dir` (its report.md there), None if it has none.
  A report.json that names no stamp (an older version's report, or a damaged one) is `UNSTAMPED`:
  no evaluation's own, so another's as far as anyone can tell. None without report.json: a
  write cut short between report.md and report.json (written last), whose units are kept."""
  json_path = os.path.join(out_dir, "report.json")
  if not (os.path.isfile(os.path.join(out_dir, "report.md")) and os.path.isfile(json_path)):
    return None
  try:
    with open(json_path) as f:
      stamp = json.load(f)["settings"]["stamp"]
  except (OSError, ValueError, KeyError, TypeError):
    return UNSTAMPED
  return stamp if isinstance(stamp, str) else UNSTAMPED


def _report_fingerprint(out_dir: str) -> Any | None:
  try:
    with open(os.path.join(out_dir, "report.json")) as f:
      return json.load(f)["settings"].get("fingerprint")
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return None


def run(c: ml_collections.ConfigDict, *, say: Callable[[str], None] = print) -> str:
  """Evaluates `c.model`; returns the path of report.md (in `c.out`). Stopped (Ctrl-C or SIGTERM),
  it says what it keeps for the same command to resume from."""
  progress: dict[str, Any] = {}  # the store of finished units and their count, once known
  try:
    with signals.sigterm_stops():
      return _run(c, say, progress)
  except KeyboardInterrupt:  # signals.Terminated too
    store = progress.get("store")
    if store is None or not len(store):
      say("the evaluation stopped before its first unit finished; run the same command to start "
          "it again")
    else:
      say(f"the evaluation stopped: {len(store)} of its {progress['units']} units kept in "
          f"{store.folder}; run the same command to resume")
      out_dir = os.path.dirname(store.folder)
      if _report_stamp(out_dir) not in (None, store.stamp):  # it would look finished
        say(f"  {os.path.join(out_dir, 'report.md')} is an earlier evaluation's, of other "
            "models, settings or code, until this one finishes")
    raise


def _run(c: ml_collections.ConfigDict, say: Callable[[str], None],
         progress_of: dict[str, Any]) -> str:
  t0 = time.perf_counter()
  out_dir = report_dir(c)
  # The RL run's rewards, for their figure, read first: a wrong rl_workdir stops the run now.
  rl_rewards = (figures.reward_rows(os.path.join(c.rl_workdir, "metrics.jsonl"))
                if c.rl_workdir else [])
  if c.rl_workdir and not rl_rewards:
    raise config_lib.ConfigError(f"rl_workdir {c.rl_workdir}: no RL rewards logged in its "
                                 "metrics.jsonl; give the RL stage's workdir, or leave it empty")
  # The benchmark tables' rows, the CLIP checkpoint and the model first: one that does not load
  # stops the run before it writes anything (not hours later, at the benchmarks). Each table's
  # images are decoded here once more than its benchmark needs; its bad rows are logged here.
  table_paths = {name: path for name, path in c.benchmarks.items() if path}
  try:  # the model's resize rules; a model that cannot be read fails to load below
    rules = images_lib.ImageRules.for_model_dir(engine_lib.resolve_model_dir(c.model))
  except (OSError, ValueError):
    rules = None
  table_units = 0
  for name, path in table_paths.items():
    sizes = collections.Counter()
    read = tables.read_table(path, c.benchmark_samples, c.max_skip_ratio, rules=rules,
                             images=c.benchmark_images,
                             keep=lambda i, record, image: sizes.update([image.shape[:2]]))
    table_units += -(-(read["rows"] - read["bad_rows"]) // BENCHMARK_UNIT_ROWS)
    if len(sizes) > 1:  # each compiles the model's programs: minutes each for a 7B model
      say(f"benchmark {name}: {sum(sizes.values())} images in {len(sizes)} sizes at the model's "
          "resize rule, each size compiling its own programs (--config.benchmark_images=square: "
          "one size)")
  clip_similarity = _clip_similarity(c)
  engine = engine_lib.Engine.load(c.model, dtype=c.dtype)
  compared = {name: path for name, path in c.compare.items() if path}
  # A bootstrap part's model (the demo's vae or vit) recovers and answers noise: said, not scored
  # as if it had been trained to.
  notes = [note for note in (recovery_lib.untrained_note(engine_lib.resolve_model_dir(path))
                             for path in [c.model, *compared.values()]) if note]
  for note in notes:
    say(note)
  os.makedirs(out_dir, exist_ok=True)
  own = fingerprint(c)
  store = progress_of["store"] = partial.PartialResults(out_dir, own)
  evaluator = _evaluator(engine, c, clip_similarity, c.model)
  # The claims read a few figures, which can afford more questions than the 15 conditions (one
  # figure on 64 questions is uncertain by about 6 points); the other conditions take the first
  # num_samples of them. num_samples = 0: the benchmark tables alone.
  world = c.num_samples > 0
  claim_samples = (evaluation.shapes_samples(c.split, max(c.claim_samples, c.num_samples),
                                             engine.rules, c.seed) if world else [])
  samples = claim_samples[:c.num_samples]
  conds = evaluation.conditions(c.intensities, c.imagenet_c_types, c.severities,
                                c.robust_r1_types) if world else []
  pipeline = [k for k in conds if k.family == evaluation.PIPELINE]
  if world:
    say(f"evaluating {c.model}: {_count(len(samples), 'sample')} x "
        f"{_count(len(conds) - len(pipeline), 'condition')}; {len(claim_samples)} for the clean "
        f"images and {_count(len(pipeline), 'pipeline condition')}"
        + (f"; the recoveries of {', '.join(compared)} too" if compared else ""))
  else:
    say(f"evaluating {c.model} on {_count(len(table_paths), 'benchmark table')} alone (num_samples "
        "= 0: not on the built-in world)")
  units = progress_of["units"] = (
      (len(conds) * (1 + len(compared)) + 2 + bool(c.recovery_on_clean)) * world
      + table_units * (len(BENCHMARK_CONDITIONS) + 1))
  kept = len(store)
  if kept:
    say(f"  resuming a stopped evaluation: {kept} of its {units} units kept in {store.folder}")
  done = itertools.count(1)
  progress = lambda label: say(f"  [{next(done)}/{units}] {label} "
                               f"({(time.perf_counter() - t0) / 60:.1f} min so far)")

  result, compare, by_type = {}, {}, {}
  if world:
    result = _evaluate_model(evaluator, c, claim_samples, samples, conds, progress, store)
    if compared:
      compare, by_type = _compare_models(compared, c, clip_similarity, samples, conds, result,
                                         progress, store)
  benchmarks = {}
  for name, path in table_paths.items():
    say(f"  benchmark {name}: {path}")
    benchmarks[name] = _benchmark(evaluator, name, path, c, engine.rules, progress, store,
                                  out_dir)

  claim_rows = report.claims(result, compare) if world else []
  names = figures.figures(result, out_dir, compare_by_type=by_type or None,
                          rl_rewards=rl_rewards, benchmarks=benchmarks)
  # The guidance the model's recoveries used (cfg_text / cfg_img unset stand for the model's own).
  guidance = evaluator.sampler.guidance
  settings = {**c.to_dict(), "guidance": {"text_scale": guidance.text_scale,
                                          "image_scale": guidance.image_scale},
              # this run's: a resumed one read `units_kept` of its units from the stopped one
              "seconds": round(time.perf_counter() - t0, 1), "units_kept": kept,
              "stamp": store.stamp,  # what `report_is_current` compares
              "fingerprint": own,  # what a refusal of another evaluation names
              # Another CPU may round floats differently and train another model (docs/DEMO.md).
              "machine": machine(), "code": code_version()}
  path = report.write(out_dir, result, title=f"Evaluation of {c.model}", settings=settings,
                      claim_rows=claim_rows, figure_names=names, benchmarks=benchmarks,
                      notes=notes)
  store.remove()  # the report holds everything now
  for row in claim_rows:
    bound = f" (with a perfect recovery: {row['bound']})" if row["bound"] else ""
    say(f"  {'holds' if row['holds'] else 'FAILS'}{report.margin_words(row)}: {row['claim']}: "
        f"{row['measured']}{bound}")
  say(f"report: {path}")
  return path


def machine() -> dict[str, str]:
  """The host's processor and the devices the evaluation ran on."""
  import jax

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      info = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in f if ":" in line)}  # every core alike
  except OSError:
    info = {}
  cpu = info.get("model name", cpu)
  flags = info.get("flags", "").split()
  # The vector instructions XLA:CPU compiles for, which decide how it rounds.
  vectors = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"))
                  if flag in flags), None)
  devices = jax.devices()
  # The cores the process may run on (taskset pins it), which XLA:CPU splits its work over.
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cores = (f"{usable} cores" if usable == os.cpu_count() else
           f"{usable} of its {os.cpu_count()} cores")
  return {"cpu": f"{cpu}{f' ({vectors})' if vectors else ''}, {cores}",
          "jax": jax.__version__,
          "devices": f"{len(devices)} x {devices[0].device_kind}"}


def code_version() -> str:
  """This package's version, with its git commit when it runs from a checkout."""
  import robust_u1_jax

  version = f"robust_u1_jax {robust_u1_jax.__version__}"
  try:
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
        cwd=os.path.dirname(os.path.abspath(robust_u1_jax.__file__)), check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return version
  return f"{version} (commit {commit})" if commit else version


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _evaluate_model(evaluator: evaluation.Evaluator, c: ml_collections.ConfigDict,
                    claim_samples, samples, conds, progress, store) -> dict[str, Any]:
  """The evaluated model's result: every condition in every mode (the pipeline's on the claims'
  samples), the VAE's round trip and the clean images' answers, with recovery on too."""
  pipeline = [k for k in conds if k.family == evaluation.PIPELINE]
  result = evaluator.evaluate(claim_samples, pipeline, modes=evaluation.MODES[1:],
                              progress=progress, store=store)
  others = evaluator.evaluate(samples, [k for k in conds if k not in pipeline],
                              modes=evaluation.MODES[1:], progress=progress, store=store)
  result["conditions"] += others["conditions"]
  result["examples"] += others["examples"]
  result["num_samples"] = len(samples)
  result["num_claim_samples"] = len(claim_samples)
  clean = np.stack([s.image for s in claim_samples])
  result["vae_round_trip"] = store.get_or_compute(
      "the VAE's round trip of the clean images", lambda: evaluator.round_trip(clean), progress)
  result["clean"] = store.get_or_compute("clean images", lambda: evaluator.clean(claim_samples),
                                         progress)
  if c.recovery_on_clean:
    on = store.get_or_compute("clean images, recovery on",
                              lambda: evaluator.clean(claim_samples, recovery=True), progress)
    result["clean_with_recovery"] = {
        "accuracy": on["accuracy"], "by_kind": on["by_kind"],
        "minus_off_se": evaluation.paired_se([a["correct"] for a in on["answers"]],
                                             [a["correct"] for a in result["clean"]["answers"]])}
  return result


def _compare_models(compared: dict[str, str], c: ml_collections.ConfigDict, clip_similarity,
                    samples, conds, result: dict[str, Any], progress, store
                    ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
  """The recoveries of the `compared` models (name -> path) under every condition: (their mean
  metrics, their SSIM per condition); RL against SFT goes into `result` when both are there."""
  compare, by_type, rows_of = {}, {}, {}
  for name, path in compared.items():
    other = _evaluator(engine_lib.Engine.load(path, dtype=c.dtype), c, clip_similarity, path)
    rows = other.evaluate(samples, conds, modes=(), per_sample=True, vae_baseline=False,
                          progress=progress, store=store, unit_prefix=f"{name}: ")["conditions"]
    rows_of[name] = rows
    compare[name] = {m: float(v.mean()) for m, v in evaluation.sample_means(rows).items()}
    by_type[name] = {r["label"]: r["recovered"]["ssim"] for r in rows}
    del other  # before the next model loads: one compared model in memory at a time (7B ones)
  if {"sft", "rl"} <= set(rows_of):
    rl, sft = rows_of["rl"], rows_of["sft"]
    result["rl_minus_sft_se"] = {m: d["se"] for m, d in evaluation.rl_minus_sft(rl, sft).items()}
    result["rl_minus_sft_by_condition"] = {
        r["label"]: evaluation.rl_minus_sft([r], [s]) for r, s in zip(rl, sft)}
    # The paper compares RL with SFT on the Robust-R1 validation set: the pipeline's corruptions,
    # the ones RL trains on, where the claims' 15 conditions are mostly ImageNet-C types.
    on_pipeline = lambda rows: [r for r in rows if r["family"] == evaluation.PIPELINE]
    if on_pipeline(rl):
      result["rl_minus_sft_pipeline"] = evaluation.rl_minus_sft(on_pipeline(rl),
                                                                on_pipeline(sft))
  return compare, by_type


def _benchmark(evaluator: evaluation.Evaluator, name: str, path: str,
               c: ml_collections.ConfigDict, rules, progress, store, out_dir: str
               ) -> dict[str, Any]:
  """One benchmark table's accuracy per mode and per category, clean and at each of
  BENCHMARK_CONDITIONS, in units of at most BENCHMARK_UNIT_ROWS rows per intensity; every answer
  written to `<out_dir>/answers_<name>.jsonl`."""
  # Its bad rows were logged when the run started (`run`).
  bench_samples, read = tables.table_samples(path, c.benchmark_samples, rules,
                                             c.max_skip_ratio, log=False,
                                             images=c.benchmark_images)
  answers = {("clean image", "clean"): []}
  answers.update({(k.level, mode): [] for k in BENCHMARK_CONDITIONS
                  for mode in evaluation.MODES[1:]})
  n = len(bench_samples)
  for start in range(0, n, BENCHMARK_UNIT_ROWS):
    part = bench_samples[start:start + BENCHMARK_UNIT_ROWS]
    span = f"rows {start + 1}-{start + len(part)} of {n}, " if n > BENCHMARK_UNIT_ROWS else ""
    prefix = f"benchmark {name}: {span}"
    # Answers only: no VAE baseline, whose round trips and grid images no benchmark reports.
    bench = evaluator.evaluate(part, BENCHMARK_CONDITIONS, modes=evaluation.MODES[1:],
                               progress=progress, store=store, unit_prefix=prefix,
                               per_sample=True, vae_baseline=False)
    clean = store.get_or_compute(prefix + "clean images", lambda: evaluator.clean(part),
                                 progress)
    answers["clean image", "clean"] += clean["answers"]
    for r in bench["conditions"]:
      for mode, given in r["answers"].items():
        answers[r["level"], mode] += given
  accuracy, by_category = {}, {}
  for (level, mode), given in answers.items():
    accuracy.setdefault(level, {})[mode] = evaluation.accuracy(given)
    by_category.setdefault(level, {})[mode] = evaluation.accuracy_by_kind(given)
  # Corrupted + recovered against corrupted only, paired over the table's questions.
  correct = lambda level, mode: [a["correct"] for a in answers[level, mode]]
  gain_se = {k.level: evaluation.paired_se(correct(k.level, "corrupted+recovered"),
                                           correct(k.level, "corrupted"))
             for k in BENCHMARK_CONDITIONS}
  answers_file = f"answers_{name}.jsonl"
  report.write_answers(os.path.join(out_dir, answers_file), bench_samples, answers)
  # A score near chance, or one of a model that named no option, reads apart from these: chance
  # over the multiple-choice rows where a table mixes them with open ones (RealWorldQA).
  chosen = [a for rows in answers.values() for a in rows if a["options"]]
  clean_answers = answers["clean image", "clean"]
  multiple_choice = [a for a in clean_answers if a["options"]]
  return {"path": path, "samples": n, **read, "modes": list(evaluation.MODES),
          "accuracy": accuracy, "gain_se": gain_se, "by_category": by_category,
          "answers": answers_file,
          "chance": report.chance_rate(multiple_choice),
          "chance_rows": [len(multiple_choice), len(clean_answers)],
          "no_option": [sum(not a["answer"] for a in chosen), len(chosen)]}


