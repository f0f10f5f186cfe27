"""Evaluation: the report of a tiny random model (every number finite, claims stated), scoring,
conditions, and benchmark tables read from VLMEvalKit TSV and parquet files."""

import base64
import csv
import io
import json
import os
import re
import shutil
import signal
import time
import types

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from robust_u1_jax import cli, config_inputs, config_lib, files
from robust_u1_jax.checkpoints import orbax_io
from robust_u1_jax.data import answer_format, bad_records
from robust_u1_jax.data import sequence
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.eval import evaluation, figures, partial, report, tables
from robust_u1_jax.eval import run as eval_run
from robust_u1_jax.inference import engine as engine_lib
from robust_u1_jax.inference import images
from robust_u1_jax.inference import recovery
from robust_u1_jax.models import bagel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = (64, 64)  # the built-in world's image size, at the test model's rules


@pytest.fixture(scope="module")
def model_dir(random_bagel, tmp_path_factory):
  tok = tokenizer_lib.load_tokenizer()
  path = str(tmp_path_factory.mktemp("eval") / "model")
  orbax_io.save_orbax(random_bagel(bagel.BagelConfig.tiny(vocab_size=len(tok))), path,
                      tokenizer_dir=tokenizer_lib.default_tokenizer_dir())
  images.ImageRules(64, 32, 16, 64, 32, 8).save(path)
  return path


def _png(seed: int, size=(40, 56)) -> bytes:
  pixels = (np.random.default_rng(seed).uniform(size=size + (3,)) * 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _benchmarks(tmp_path, bad_images=0):
  """A 3-row TSV (then `bad_images` rows whose image is not one) and a 2-row parquet table, of
  images of the world's size: no programs of another size to compile."""
  tsv = tmp_path / "rbench.tsv"
  with open(tsv, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "image", "question", "A", "B", "answer", "category"])
    for i in range(3 + bad_images):
      image = _png(i, WORLD) if i < 3 else b"GIF89a" + bytes(100)  # cut short
      w.writerow([i, base64.b64encode(image).decode(), f"Is it {i}?", "yes", "no", "A", "mcq"])
  parquet = tmp_path / "mmstar.parquet"
  pq.write_table(pa.table({"image": [{"bytes": _png(10 + i, WORLD), "path": f"{i}.png"}
                                     for i in range(2)],
                           "question": ["Which?", "What?"], "options": [["x", "y", "z"]] * 2,
                           "answer": ["B", "C"]}), parquet)
  return str(tsv), str(parquet)


def _eval_config():
  import importlib.util

  spec = importlib.util.spec_from_file_location("eval_cfg", os.path.join(ROOT, "configs",
                                                                          "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


def test_letter_answers_to_questions_with_their_options_in_the_text():
  """MMStar's and RealWorldQA's parquet tables write the options into the question and answer
  with a letter: asked and scored with those options as the question's own, as the same tables'
  VLMEvalKit TSVs (whose questions list them too) are."""
  letter = evaluation.benchmark_question(
      {"question": "Which? Options: A. red B. blue", "options": [], "answer": "B"})
  assert letter["options"] == ["A. red", "B. blue"]
  # Asked as multiple choice: the options and the request to select one, as a TSV's row is.
  assert answer_format.format_question(letter).endswith(
      "Options:\nA. red\nB. blue\n" + answer_format.SELECT + "\n")
  assert answer_format.format_question(letter, "Restore it.").endswith(
      answer_format.ANSWER_FROM_RESTORED + "\n")
  for text, right in (("<ANSWER>B<ANSWER_END>", True), ("<ANSWER>B. blue<ANSWER_END>", True),
                      ("<ANSWER>(B) blue<ANSWER_END>", True), ("<ANSWER>b<ANSWER_END>", True),
                      ("<ANSWER>C. B<ANSWER_END>", False), ("<ANSWER>Blue<ANSWER_END>", True),
                      ("<ANSWER>A<ANSWER_END>", False)):
    assert evaluation.score(text, letter)[1] == right, text
  # As the tables write them, and replies as a model that was not trained on the answer format
  # writes them: the letter standing alone, or the one option's text (VLMEvalKit's rules).
  mmstar = evaluation.benchmark_question(
      {"question": "How many cars?\nOptions: A: 3, B: 4, C: 5, D: 6", "answer": "B"})
  realworldqa = evaluation.benchmark_question(
      {"question": "Is the light green?\nA. Yes\nB. No\nPlease answer directly with only the "
                   "letter of the correct option and nothing else.", "answer": "B"})
  assert evaluation.written_options(mmstar["question"]) == ["A. 3", "B. 4", "C. 5", "D. 6"]
  assert evaluation.written_options(realworldqa["question"]) == ["A. Yes", "B. No"]
  assert evaluation.written_options("Is it A. or not?") == []  # one letter lists nothing
  for question in (mmstar, realworldqa):
    for text, scored in (("The answer is B.", "B"), ("Answer: B", "B"), ("b", "B"),
                         ("It is not A. The answer is B.", ""), ("A", "A")):
      assert evaluation.score(text, question) == (scored, scored == "B"), (question, text)
  assert evaluation.score("4", mmstar) == ("B", True)
  assert evaluation.score("No.", realworldqa) == ("B", True)
  # A text that lists no options: the letter the reply names, of A to D (or to the answer's).
  assert evaluation.benchmark_question({"question": "?", "answer": "E"}) == {
      "question": "?", "answer": "E"}
  assert evaluation.score("I think the answer is E", {"question": "?", "answer": "E"}) == (
      "E", True)
  # Options of its own are kept; an open answer lists none.
  own = {"question": "A. x B. y", "options": ["p", "q"], "answer": "B"}
  assert evaluation.benchmark_question(own) == own
  assert "options" not in evaluation.benchmark_question({"question": "A. x B. y", "answer": "y"})
  # An open answer is still matched whole, normalised.
  assert evaluation.score("<ANSWER>Three.<ANSWER_END>", {"options": [], "answer": "three"})[1]
  assert not evaluation.score("<ANSWER>B. blue<ANSWER_END>", {"options": [], "answer": "blue"})[1]


def test_a_parquet_table_by_its_other_names(tmp_path):
  _, parquet = _benchmarks(tmp_path)
  for name in ("m.pq", "m.PARQUET"):
    shutil.copy(parquet, tmp_path / name)
    assert len(tables.open_table(str(tmp_path / name))) == 2
  # A Hugging Face dataset's shards: the folder is the table, its rows in the shards' order.
  shards = tmp_path / "realworldqa" / "data"
  shards.mkdir(parents=True)
  for k in range(2):
    shutil.copy(parquet, shards / f"test-0000{k}-of-00002.parquet")
  config_inputs.check_table("benchmarks.realworldqa", str(tmp_path / "realworldqa"))
  table = tables.open_table(str(tmp_path / "realworldqa"))
  assert len(table) == 4 and table[2]["questions"][0]["question"] == "Which?"
  # A dataset's folder with another split's shards beside them would mix the splits: refused,
  # naming them; a pattern of one split's shards is the table.
  shutil.copy(parquet, shards / "train-00000-of-00001.parquet")
  with pytest.raises(config_lib.ConfigError, match=(
      f"{tmp_path}/realworldqa: holds the shards of several splits \\(test, train\\), which one "
      f"table would mix; give one split's: a pattern such as '{shards}/test-\\*.parquet'")):
    tables.open_table(str(tmp_path / "realworldqa"))
  pattern = str(shards / "test-*.parquet")
  config_inputs.check_table("benchmarks.realworldqa", pattern)
  assert len(tables.open_table(pattern)) == 4
  with pytest.raises(config_lib.ConfigError, match="the pattern matches no .parquet file"):
    config_inputs.check_table("benchmarks.realworldqa", str(shards / "dev-*.parquet"))
  # The parquet converter's layout: a folder per split.
  for split in ("test", "train"):
    (tmp_path / "converted" / split).mkdir(parents=True)
    shutil.copy(parquet, tmp_path / "converted" / split / "0000.parquet")
  with pytest.raises(config_lib.ConfigError, match=r"\(test, train\).*converted/test/\*.parquet"):
    tables.open_table(str(tmp_path / "converted"))


def test_bad_benchmark_rows_are_left_out_named_and_counted(tmp_path, caplog):
  tsv = tmp_path / "bench.tsv"
  with open(tsv, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "image", "question", "A", "B", "answer"])
    cells = [base64.b64encode(_png(0)).decode(), "%" * 300, base64.b64encode(
        b"not an image at all " * 10).decode(), base64.b64encode(_png(1)).decode()]
    for i, image in enumerate(cells):
      w.writerow([i, image, f"Is it {i}?", "yes", "no", "A"])
  rules = images.ImageRules(64, 32, 16, 64, 32, 8)
  samples, read = tables.table_samples(str(tsv), 0, rules, max_skip_ratio=0.5)
  assert [s.index for s in samples] == [0, 3]
  assert read["rows"] == 4 and read["bad_rows"] == 2
  assert [row for row, _ in read["bad"]] == [1, 2]
  # An image below the model's smallest side (16 pixels here) is a bad row, as training skips it.
  small = tmp_path / "small.tsv"
  small.write_text(tsv.read_text().replace(
      base64.b64encode(_png(1)).decode(), base64.b64encode(_png(1, size=(8, 8))).decode()))
  _, small_read = tables.table_samples(str(small), 0, rules, max_skip_ratio=0.9)
  assert [row for row, _ in small_read["bad"]] == [1, 2, 3]
  assert small_read["bad"][2][1] == (
      "row 3 (line 5): image: 8 x 8 pixels: a side below the smallest usable 16 (one VAE stride "
      "or ViT patch of the model's resize rule; the resize would make up nearly every pixel)")
  assert "bad base64" in read["bad"][0][1] and "row 2 (line 4): image: not an image" in read[
      "bad"][1][1]
  # Each logged as it is read, naming the file once and the row by its place.
  assert caplog.text.count("benchmark " + str(tsv)) == 2
  assert f"benchmark {tsv}: bad row 1 (line 3): bad base64" in caplog.text
  assert "index" not in caplog.text
  caplog.clear()
  tables.table_samples(str(tsv), 0, rules, max_skip_ratio=0.5, log=False)
  assert str(tsv) not in caplog.text  # read again, already logged
  line = report.bad_rows_line({"samples": 2, "path": str(tsv), **read})
  assert line.startswith(f"Scored 2 of the 4 rows read from `{tsv}`; 2 bad row(s) left out: "
                         "row 1 (line 3): bad base64")
  assert report.bad_rows_line({"samples": 2, "path": "t.tsv", "rows": 2, "bad_rows": 0,
                               "bad": []}) == "Scored 2 of the 2 rows read from `t.tsv`."
  # A table whose index is not the row's place: both named.
  renamed = tmp_path / "renamed.tsv"
  renamed.write_text("".join(f"{100 + int(line.split(chr(9))[0])}{line[line.index(chr(9)):]}"
                             if i else line for i, line in enumerate(
                                 tsv.read_text().splitlines(keepends=True))))
  _, read = tables.table_samples(str(renamed), 0, rules, max_skip_ratio=0.5)
  assert [reason.split(":")[0] for _, reason in read["bad"]] == [
      "row 1 (index 101, line 3)", "row 2 (index 102, line 4)"]
  # The first two rows only: one bad of two.
  samples, read = tables.table_samples(str(tsv), 2, rules, max_skip_ratio=0.5)
  assert len(samples) == 1 and read["rows"] == 2 and read["table_rows"] == 4
  assert report.bad_rows_line({"samples": 1, "path": "t.tsv", **read}).startswith(
      "Scored 1 of the 2 rows read from `t.tsv` (the first of its 4: --config.benchmark_samples);")
  with pytest.raises(bad_records.TooManyBadRecords, match=r"benchmark .*bench.tsv: 2 of 4 .*"
                     r"raise it \(--config.max_skip_ratio\)"):
    tables.table_samples(str(tsv), 0, rules, max_skip_ratio=0.01)


def test_a_table_in_another_encoding_is_told_to_be_converted(tmp_path):
  tsv = tmp_path / "mmmb_zh.tsv"
  rows = ["index\timage\tquestion\tA\tB\tanswer"] + [
      f"{i}\t{base64.b64encode(_png(i)).decode()}\t图中是什么颜色？\t红\t绿\tA" for i in range(3)]
  tsv.write_bytes("\n".join(rows).encode("gbk"))
  with pytest.raises(bad_records.TooManyBadRecords, match=(
      r"3 of 3 rows .*not UTF-8 text.*The table is not UTF-8 text, as VLMEvalKit writes its "
      r"TSVs: convert it \(e.g. iconv -f GBK -t UTF-8")):
    tables.read_table(str(tsv), 0, log=False)
  # Chance where a table mixes multiple-choice rows with open ones: over the former, said so.
  line = report.benchmark_scoring_line({"chance": 0.5, "chance_rows": [3, 5]})
  assert "Chance (a random option) on its 3 multiple-choice rows of 5: 50.0 %." in line
  assert "Chance (a random option): 50.0 %." in report.benchmark_scoring_line(
      {"chance": 0.5, "chance_rows": [5, 5]})


def test_a_benchmark_image_is_kept_whole_or_cut_to_its_centred_square(tmp_path):
  # 40 x 80 pixels: red, green, blue bands of width 20, 40, 20. Its centred square is the green
  # middle alone; stretched to a square, the red and blue would stay in it.
  pixels = np.zeros((40, 80, 3), np.uint8)
  pixels[:, :20, 0] = pixels[:, 20:60, 1] = pixels[:, 60:, 2] = 255
  # A strip of 16 x 128: 16 x 64 at the model's size, too narrow for the Robust-R1 degradations.
  strip = np.full((16, 128, 3), 128, np.uint8)
  tsv = tmp_path / "wide.tsv"
  with open(tsv, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "image", "question", "A", "B", "answer"])
    for i, image in enumerate((pixels, strip)):
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format="PNG")
      w.writerow([i, base64.b64encode(buf.getvalue()).decode(), "Which colour?", "red", "green",
                  "B"])
  rules = images.ImageRules(64, 32, 16, 64, 32, 8)
  # By default whole, at its VAE size by the model's rule, as `answer` takes it: every colour.
  (sample,), read = tables.table_samples(str(tsv), 0, rules, max_skip_ratio=0.5, log=False)
  assert sample.image.shape == (32, 64, 3) == rules.at_vae_size(pixels).shape
  assert [sample.image[:, x, c].min() >= 250 for x, c in ((2, 0), (32, 1), (-3, 2))] == [True] * 3
  assert read["bad"] == [[1, "row 1 (line 3): image: 64 x 16 pixels at the model's image size: a "
                             "side below the Robust-R1 degradations' smallest 32 "
                             "(--config.benchmark_images=square cuts it square)"]]
  samples, read = tables.table_samples(str(tsv), 0, rules, log=False, images="square")
  assert [s.image.shape for s in samples] == [(64, 64, 3)] * 2 and not read["bad"]
  square = samples[0].image.astype(int)
  assert square[..., 1].min() >= 250 and square[..., 0].max() <= 5 and square[..., 2].max() <= 5
  with pytest.raises(ValueError, match="benchmark images 'crop': one of whole, square"):
    tables.table_samples(str(tsv), 0, rules, images="crop")


def test_images_of_several_sizes_are_scored_as_each_would_be_alone(model_dir):
  """A benchmark's whole images: batches of one size each, every result in its sample's place and
  the same as that sample's batch alone gives."""
  engine = engine_lib.Engine.load(model_dir)
  evaluator = evaluation.Evaluator(engine, recovery_steps=2, batch_size=2, max_new_tokens=2)
  rng = np.random.default_rng(0)
  shapes = [(32, 48), (48, 32), (32, 48), (48, 32), (32, 48)]
  question = {"question": "Which?", "options": ["x", "y"], "answer": "A"}
  samples = [evaluation.Sample(10 + i, rng.integers(0, 255, (h, w, 3), np.uint8), question)
             for i, (h, w) in enumerate(shapes)]
  # In batches of one size, at most 2, in order of each size's first image; a size's remainder
  # after a full batch padded to its length (one compiled shape per size), a lone batch not.
  assert evaluator._batches([s.image for s in samples]) == [[0, 2], [4, 4], [1, 3]]
  assert evaluator._batches([s.image for s in samples[:3]]) == [[0, 2], [1]]
  cond = evaluation.Condition("imagenet_c", "imagenet_c/fog", "s3", severity=3)
  evaluate = lambda chosen: evaluator.evaluate(
      chosen, [cond], modes=("corrupted",), per_sample=True, vae_baseline=False)["conditions"][0]
  out = evaluate(samples[:4])
  # The second size's samples alone: the same batch, so the same results, in their places.
  alone = evaluate([samples[1], samples[3]])
  for k, j in ((1, 0), (3, 1)):
    for metric in ("psnr", "ssim"):
      assert out["recovered_per_sample"][metric][k] == alone["recovered_per_sample"][metric][j]
    assert out["answers"]["corrupted"][k] == alone["answers"]["corrupted"][j]
    assert out["answers"]["corrupted"][k]["index"] == 10 + k
  # The padded remainder: its repeat is counted once, and the full batches score as before.
  every = evaluate(samples)
  assert [a["index"] for a in every["answers"]["corrupted"]] == [10, 11, 12, 13, 14]
  assert len(every["recovered_per_sample"]["psnr"]) == 5
  for k in range(4):
    assert every["recovered_per_sample"]["ssim"][k] == out["recovered_per_sample"]["ssim"][k]
  recovered = evaluator.recover([s.image for s in samples[:4]], [s.index for s in samples[:4]])
  assert [r.shape[:2] for r in recovered] == [engine.rules.vae_size(*s) for s in shapes[:4]]


def test_a_bad_table_stops_the_run_before_the_model_loads(tmp_path):
  # Not after hours of conditions, at the benchmarks.
  tsv = tmp_path / "bench.tsv"
  tsv.write_text("index\timage\tanswer\n0\tAAAA\tA\n")
  c = _eval_config()
  c.model, c.out = str(tmp_path / "no_model_here"), str(tmp_path / "report")
  c.benchmarks = {"rbench": str(tsv)}
  with pytest.raises(config_lib.ConfigError, match="question"):  # a column missing
    eval_run.run(c, say=lambda line: None)
  c.benchmarks = {"rbench": _benchmarks(tmp_path, bad_images=1)[0]}  # 1 bad row of 4
  with pytest.raises(bad_records.TooManyBadRecords, match="1 of 4"):
    eval_run.run(c, say=lambda line: None)
  assert not os.path.exists(c.out)


def test_benchmark_tables_alone(model_dir, tmp_path, monkeypatch):
  """num_samples = 0: a real model on benchmark files, without the built-in world's images; a
  table in units of BENCHMARK_UNIT_ROWS rows (2 here), so a stop loses at most one."""
  monkeypatch.setattr(eval_run, "BENCHMARK_UNIT_ROWS", 2)
  # The model of a part that trains no recovery (the demo's vae): said first, in the report too
  # (it was scored without a word).
  untrained = str(tmp_path / "vae_model")
  shutil.copytree(model_dir, untrained)
  recovery.save_no_recovery(untrained, "bootstrap_vae")
  c = _eval_config()
  c.model, c.out, c.num_samples, c.batch_size = untrained, str(tmp_path / "report"), 0, 2
  c.recovery_steps, c.max_new_tokens = 2, 2
  tsv = _benchmarks(tmp_path)[0]
  with open(tsv, "a") as f:  # a fourth row: two units of two rows
    f.write("3" + open(tsv).read().splitlines()[1][1:] + "\n")
  c.benchmarks.rbench = tsv
  lines = []
  path = eval_run.run(c, say=lines.append)
  note = recovery.untrained_note(untrained)
  assert lines[0] == note and "bootstrap_vae stage, which trains no recovery" in note
  lines = lines[1:]
  assert "on 1 benchmark table alone (num_samples = 0: not on the built-in world)" in lines[0]
  units = [line.split("] ")[1].split(" (")[0] for line in lines if "] " in line]
  assert units == [f"benchmark rbench: rows {rows} of 4, {unit}" for rows in ("1-2", "3-4")
                   for unit in ("robust_r1_pipeline 25%", "robust_r1_pipeline 50%",
                                "robust_r1_pipeline 100%", "clean images")]
  assert all("/8] " in line for line in lines if "] " in line)
  text = open(path).read()
  assert "The benchmark tables alone (num_samples = 0)" in text and "## rbench" in text
  assert "claims in miniature" not in text and "Per condition" not in text
  # Each intensity's corrupted + recovered beside its gain over corrupted only, ± its paired error.
  row = next(line for line in text.splitlines() if line.startswith("| 100% |"))
  assert re.fullmatch(r"\| 100% \| n/a \| [\d.]+ \| [\d.]+ \([+-][\d.]+ ± [\d.]+\) \| [\d.]+ \|",
                      row), row
  with open(os.path.join(c.out, "report.json")) as f:
    data = json.load(f)
  assert data["result"] == {} and data["claims"] == [] and data["notes"] == [note]
  assert text.splitlines()[2] == f"**{note}**"
  bench = data["benchmarks"]["rbench"]
  assert bench["samples"] == 4
  # Its figure, in its section: accuracy against intensity per mode (no figure of the world's).
  assert [name for name in os.listdir(c.out) if name.endswith(".png")] == ["benchmark_rbench.png"]
  assert "![rbench](benchmark_rbench.png)" in text and "## Figures" not in text
  # The units' answers make the table's: every row once per intensity and mode, in order, and
  # the accuracies theirs.
  with open(os.path.join(c.out, "answers_rbench.jsonl")) as f:
    written = [json.loads(line) for line in f]
  assert len(written) == 4 * (1 + 3 * 3)
  for level, accs in bench["accuracy"].items():
    for mode, value in accs.items():
      given = [a for a in written if (a["intensity"], a["mode"]) == (level, mode)]
      assert [a["row"] for a in given] == [0, 1, 2, 3]
      assert value == np.mean([a["correct"] for a in given])


def test_a_benchmark_report_shows_its_categories_beside_each_other():
  by_kind = lambda clean, corrupted, recovered: {"clean": clean, "corrupted": corrupted,
                                                 "corrupted+recovered": recovered}
  bench = {"by_category": {"clean image": {"clean": {"blur": 0.5, "noise": 0.75}},
                           "100%": by_kind({}, {"blur": 0.25, "noise": 0.5},
                                           {"blur": 0.5, "noise": 0.5})}}
  assert report.category_table(bench)[-4:] == [
      "| category | clean | 100% |", "| --- | --- | --- |", "| blur | 50.0 | 25.0 -> 50.0 |",
      "| noise | 75.0 | 50.0 -> 50.0 |"]
  one = {"by_category": {"clean image": {"clean": {"mcq": 0.5}}}}
  assert report.category_table(one) == []  # one category: the table above says it all


def test_a_table_of_several_image_sizes_says_so_before_the_model_loads(model_dir, tmp_path,
                                                                     monkeypatch):
  tsv = tmp_path / "sizes.tsv"
  with open(tsv, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "image", "question", "A", "B", "answer"])
    for i, size in enumerate([(64, 64), (40, 80), (64, 64)]):
      w.writerow([i, base64.b64encode(_png(i, size)).decode(), "Which?", "x", "y", "A"])
  c = _eval_config()
  c.model, c.out, c.num_samples, c.benchmarks.rbench = model_dir, str(tmp_path / "r"), 0, str(tsv)

  def not_loaded(*args, **kwargs):
    raise RuntimeError("not loaded")

  monkeypatch.setattr(engine_lib.Engine, "load", not_loaded)
  lines = []
  with pytest.raises(RuntimeError, match="not loaded"):
    eval_run.run(c, say=lines.append)
  assert lines[0] == ("benchmark rbench: 3 images in 2 sizes at the model's resize rule, each "
                      "size compiling its own programs (--config.benchmark_images=square: one "
                      "size)")
  c.benchmark_images = "square"
  lines.clear()
  with pytest.raises(RuntimeError, match="not loaded"):
    eval_run.run(c, say=lines.append)
  assert not any("sizes at the model's resize rule" in line for line in lines)


def test_a_report_without_conditions_keeps_its_tables_whole():
  answers = [{"kind": "colour", "answer": "A", "correct": True, "options": 2}]
  result = {"num_samples": 1, "conditions": [],
            "clean": {"accuracy": 1.0, "by_kind": {"colour": 1.0}, "answers": answers}}
  table = [line for line in report._world_lines(result, []) if line.startswith("|")]
  assert table and {line.count("|") for line in table} == {5}  # header, rule and rows alike


def test_an_evaluation_stopped_before_its_first_unit_says_so(tmp_path, monkeypatch):
  c = _eval_config()
  c.model, c.out = str(tmp_path / "model"), str(tmp_path / "report")

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C while the model loads

  monkeypatch.setattr(eval_run.engine_lib.Engine, "load", stopped)
  lines = []
  with pytest.raises(KeyboardInterrupt):
    eval_run.run(c, say=lines.append)
  assert lines == ["the evaluation stopped before its first unit finished; run the same command "
                   "to start it again"]

  # SIGTERM (a service's stop) stops it the same way, and the command exits 143; it ended the
  # process where it stood, without a word.
  def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this returns
  monkeypatch.setattr(eval_run.engine_lib.Engine, "load", terminated)
  lines, before = [], signal.getsignal(signal.SIGTERM)
  assert cli.call(lambda argv: eval_run.run(c, say=lines.append), ["evaluate"]) == 143
  assert lines[0].startswith("the evaluation stopped before its first unit finished")
  assert signal.getsignal(signal.SIGTERM) is before  # restored after the evaluation


@pytest.mark.slow
def test_evaluate_writes_a_complete_report(model_dir, tmp_path):
  c = _eval_config()
  tsv, parquet = _benchmarks(tmp_path, bad_images=1)
  c.max_skip_ratio = 0.5  # the TSV's fourth row is bad
  c.model, c.out, c.num_samples, c.batch_size = model_dir, str(tmp_path / "report"), 4, 4
  c.claim_samples = 6  # the claims' figures on more questions, the first 4 shared
  c.recovery_steps, c.max_new_tokens = 3, 8
  c.imagenet_c_types, c.severities, c.robust_r1_types = ("fog",), (3,), ("lens_blur",)
  c.intensities = ("25%", "100%")
  # The same model as SFT and as RL: its recoveries score the same, sample by sample.
  c.compare.sft = c.compare.rl = model_dir
  c.benchmarks = {"rbench": tsv, "mmstar": parquet}
  # An earlier report's figures this one does not draw (another evaluation's grid conditions, an
  # RL plot) went on standing beside it; the user's own files stay.
  os.makedirs(c.out)
  for name in ("grid_07_pixelate_s5.png", "rl_rewards.png", "notes.png"):
    open(os.path.join(c.out, name), "w").close()
  lines = []
  path = eval_run.run(c, say=lines.append)
  with open(os.path.join(c.out, "report.json")) as f:
    data = json.load(f)
  grids = sorted(name for name in os.listdir(c.out) if name.startswith("grid_"))
  assert len(grids) == 5 and "grid_07_pixelate_s5.png" not in grids
  assert not os.path.exists(os.path.join(c.out, "rl_rewards.png"))
  assert os.path.exists(os.path.join(c.out, "notes.png"))
  # Where it ran and on what code: another CPU may round differently and train another model.
  assert data["settings"]["machine"]["devices"] == f"{jax.device_count()} x cpu"
  assert re.search(rf", (\d+ of its )?{os.cpu_count()} cores$", data["settings"]["machine"]["cpu"])
  assert data["settings"]["code"].startswith("robust_u1_jax 0.1.0")
  # The model has no guidance.json: its recoveries used BAGEL's, and the report says so.
  assert data["settings"]["guidance"] == {"text_scale": 4.0, "image_scale": 2.0}
  conds = data["result"]["conditions"]
  assert [r["label"] for r in conds] == ["robust_r1_pipeline 25%", "robust_r1_pipeline 100%",
                                         "fog s3", "lens_blur 25%", "lens_blur 100%"]
  for row in conds:
    for kind in ("corrupted", "recovered"):
      assert np.isfinite(row[kind]["psnr"]) and 0 <= row[kind]["ssim"] <= 1
    assert set(row["accuracy"]) == set(evaluation.MODES[1:])
    assert all(0 <= a <= 1 for a in row["accuracy"].values())
    # Per question kind: each kind's accuracy over its own questions; their question-weighted
    # mean is the mode's accuracy.
    assert set(row["by_kind"]) == set(evaluation.MODES[1:])
    # The pipeline's conditions (the claims') on all 6 samples, the others on the first 4.
    assert row["num_samples"] == (6 if row["family"] == "robust_r1_pipeline" else 4)
    answers = data["result"]["clean"]["answers"][:row["num_samples"]]
    kinds = {a["kind"] for a in answers}
    for mode, by_kind in row["by_kind"].items():
      assert set(by_kind) == kinds
      weighted = sum(by_kind[k] * sum(a["kind"] == k for a in answers) for k in kinds)
      assert np.isclose(weighted / len(answers), row["accuracy"][mode])
  # The bounds: the pipeline's conditions also answer with the clean image in the recovery's
  # place; the VAE's round trip of the clean images is scored like a recovery.
  assert [0 <= r["oracle_accuracy"] <= 1 for r in conds if "oracle_accuracy" in r] == [True] * 2
  assert "oracle_accuracy" not in conds[2]
  round_trip = data["result"]["vae_round_trip"]
  assert np.isfinite(round_trip["psnr"]) and 0 <= round_trip["ssim"] <= 1
  # Beside each recovery, the corrupted image through the VAE alone: the engine's own round
  # trip of the same corrupted images, scored like a recovery.
  engine = engine_lib.Engine.load(model_dir)
  samples = evaluation.shapes_samples(c.split, 6, engine.rules, c.seed)
  clean_images = np.stack([s.image for s in samples])
  corrupted = np.stack(evaluation.corrupt(clean_images, [s.index for s in samples],
                                          evaluation.conditions(("100%",), (), ())[0], c.seed))
  through = engine.round_trip(corrupted)
  assert not np.array_equal(through, corrupted)
  assert np.isclose(conds[1]["through_vae"]["psnr"],
                    evaluation.psnr(through, clean_images).mean())
  assert np.isclose(conds[1]["through_vae"]["ssim"],
                    evaluation.ssim(through, clean_images).mean(), atol=1e-6)
  for row in conds:
    assert set(row["beyond_vae_se"]) == {"psnr", "ssim"}
  clean = data["result"]["clean"]
  assert [a["index"] for a in clean["answers"]] == list(range(6))
  assert np.isclose(clean["accuracy"], np.mean([a["correct"] for a in clean["answers"]]))
  assert 0 <= data["result"]["clean_with_recovery"]["accuracy"] <= 1
  # Stronger corruption moves the corrupted image further from the clean one.
  assert conds[0]["corrupted"]["psnr"] > conds[1]["corrupted"]["psnr"]
  claims = {c["claim"]: c for c in data["claims"]}
  assert any("100 % intensity" in k for k in claims) and any("clean accuracy" in k for k in claims)
  plus_ten = next(c for k, c in claims.items() if "100 % intensity" in k)
  assert "the clean image in the recovery's place" in plus_ten["bound"]
  # Each difference a claim reads carries its paired standard error.
  for row in conds:
    assert set(row["gain_se"]) == {"psnr", "ssim", "accuracy"}
    assert all(np.isfinite(v) and v >= 0 for v in row["gain_se"].values())
  assert all(" ± " in c["measured"] for c in claims.values())
  same = claims["RL's mean SSIM above SFT's"]  # (no CLIP checkpoint here)
  assert same["measured"].endswith("(+0.0000 ± 0.0000)") and not same["holds"]
  # Per condition too: the same recoveries, so no difference and no spread of it.
  by_condition = data["result"]["rl_minus_sft_by_condition"]
  assert sorted(by_condition) == sorted(r["label"] for r in conds)
  for row in conds:
    pairs = by_condition[row["label"]]
    assert set(pairs) == {"psnr", "ssim"} and all(p["rl"] == p["sft"] and p["se"] == 0.0
                                                  for p in pairs.values())
  # Beside the claim, the pipeline's conditions alone (the paper's protocol for RL against SFT).
  on_pipeline = data["result"]["rl_minus_sft_pipeline"]["ssim"]
  assert on_pipeline["sft"] == on_pipeline["rl"] and on_pipeline["se"] == 0.0
  assert "; on the Robust-R1 pipeline's conditions alone (the corruptions RL trains on" in (
      same["measured"])
  assert data["benchmarks"]["rbench"]["samples"] == 3
  assert data["benchmarks"]["rbench"]["rows"] == 4 and data["benchmarks"]["rbench"]["bad"] == [
      [3, data["benchmarks"]["rbench"]["bad"][0][1]]]
  assert data["benchmarks"]["mmstar"]["samples"] == 2
  # Every answer of a table, per intensity and mode, as a row a user can check, and the
  # accuracies again per category.
  rbench = data["benchmarks"]["rbench"]
  with open(os.path.join(c.out, rbench["answers"])) as f:
    answers = [json.loads(line) for line in f]
  assert len(answers) == 3 * (1 + 3 * 3)  # rows x (clean + 3 intensities x 3 modes)
  assert {(a["intensity"], a["mode"]) for a in answers} == {
      (level, mode) for level, accs in rbench["accuracy"].items() for mode in accs}
  for level, accs in rbench["accuracy"].items():
    for mode, accuracy in accs.items():
      scored = [a for a in answers if (a["intensity"], a["mode"]) == (level, mode)]
      assert [(a["row"], a["id"]) for a in scored] == [(0, "0"), (1, "1"), (2, "2")]
      assert np.mean([a["correct"] for a in scored]) == pytest.approx(accuracy)
      assert rbench["by_category"][level][mode]["mcq"] == pytest.approx(accuracy)
  first = answers[0]
  assert first["question"] == "Is it 0?" and first["options"] == ["yes", "no"]
  assert first["truth"] == "A" and first["correct"] == (
      evaluation.score(first["text"], {"options": ["yes", "no"], "answer": "A"})[1])
  for name in ("accuracy_vs_intensity.png", "ssim_per_type.png", "ssim_sft_vs_rl.png"):
    assert os.path.getsize(os.path.join(c.out, name)) > 1000, name
  markdown = open(path).read()
  assert "## The paper's claims in miniature" in markdown and "## rbench" in markdown
  assert "(I = 0.23 / 0.45 / 0.9 at all four stages)" in markdown
  assert "every answer in `answers_rbench.jsonl`" in markdown
  # How the table was scored, its chance and the replies that named no option, under it.
  unnamed = sum(not a["answer"] for a in answers)
  assert rbench["chance"] == 0.5 and rbench["no_option"] == [unnamed, len(answers)]
  assert ("Scored as VLMEvalKit reads replies, without its GPT judge: a multiple-choice reply by "
          "the option letter it names") in markdown
  assert (f"Chance (a random option): 50.0 %. Replies naming no option (scored wrong): {unnamed} "
          f"of {len(answers)}, every mode and intensity.") in markdown
  for claim in data["claims"]:  # the verdict, and its distance from the line where measured
    assert f" | {report._verdict(claim)} | " in markdown
  assert any(c["margin_se"] is not None for c in data["claims"])
  # The clean images' accuracy on the questions the other conditions ask too (the first 4 of 6),
  # and what the columns measure.
  first = 100 * np.mean([a["correct"] for a in clean["answers"][:4]])
  assert (f"on the 6 questions of the claims and the pipeline's conditions, {first:.1f} % on the "
          "first 4, which the other conditions ask.") in markdown
  assert "Columns: PSNR (dB), SSIM" in markdown and "corrupted+recovered: the corrupted image" in (
      markdown)
  assert "Scored 3 of the 4 rows read from" in markdown
  assert "1 bad row(s) left out: row 3 (line 5): " in markdown
  assert "| fog s3 | +0.00 ± 0.00 | +0.0000 ± 0.0000 |" in markdown.split(
      "## RL against SFT per condition")[1]
  assert "| condition | PSNR corrupted | PSNR through VAE | PSNR recovered | SSIM corrupted" in (
      markdown)
  # Beside each condition's corrupted+recovered accuracy, its gain over corrupted only with the
  # gain's paired standard error (a few questions' gain can be the draw of the questions alone).
  for row in conds:
    acc, se = row["accuracy"], row["gain_se"]["accuracy"]
    cells = next(line for line in markdown.split("## Per condition")[1].splitlines()
                 if line.startswith(f"| {row['label']} |")).split(" | ")
    assert cells[-2] == (f"{100 * acc['corrupted+recovered']:.1f} ("
                         f"{100 * (acc['corrupted+recovered'] - acc['corrupted']):+.1f} ± "
                         f"{100 * se:.1f})")
    assert cells[-3] == f"{100 * acc['corrupted']:.1f}"
  assert all("through the VAE alone" in c["measured"] for k, c in claims.items()
             if k.startswith("recovery beats"))
  # Image grids: a row per sample, a column per GRID_COLUMNS entry (64-pixel cells, 2 apart),
  # scaled 3x under a header of two lines: what the grid shows (its condition, how many images,
  # their mean SSIM), the columns' titles.
  assert ("Image grids of the first 5 conditions, left to right: corrupted | through the VAE "
          "alone | recovered | "
          "clean.") in markdown
  grid = np.asarray(Image.open(os.path.join(c.out, "grid_00_robust_r1_pipeline_25pct.png")))
  header = grid.shape[0] - 3 * (3 * 66 + 2)
  assert grid.shape[1] == 3 * (4 * 66 + 2) and 30 < header < 80
  for line in (grid[:header // 2], grid[header // 2:header]):  # black text on white
    assert (line < 100).any() and (line > 200).mean() > 0.8
  first = conds[0]
  assert figures.grid_heading(first) == (
      f"robust_r1_pipeline 25%: the first 3 of 6 images; mean SSIM "
      f"{first['corrupted']['ssim']:.2f} corrupted, {first['through_vae']['ssim']:.2f} VAE alone, "
      f"{first['recovered']['ssim']:.2f} recovered; PSNR {first['corrupted']['psnr']:.1f} / "
      f"{first['through_vae']['psnr']:.1f} / {first['recovered']['psnr']:.1f} dB")
  # Fewer images than a grid's rows read "the first 3 of 2 images".
  assert figures.grid_heading({**first, "num_samples": 2}).startswith(
      "robust_r1_pipeline 25%: all 2 images; mean SSIM ")
  kind_rows = [line for line in markdown.split("## Per question kind")[1].split("\n\n## ")[0]
               .splitlines() if line.startswith("| ") and not line.startswith(("| kind", "| ---"))]
  assert sorted(r.split(" | ")[0][2:] for r in kind_rows) == sorted(
      {a["kind"] for a in clean["answers"]})
  # Chance beside each kind: a random option's accuracy on that kind's questions (the world
  # lists each kind's fixed options: 6 colours, 5 shapes, counts 0..4, ...).
  world_options = {"color": 6, "shape": 5, "count": 5, "existence": 2}
  for row in kind_rows:
    kind, _, chance = row[2:].split(" | ")[:3]
    ours = [a for a in clean["answers"] if a["kind"] == kind]
    assert all(a["options"] == world_options[kind] for a in ours if kind in world_options)
    assert chance == f"{100 * np.mean([1 / a['options'] for a in ours]):.1f}"
  # Replies naming no option, counted apart (a model at 0 % names none, or names wrong ones):
  # each condition's and mode's of all its questions, and a wrong answer at least.
  for row in conds:
    for mode, (missing, asked) in row["no_option"].items():
      assert asked == row["num_samples"] and missing <= round((1 - row["accuracy"][mode]) * asked)
  assert set(conds[0]["no_option"]) == set(evaluation.MODES[1:])
  said = re.search(r"Replies naming no option \(scored wrong\): (\d+) of (\d+) on clean images, "
                   r"(\d+) of (\d+) under the conditions \(every mode\)\.", markdown)
  assert said and [int(n) for n in said.groups()] == [
      sum(not a["answer"] for a in clean["answers"]), len(clean["answers"]),
      sum(r["no_option"][m][0] for r in conds for m in r["no_option"]),
      sum(r["no_option"][m][1] for r in conds for m in r["no_option"])]
  assert ("4 held-out samples per condition, 6 for the figures the claims read (the Robust-R1 "
          "pipeline's conditions and the clean images).") in markdown
  assert lines[-1] == f"report: {path}"


def test_the_accuracy_plot_keeps_an_axis_of_ten_points_at_least(tmp_path, monkeypatch):
  import matplotlib.figure

  limits, savefig = {}, matplotlib.figure.Figure.savefig

  def recording(fig, path, **kwargs):
    limits[os.path.basename(path)] = fig.axes[0].get_ylim()
    return savefig(fig, path, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording)
  # A model that answers nothing right: its axis was -0.05 to 0.05 %, then 0 to 0.05 %.
  conditions = [{"family": evaluation.PIPELINE, "label": f"{evaluation.PIPELINE} {level}",
                 "level": level, "num_samples": 4,
                 "accuracy": {mode: 0.0 for mode in evaluation.MODES[1:]}}
                for level in ("25%", "50%", "100%")]
  assert figures.figures({"conditions": conditions, "clean": {"accuracy": 0.0}},
                         str(tmp_path)) == ["accuracy_vs_intensity.png"]
  assert limits["accuracy_vs_intensity.png"] == (0.0, 10.0)


def test_scoring_and_conditions():
  q = {"question": "Colour?", "options": ["red", "blue"], "answer": "B"}
  assert evaluation.score("<ANSWER>B<ANSWER_END>", q) == ("B", True)
  assert evaluation.score("<ANSWER>red<ANSWER_END>", q) == ("A", False)
  assert evaluation.score("The Cat.", {"question": "?", "answer": "the cat"})[1]
  conds = evaluation.conditions(("50%",), ("all",), (5,))
  assert conds[0].name == "robust_r1_pipeline" and conds[0].intensity == 0.45
  assert len(conds) == 1 + 19 and conds[1].label == "gaussian_noise s5"
  image = np.full((8, 8, 3), 100, np.uint8)
  assert evaluation.psnr(image[None], image[None])[0] > 90
  # A float image in [0, 1] scores as its uint8 image does (it read 48 dB higher, on a 0..255
  # range); batches of two shapes are named, not broadcast.
  other = np.full((1, 8, 8, 3), 110, np.uint8)
  uint8_psnr = evaluation.psnr(other, image[None])[0]
  assert uint8_psnr == pytest.approx(10 * np.log10(255 ** 2 / 100))
  assert evaluation.psnr(other / 255.0, image[None] / 255.0)[0] == pytest.approx(uint8_psnr)
  with pytest.raises(ValueError, match=r"psnr: two B x H x W x 3 batches of one shape, got "
                                       r"\(8, 8, 3\) and \(1, 8, 8, 3\)"):
    evaluation.psnr(image, image[None])
  rows = report.claims({"conditions": [], "clean": {"accuracy": 0.5},
                        "clean_with_recovery": {"accuracy": 0.49, "minus_off_se": 0.031}})
  assert rows[0]["holds"] and "within 2 points" in rows[0]["claim"]
  assert rows[0]["measured"] == "off 50.0 %, on 49.0 % (-1.0 ± 3.1 points)"
  # A claim that holds on a difference below the shown decimals says it (it read +0.0000).
  rows = report.claims({"conditions": []}, {"sft": {"ssim": 0.5475125}, "rl": {"ssim": 0.5475292}})
  assert rows[0]["holds"] and rows[0]["measured"] == "SFT 0.5475, RL 0.5475 (+1.7e-05)"


def test_each_model_recovers_at_its_own_guidance_unless_the_config_gives_it(tmp_path):
  c = _eval_config()
  (tmp_path / "bagel_config.json").write_text("{}\n")  # a model's folder, to its side files
  (tmp_path / "params").mkdir()
  engine = types.SimpleNamespace(instruction=recovery.INSTRUCTION)  # all the evaluator reads
  guidance = lambda: eval_run._evaluator(engine, c, None, str(tmp_path)).sampler.guidance
  assert guidance() == recovery.Guidance(4.0, 2.0)  # BAGEL's, for a model without its own
  recovery.Guidance(1.5, 1.25).save(str(tmp_path))  # as the trainer writes it beside a model
  assert guidance() == recovery.Guidance(1.5, 1.25)
  c.cfg_text = 3.0
  assert guidance() == recovery.Guidance(3.0, 1.25)
  c.cfg_img = 1.0  # unguided in images, not "the model's own"
  assert guidance() == recovery.Guidance(3.0, 1.0)
  c.cfg_text = 0.5
  with pytest.raises(config_lib.ConfigError, match="cfg_text = 0.5 is invalid"):
    config_lib.validate_eval(c)


def test_rl_minus_sft_per_condition_and_over_conditions():
  row = lambda label, ssim: {"label": label, "recovered": {"ssim": float(np.mean(ssim))},
                             "recovered_per_sample": {"ssim": np.asarray(ssim)}}
  rl = [row("fog s3", [0.5, 0.7, 0.9]), row("fog s5", [0.2, 0.2, 0.5])]
  sft = [row("fog s3", [0.4, 0.5, 0.6]), row("fog s5", [0.3, 0.1, 0.5])]
  by_condition = {r["label"]: evaluation.rl_minus_sft([r], [s]) for r, s in zip(rl, sft)}
  # fog s3: differences 0.1, 0.2, 0.3 (mean 0.2, standard deviation 0.1 over the root of 3).
  fog3 = by_condition["fog s3"]["ssim"]
  assert np.allclose([fog3["sft"], fog3["rl"], fog3["se"]], [0.5, 0.7, 0.1 / np.sqrt(3)])
  # fog s5: differences -0.1, 0.1, 0 (mean 0, standard deviation 0.1 over the root of 3).
  fog5 = by_condition["fog s5"]["ssim"]
  assert np.allclose([fog5["rl"] - fog5["sft"], fog5["se"]], [0.0, 0.1 / np.sqrt(3)])
  # Over both: each sample averaged first (differences 0, 0.15, 0.15), not the six pairs pooled.
  both = evaluation.rl_minus_sft(rl, sft)["ssim"]
  assert np.allclose([both["rl"] - both["sft"], both["se"]],
                     [0.1, np.std([0.0, 0.15, 0.15], ddof=1) / np.sqrt(3)])
  lines = report.rl_minus_sft_table({"rl_minus_sft_by_condition": by_condition,
                                     "num_samples": 3})
  assert "| fog s3 | +0.2000 ± 0.0577 |" in lines
  # It says which images it compares: the first num_samples of every condition.
  assert any("on the first 3 images of every condition (the pipeline's too)" in line
             for line in lines)
  # Rows in the per-condition table's order, not alphabetical.
  ordered = report.rl_minus_sft_table({"rl_minus_sft_by_condition": by_condition,
                                       "num_samples": 3,
                                       "conditions": [{"label": "fog s5"}, {"label": "fog s3"}]})
  assert [line.split(" | ")[0] for line in ordered if line.startswith("| fog")] == [
      "| fog s5", "| fog s3"]


def test_paired_standard_error():
  # Differences 1, 2, 3: sample standard deviation 1, over the root of 3 samples.
  assert np.isclose(evaluation.paired_se([1.0, 3.0, 5.0], [0.0, 1.0, 2.0]), 1 / np.sqrt(3))
  # Answers right / wrong per question: the pairing removes what both modes share.
  assert evaluation.paired_se([True, False, True, False], [True, False, True, False]) == 0.0
  assert np.isnan(evaluation.paired_se([1.0], [0.0]))


def test_claims_state_what_a_perfect_recovery_reaches():
  quality = lambda psnr, ssim: {"psnr": psnr, "ssim": ssim}
  full = {"family": "robust_r1_pipeline", "level": "100%", "corrupted": quality(13.0, 0.27),
          "recovered": quality(16.0, 0.39), "oracle_accuracy": 0.375,
          "accuracy": {"corrupted": 0.348, "corrupted+recovered": 0.363}}
  rows = report.claims({"conditions": [full], "clean": {"accuracy": 0.422},
                        "vae_round_trip": quality(25.23, 0.701)})
  recovery, answers = rows
  assert recovery["holds"] and recovery["bound"] == (
      "the VAE's round trip of the clean image: SSIM 0.701, PSNR 25.23 dB")
  assert not answers["holds"] and answers["bound"] == (
      "the clean image in the recovery's place: 37.5 % (+2.7 points); the clean image alone: "
      "42.2 %")
  # What the recovery adds beyond the corrupted image through the VAE alone is stated beside the
  # claim; the claim itself reads the corrupted image.
  full.update(through_vae=quality(15.5, 0.38), beyond_vae_se={"psnr": 0.25, "ssim": 0.011},
              gain_se={"psnr": 0.2, "ssim": 0.01})
  full["gain_se"]["accuracy"] = 0.025
  recovery, answers = report.claims({"conditions": [full]})
  # Beside each verdict, how far the difference lies from the claim's line in standard errors:
  # the recovery's nearer metric (SSIM +0.120 / 0.010 = 12.0, PSNR 3.00 / 0.20 = 15.0); the
  # answers' gain +1.5 points against the 10 the claim asks (-8.5 / 2.5 = -3.4).
  assert recovery["margin_se"] == pytest.approx(12.0) and answers["margin_se"] == pytest.approx(
      -3.4)
  assert report.margin_words(recovery) == " (12.0 standard errors clear)"
  assert report.margin_words(answers) == " (3.4 standard errors short)"
  assert report.margin_words({"holds": True, "margin_se": None}) == ""
  assert recovery["holds"] and recovery["measured"] == (
      "SSIM 0.270 -> 0.390 (+0.120 ± 0.010), PSNR 13.00 -> 16.00 dB (+3.00 ± 0.20); the "
      "corrupted image through the VAE alone: SSIM 0.380, PSNR 15.50 dB, the recovery "
      "+0.010 ± 0.011, +0.50 ± 0.25 dB beyond it")


def test_the_oracle_mode_puts_the_clean_image_where_the_recovery_goes():
  vae = {k: np.full((16, 16, 3), v, np.uint8) for k, v in (("clean", 1), ("corrupted", 2),
                                                           ("recovered", 3))}
  vit = {k: np.full((8, 8, 3), v[0, 0, 0], np.uint8) for k, v in vae.items()}
  oracle = evaluation.mode_blocks(evaluation.ORACLE, [1, 2], [1, 2, 3], vae, vit)
  ours = evaluation.mode_blocks("corrupted+recovered", [1, 2], [1, 2, 3], vae, vit)
  assert [type(b) for b in oracle] == [type(b) for b in ours]
  assert [b.image for b in oracle if isinstance(b, sequence.Latent)] == [0, 1]
  assert [s[0, 0, 0] for s in evaluation.image_stack(evaluation.ORACLE, vae)] == [2, 1]
  assert [s[0, 0, 0] for s in evaluation.image_stack("corrupted+recovered", vae)] == [2, 3]
  # The ViT reads the slot's own image too.
  vit_images = lambda blocks: [b.image[0, 0, 0] for b in blocks if isinstance(b, sequence.Vit)]
  assert (vit_images(oracle), vit_images(ours)) == ([2, 1], [2, 3])


def test_every_mode_gives_the_vae_the_image_its_vit_reads():
  vae = {k: np.full((16, 16, 3), v, np.uint8) for k, v in (("clean", 1), ("corrupted", 2),
                                                           ("recovered", 3))}
  vit = {k: np.full((8, 8, 3), v[0, 0, 0], np.uint8) for k, v in vae.items()}
  for mode in (*evaluation.MODES, evaluation.ORACLE):
    blocks = evaluation.mode_blocks(mode, [1, 2], [1, 2, 3], vae, vit)
    stack = evaluation.image_stack(mode, vae)
    pairs = [(a.image, b.image[0, 0, 0]) for a, b in zip(blocks, blocks[1:])
             if isinstance(a, sequence.Latent) and isinstance(b, sequence.Vit)]
    assert pairs and all(stack[slot][0, 0, 0] == seen for slot, seen in pairs), mode


class _Stop(KeyboardInterrupt):
  """Ctrl-C, raised by the test's progress callback once enough units have finished."""


@pytest.mark.slow
def test_a_stopped_evaluation_resumes_to_the_report_of_an_uninterrupted_one(model_dir, tmp_path):
  c = _eval_config()
  c.model, c.num_samples, c.claim_samples, c.batch_size = model_dir, 2, 2, 2
  c.recovery_steps, c.max_new_tokens = 2, 4
  c.imagenet_c_types, c.severities, c.robust_r1_types = ("fog",), (3,), ()
  c.intensities = ("100%",)
  c.compare.sft = c.compare.rl = model_dir
  c.benchmarks = {"rbench": _benchmarks(tmp_path)[0]}
  c.benchmark_samples = 2

  def evaluate(out, stop_after=None, lines=None):
    c.out, lines = str(out), [] if lines is None else lines

    def say(line):
      lines.append(line)
      if stop_after is not None and "] " in line and sum("] " in s for s in lines) == stop_after:
        raise _Stop

    eval_run.run(c, say=say)
    return lines

  whole = evaluate(tmp_path / "whole")
  # 2 conditions for the model, SFT and RL; the VAE's round trip; clean images off and on; the
  # benchmark's 3 intensities and its clean images.
  assert sum("] " in s for s in whole) == 2 * 3 + 3 + 4
  # Another evaluation into that folder, stopped: its finished-looking report is not this one's.
  c.seed += 1
  other = []
  with pytest.raises(_Stop):
    evaluate(tmp_path / "whole", stop_after=2, lines=other)
  c.seed -= 1
  assert other[-1] == (f"  {tmp_path / 'whole' / 'report.md'} is an earlier evaluation's, of "
                       "other models, settings or code, until this one finishes")
  shutil.rmtree(tmp_path / "whole" / "partial")
  stopped = []
  with pytest.raises(_Stop):
    evaluate(tmp_path / "stopped", stop_after=5, lines=stopped)  # in the 5th unit: 4 finished
  assert stopped[-1] == ("the evaluation stopped: 4 of its 13 units kept in "
                         f"{tmp_path / 'stopped' / 'partial'}; run the same command to resume")
  kept = os.listdir(tmp_path / "stopped" / "partial")
  assert sum(name.endswith(".npz") for name in kept) == 4 and "report.json" not in os.listdir(
      tmp_path / "stopped")
  resumed = evaluate(tmp_path / "stopped")
  assert "resuming a stopped evaluation: 4 of its 13 units kept in " in resumed[1]
  progress = [s for s in resumed if "] " in s]
  # The first four units (in the same order as before) are read back, the rest computed.
  assert [": kept from the stopped run (" in s for s in progress] == [True] * 4 + [False] * 9
  assert not os.path.exists(tmp_path / "stopped" / "partial")  # the report holds it all now

  def report_of(out):
    with open(out / "report.json") as f:
      data = json.load(f)
    for key in ("out", "seconds"):
      data["settings"].pop(key)
    return data

  resumed_report, whole_report = report_of(tmp_path / "stopped"), report_of(tmp_path / "whole")
  assert (resumed_report["settings"].pop("units_kept"),
          whole_report["settings"].pop("units_kept")) == (4, 0)
  assert resumed_report == whole_report
  for name in os.listdir(tmp_path / "whole"):
    if name.startswith("grid_"):  # the examples kept from the stopped run drew the same grids
      assert (tmp_path / "whole" / name).read_bytes() == (
          tmp_path / "stopped" / name).read_bytes(), name


def test_partial_results_keep_arrays_and_start_afresh_for_another_model(tmp_path):
  model = tmp_path / "model"
  model.mkdir()
  (model / "weights").write_bytes(b"1")
  stamp = lambda: {"config": {"seed": 0}, "files": files.files_fingerprint([str(model)])}
  store = partial.PartialResults(str(tmp_path), stamp())
  # Stamped, no unit yet: nothing kept (`evaluate` refused another run here as if it were).
  assert partial.kept_stamp(str(tmp_path)) is None
  unit = {"row": {"psnr": float("nan"), "per_sample": {"ssim": np.arange(3.0)}},
          "example": (np.zeros((1, 2, 2, 3), np.uint8), np.ones(2, np.float32)), "n": np.int64(2)}
  store.put("fog s3", unit)
  assert len(store) == 1 and store.get("gaussian_noise s3") is None
  assert partial.kept_stamp(str(tmp_path)) == store.stamp
  got = partial.PartialResults(str(tmp_path), stamp()).get("fog s3")
  assert np.isnan(got["row"]["psnr"]) and got["n"] == 2
  np.testing.assert_array_equal(got["row"]["per_sample"]["ssim"], np.arange(3.0))
  assert [a.dtype for a in got["example"]] == [np.uint8, np.float32]
  announced = []
  assert partial.PartialResults(str(tmp_path), stamp()).get_or_compute(
      "fog s3", None, announced.append)["n"] == 2
  assert announced == ["fog s3: kept from the stopped run"]
  # A damaged unit (a disk that filled up, a copy cut short) is computed again.
  with open(store._path("fog s3"), "wb") as f:
    f.write(b"PK\x03\x04 not a whole npz")
  assert store.get("fog s3") is None and len(store) == 0
  store.put("fog s3", unit)
  # Another model's files (here rewritten: a new size) or another config start afresh.
  (model / "weights").write_bytes(b"22")
  assert len(partial.PartialResults(str(tmp_path), stamp())) == 0
  store = partial.PartialResults(str(tmp_path), stamp())
  store.put("fog s3", unit)
  assert len(partial.PartialResults(str(tmp_path), {**stamp(), "config": {"seed": 1}})) == 0


def test_another_evaluation_in_the_folder_is_refused_naming_what_differs(model_dir, tmp_path):
  c = _eval_config()
  c.model, c.out = model_dir, str(tmp_path / "out")
  partial.PartialResults(c.out, eval_run.fingerprint(c)).put("fog s3", {"n": 1})
  # The same model however it is spelled: relative, through a link, by its stage's workdir.
  stage = tmp_path / "stage"
  stage.mkdir()
  os.symlink(model_dir, stage / "model")
  for spelled in (os.path.relpath(model_dir), str(stage / "model"), str(stage)):
    c.model = spelled
    assert eval_run.other_evaluation(c) is None, spelled
  kept = "the units another, stopped evaluation kept, which differs in: "
  c.num_samples = 8
  assert eval_run.other_evaluation(c) == kept + "config field num_samples 64 -> 8"
  c.num_samples, c.benchmarks.rbench = 64, str(tmp_path / "b.tsv")
  (tmp_path / "b.tsv").write_text("index\n")
  assert eval_run.other_evaluation(c) == kept + (
      f"config field benchmarks.rbench '' -> '{tmp_path}/b.tsv'; file {tmp_path}/b.tsv read by "
      f"this evaluation only ({eval_run.TABLES_ALONE})")  # how not to evaluate everything again
  # A file the kept units read and this evaluation does not is "gone" only when it is.
  c.out = str(tmp_path / "with_table")
  partial.PartialResults(c.out, eval_run.fingerprint(c)).put("fog s3", {"n": 1})
  c.benchmarks.rbench = ""
  assert eval_run.other_evaluation(c) == kept + (
      f"config field benchmarks.rbench '{tmp_path}/b.tsv' -> ''; file {tmp_path}/b.tsv read by "
      "the other evaluation only")
  os.remove(tmp_path / "b.tsv")
  assert eval_run.other_evaluation(c).endswith(f"file {tmp_path}/b.tsv gone")
  c.out = str(tmp_path / "out")
  weights = sorted(os.listdir(model_dir))[0]
  os.utime(os.path.join(model_dir, weights), ns=(0, 0))
  assert eval_run.other_evaluation(c) == kept + (
      f"file {os.path.realpath(model_dir)}/{weights} of another size or modification time")


def test_units_kept_by_other_code_are_not_read_back(tmp_path):
  """The stamp holds a digest of the package's sources: a unit kept by another version of the code
  (which may lack a field this one reads, as a benchmark unit of the code before the answers file
  lacked its answers) starts afresh, and so does a report of other code."""
  package = os.path.dirname(os.path.abspath(files.__file__))
  copy = tmp_path / "package"
  shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
  digest = files.code_digest.__wrapped__  # uncached: the copy is edited below
  assert digest(str(copy)) == digest(package) == files.code_digest()
  (copy / "notes.txt").write_text("not code")
  assert digest(str(copy)) == digest(package)
  with open(copy / "eval" / "report.py", "a") as f:
    f.write("# one line more\n")
  assert digest(str(copy)) != digest(package)
  c = config_lib.load_file(os.path.join(os.path.dirname(package), "configs", "eval.py:tiny"))
  c.model = str(tmp_path / "model")
  os.makedirs(c.model)
  for name in ("llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"):
    (tmp_path / "model" / name).write_bytes(b"")  # a model directory as far as the stamp looks
  assert eval_run.fingerprint(c)["code"] == files.code_digest()


def test_rl_minus_sft_cells_never_read_minus_zero():
  """A difference that rounds to zero at the table's digits is shown in exponent form, as the
  claims show one (not "-0.0000", a zero with a sign)."""
  pairs = {"psnr": {"rl": 20.0, "sft": 20.5, "se": 0.1},
           "ssim": {"rl": 0.60, "sft": 0.60002, "se": 0.0007},
           "clip": {"rl": 0.7, "sft": 0.7, "se": 0.005}}
  result = {"num_samples": 4, "conditions": [{"label": "jpeg_compression s5"}],
            "rl_minus_sft_by_condition": {"jpeg_compression s5": pairs}}
  row = report.rl_minus_sft_table(result)[-1]
  assert row == "| jpeg_compression s5 | -0.50 ± 0.10 | -2.0e-05 ± 0.0007 | +0.0000 ± 0.0050 |"
  # Nor a standard error that rounds to zero: "± 0.00" and "± 0.0000" said nothing.
  pairs["psnr"]["se"], pairs["clip"]["se"] = 0.0004, 4.1e-06
  row = report.rl_minus_sft_table(result)[-1]
  assert row == "| jpeg_compression s5 | -0.50 ± 4.0e-04 | -2.0e-05 ± 0.0007 | +0.0000 ± 4.1e-06 |"


# -- paired standard errors, conditions, modes: on stubs and fixed per-sample numbers -------------


def _expected_paired_se(a, b):
  """The paired standard error from its definition (`evaluation.paired_se`'s docstring): the
  sample standard deviation (ddof=1, the n - 1 of an unbiased variance) of the per-sample
  differences a[i] - b[i], over the root of n. Written out here, not read from the code."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(np.std(d, ddof=1) / np.sqrt(d.size))


class _StubEvaluator(evaluation.Evaluator):
  """An Evaluator without a model: each image's quality is its mean pixel value (so a sample's
  score is the value its image was filled with), recoveries and answers are fixed per sample."""

  def __init__(self, recovered=(), correct=None):
    self.seed, self.batch_size, self.clip_similarity = 0, 2, None
    self.recovered = np.asarray(recovered, np.uint8)
    self.correct = correct or {}
    self.calls = []

  def recover(self, corrupted, indices):
    self.calls.append(("recover", np.asarray(corrupted).copy(), list(indices)))
    return np.stack([np.full((8, 8, 3), v, np.uint8) for v in self.recovered])

  def quality(self, images, clean):
    value = np.asarray(images, np.float64).mean(axis=(1, 2, 3))
    return {"psnr": value, "ssim": value / 255}

  def answers(self, mode, samples, corrupted=None, recovered=None):
    self.calls.append(("answers", mode, corrupted, recovered))
    return [{"index": s.index, "kind": "k", "answer": "A", "correct": bool(c)}
            for s, c in zip(samples, self.correct.get(mode, [True] * len(samples)))]


def _samples(n):
  return [evaluation.Sample(i, np.zeros((8, 8, 3), np.uint8), {"answer": "A"}) for i in range(n)]


def test_a_conditions_gain_standard_errors_pair_each_sample_with_itself(monkeypatch):
  # Fixed per-sample scores, in an order neither sorted nor symmetric: a standard error paired
  # against the wrong sample (sorted, reversed, the recovery with itself) gives another number.
  corrupted_values = [10, 80, 20, 40]
  recovered_values = [15, 100, 21, 50]  # differences 5, 20, 1, 10
  right = {"corrupted": [True, False, True, False],
           "corrupted+recovered": [True, True, False, False]}
  monkeypatch.setattr(evaluation, "corrupt", lambda images, indices, cond, seed: [
      np.full((8, 8, 3), v, np.uint8) for v in corrupted_values])
  stub = _StubEvaluator(recovered_values, right)
  cond = evaluation.Condition("imagenet_c", "imagenet_c/fog", "s3", severity=3)
  row = stub.evaluate(_samples(4), [cond], modes=("corrupted", "corrupted+recovered"),
                      vae_baseline=False)["conditions"][0]
  se = _expected_paired_se(recovered_values, corrupted_values)
  assert row["gain_se"]["psnr"] == pytest.approx(se)
  assert row["gain_se"]["ssim"] == pytest.approx(se / 255)
  # Answers: differences 0, +1, -1, 0 (paired), not those against the corrupted answers sorted.
  assert row["gain_se"]["accuracy"] == pytest.approx(
      _expected_paired_se(right["corrupted+recovered"], right["corrupted"]))
  assert row["gain_se"]["accuracy"] == pytest.approx(np.sqrt(2 / 3) / 2)


def test_clean_accuracy_with_recovery_on_pairs_on_against_off(monkeypatch):
  class Store:  # computes every unit: nothing stored
    def get_or_compute(self, label, compute, progress):
      return compute()

  on, off = [True, True, False, True, False], [True, False, False, False, True]
  stub = types.SimpleNamespace(
      evaluate=lambda *a, **k: {"conditions": [], "examples": []},
      round_trip=lambda clean: {"ssim": 1.0, "psnr": 40.0},
      clean=lambda samples, recovery=False: {
          "accuracy": float(np.mean(on if recovery else off)), "by_kind": {},
          "answers": [{"correct": c} for c in (on if recovery else off)]})
  c = types.SimpleNamespace(recovery_on_clean=True)
  result = eval_run._evaluate_model(stub, c, _samples(5), _samples(5), [], lambda _: None,
                                    Store())
  # Differences 0, +1, 0, +1, -1: a standard error of on - off, not of on against itself (0).
  assert result["clean_with_recovery"]["minus_off_se"] == pytest.approx(
      _expected_paired_se(on, off))
  assert result["clean_with_recovery"]["minus_off_se"] > 0.3


def test_each_condition_has_its_labels_intensity_or_severity():
  conds = evaluation.conditions(("25%", "50%", "100%"), ("gaussian_noise", "fog"), (3, 5),
                                ("all",))
  by_label = {(c.family, c.label): c for c in conds}
  intensity = {"25%": 0.23, "50%": 0.45, "100%": 0.9}  # the paper's, EVAL_INTENSITIES
  for (family, label), c in by_label.items():
    level = label.split()[-1]
    if family == "imagenet_c":
      assert (c.severity, c.intensity) == ({"s3": 3, "s5": 5}[level], None), label
    else:  # the pipeline and every Robust-R1 degradation
      assert (c.intensity, c.severity) == (intensity[level], None), label
  # Every level of every type is there, each once.
  assert len(by_label) == len(conds)
  assert {c.level for c in conds if c.family == "robust_r1"} == set(intensity)
  assert {c.label for c in conds if c.family == "imagenet_c"} == {
      "gaussian_noise s3", "gaussian_noise s5", "fog s3", "fog s5"}


def test_two_samples_of_one_image_get_different_corruptions():
  # The key is (seed, record index): two records with the same image are two draws, and the same
  # record is the same draw for every model.
  image = np.full((32, 32, 3), 128, np.uint8)
  for cond in evaluation.conditions(("100%",), ("gaussian_noise",), (3,)):
    first, second = evaluation.corrupt([image, image], [3, 4], cond, seed=0)
    assert not np.array_equal(first, second), cond.label
    again = evaluation.corrupt([image], [3], cond, seed=0)[0]
    assert np.array_equal(first, again), cond.label


def test_clean_images_with_recovery_on_answer_beside_their_own_recovery():
  stub = _StubEvaluator(recovered=[7, 9])
  samples = [evaluation.Sample(i, np.full((8, 8, 3), v, np.uint8), {"answer": "A"})
             for i, v in ((11, 1), (12, 2))]
  stub.clean(samples, recovery=True)
  (_, recovered_from, indices), (_, mode, corrupted, recovered) = stub.calls
  # The clean image in the corrupted image's place, and the model's recovery of it beside it
  # (not the clean image twice: that would be ORACLE's layout, not recovery always on).
  assert indices == [11, 12] and [x[0, 0, 0] for x in recovered_from] == [1, 2]
  assert mode == "corrupted+recovered" and [x[0, 0, 0] for x in corrupted] == [1, 2]
  assert [x[0, 0, 0] for x in recovered] == [7, 9]


def test_the_reasoning_layout_asks_the_instructed_question():
  vae = {k: np.full((16, 16, 3), v, np.uint8) for k, v in (("clean", 1), ("corrupted", 2),
                                                           ("recovered", 3))}
  vit = {k: np.full((8, 8, 3), v[0, 0, 0], np.uint8) for k, v in vae.items()}
  question, instructed = [1, 2], [5, 6, 7]
  for mode in ("corrupted+recovered", evaluation.ORACLE):
    texts = [list(b.ids) for b in evaluation.mode_blocks(mode, question, instructed, vae, vit)
             if type(b) is sequence.Text]  # (Open, a Text too, opens the recovery's turn)
    # The recovery is asked for by the instruction (Robust-U1's input format), as in training.
    assert texts == [instructed], mode
  for mode in evaluation.MODES:
    if mode != "corrupted+recovered":
      texts = [list(b.ids) for b in evaluation.mode_blocks(mode, question, instructed, vae, vit)
               if type(b) is sequence.Text]
      assert texts == [question], mode


def test_rl_against_sft_on_the_pipeline_reads_the_pipelines_conditions_alone(monkeypatch):
  # Per model, a pipeline condition and an ImageNet-C one; RL gains on the pipeline and loses on
  # fog, so the pipeline's figure with fog mixed in is another number.
  def rows(pipeline, fog):
    return [{"family": family, "label": label, "recovered": {"ssim": float(np.mean(v))},
             "recovered_per_sample": {"ssim": np.asarray(v)}}
            for family, label, v in (("robust_r1_pipeline", "robust_r1_pipeline 100%", pipeline),
                                     ("imagenet_c", "fog s5", fog))]

  per_model = {"sft": rows([0.4, 0.5, 0.6], [0.5, 0.5, 0.5]),
               "rl": rows([0.5, 0.7, 0.6], [0.1, 0.2, 0.3])}
  monkeypatch.setattr(engine_lib.Engine, "load", staticmethod(lambda path, dtype: path))
  monkeypatch.setattr(eval_run, "_evaluator", lambda engine, c, clip, path: types.SimpleNamespace(
      evaluate=lambda *a, **k: {"conditions": per_model[path]}))
  result = {}
  eval_run._compare_models({"sft": "sft", "rl": "rl"}, types.SimpleNamespace(dtype="float32"),
                           None, _samples(3), [], result, lambda _: None, None)
  pipe = result["rl_minus_sft_pipeline"]["ssim"]
  # Differences 0.1, 0.2, 0.0 on the pipeline alone.
  assert [pipe["sft"], pipe["rl"]] == pytest.approx([0.5, 0.6])
  assert pipe["se"] == pytest.approx(_expected_paired_se([0.5, 0.7, 0.6], [0.4, 0.5, 0.6]))
  # Every condition's figure is the one that mixes them.
  assert result["rl_minus_sft_se"]["ssim"] != pytest.approx(pipe["se"])


def test_the_machine_names_the_cores_a_pinned_run_had(monkeypatch):
  """A run pinned to one core (taskset) may train another model: the report said "2 cores"."""
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1}, raising=False)
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  assert eval_run.machine()["cpu"].endswith(", 1 of its 2 cores")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
  assert eval_run.machine()["cpu"].endswith(", 2 cores")
