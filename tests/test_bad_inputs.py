"""Bad input never crashes a run and is never dropped silently: real broken files and rows become
skip markers, and SkipTracker counts them, logs them, and stops a run past max_skip_ratio naming
the worst files."""

import base64
import csv
import io
import json
import logging
import pickle

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from robust_u1_jax import config_lib
from robust_u1_jax.data import bad_records
from robust_u1_jax.data import sources
from robust_u1_jax.data import sources_vqa
from robust_u1_jax.data import transforms


def _png(seed=0, h=8, w=8) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(
      buf, format="PNG")
  return buf.getvalue()


def _jpeg(seed=0, h=64, w=64) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(
      buf, format="JPEG", quality=90)
  return buf.getvalue()


@pytest.fixture
def broken_folder(tmp_path):
  """Four good images and six broken ones, as files."""
  for i in range(4):
    (tmp_path / f"good{i}.png").write_bytes(_png(i))
  (tmp_path / "truncated.jpg").write_bytes(_jpeg()[:300])  # cut just after the headers
  (tmp_path / "truncated_late.JPEG").write_bytes(_jpeg()[:2 * len(_jpeg()) // 3])  # mid-scan
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "text.png").write_text("this is not a PNG, just text\n")
  (tmp_path / "header_only.png").write_bytes(_png()[:40])
  (tmp_path / "fake.webp").write_bytes(b"RIFF\x10\x00\x00\x00WEBPVP8 garbage")
  return tmp_path


def _reason_of(marker) -> str:
  assert bad_records.is_skip(marker), marker
  return marker[bad_records.SKIP]


# ---------------------------------------------------------------------------------- broken files

def test_broken_image_files_become_markers(broken_folder):
  src = sources.ImageFolderSource(broken_folder)
  decode = transforms.DecodeImages()
  out = {src.relpaths[i]: decode.map(src[i]) for i in range(len(src))}
  for i in range(4):
    assert out[f"good{i}.png"]["image"].shape == (8, 8, 3)
  assert "empty file (0 bytes)" in _reason_of(out["empty.png"])
  assert "not an image" in _reason_of(out["text.png"])
  for name in ("truncated.jpg", "truncated_late.JPEG"):
    assert "cannot decode" in _reason_of(out[name]) and "truncated" in _reason_of(out[name]).lower()
  for name in ("header_only.png", "fake.webp"):
    reason = _reason_of(out[name])
    assert reason.startswith("image: ")
  for name in ("empty.png", "text.png", "truncated.jpg", "truncated_late.JPEG", "header_only.png",
               "fake.webp"):
    assert out[name]["path"] == str(broken_folder / name)
    assert out[name]["index"] == src.relpaths.index(name)
  # Later transforms pass markers through untouched.
  marker = out["text.png"]
  assert transforms.ResizeImages(max_side=64, min_side=32, stride=16).map(marker) is marker
  assert transforms.CorruptOnTheFly("imagenet_c/fog", 2).map(marker) is marker


def test_unreadable_file_becomes_marker(broken_folder):
  src = sources.ImageFolderSource(broken_folder)
  (broken_folder / "good0.png").unlink()  # vanished after the listing
  rec = src[src.relpaths.index("good0.png")]
  assert "unreadable file" in _reason_of(rec)


# ----------------------------------------------------------------------------------- broken JSONL

def test_malformed_jsonl_rows_become_markers(tmp_path):
  (tmp_path / "c.png").write_bytes(_png(1))
  (tmp_path / "t.png").write_bytes(_png(2))
  good = {"prompt": "restore", "image": "c.png", "target_image": "t.png"}
  lines = [
      json.dumps(good),
      '{"prompt": "restore", "image": "c.png", "target_image": ',  # bad JSON (cut short)
      json.dumps({"prompt": "restore", "image": "c.png"}),  # missing key
      json.dumps({**good, "target_image": "gone.png"}),  # missing target file
      json.dumps(["c.png", "t.png"]),  # not an object
      json.dumps({**good, "image": None}),  # not a path
      json.dumps({**good, "image": "t.png"}),
  ]
  (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
  src = sources.JsonlSource(tmp_path / "d.jsonl")
  recs = [src[i] for i in range(len(src))]
  assert not bad_records.is_skip(recs[0]) and not bad_records.is_skip(recs[6])
  # One line number, the file's: the parser's own "line 1" counts within the row.
  assert _reason_of(recs[1]).startswith("line 2: bad JSON: Expecting value at column 56")
  assert "line 1" not in _reason_of(recs[1])
  assert "line 3: missing key(s) target_image" in _reason_of(recs[2])
  # Read from the JSONL's folder, which a relative path's message says.
  assert (f"line 4 of {tmp_path / 'd.jsonl'}: missing file for 'target_image': "
          f"{tmp_path / 'gone.png'} (a relative path is read from the JSONL's folder)"
          ) in _reason_of(recs[3])
  assert recs[3]["path"] == str(tmp_path / "gone.png") and recs[3]["index"] == 3
  assert "not an object" in _reason_of(recs[4])
  assert "'image' is None, not a file path" in _reason_of(recs[5])
  assert recs[1]["path"] == str(tmp_path / "d.jsonl")
  # A pair without its own prompt is a good row: the stage's instruction takes its place.
  (tmp_path / "p.jsonl").write_text(json.dumps({"image": "c.png", "target_image": "t.png"}) + "\n")
  assert not bad_records.is_skip(sources.JsonlSource(tmp_path / "p.jsonl")[0])
  # A row whose file exists but is not an image is caught by the decoder.
  (tmp_path / "t.png").write_text("oops")
  assert "target_image: not an image" in _reason_of(transforms.DecodeImages().map(src[0]))


# ----------------------------------------------------------------------------------- broken tables

def test_broken_tsv_rows_become_markers(tmp_path):
  good = base64.b64encode(_png(3)).decode()
  path = tmp_path / "b.tsv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "image", "question", "A", "B", "answer"])
    w.writerow([1, good, "ok?", "yes", "no", "A"])
    w.writerow([2, "!!not*base64" * 10, "q", "yes", "no", "A"])  # bad base64
    w.writerow([3, good, "q", "yes"])  # missing columns B and answer
    w.writerow([4, good, "q", "yes", "no", "E"])  # answer is no option
    w.writerow([5, good, "", "yes", "no", "A"])  # empty question
    w.writerow([6, "999", "q", "yes", "no", "A"])  # reference to a row that does not exist
    w.writerow([7, good, "q", "yes", "no", ""])  # no answer
  src = sources_vqa.VqaTsvSource(path)
  recs = [src[i] for i in range(len(src))]
  assert not bad_records.is_skip(recs[0])
  # Each bad row by its place, its line and the table's own index.
  assert "row 1 (index 2, line 3): bad base64 in column 'image'" in _reason_of(recs[1])
  assert "4 fields for 6 columns (missing column(s) B, answer)" in _reason_of(recs[2])
  assert "answer 'E' is neither a letter of the options (A, B)" in _reason_of(recs[3])
  assert "empty question" in _reason_of(recs[4])
  assert "row index '999', which is not in the table" in _reason_of(recs[5])
  assert "row 6 (index 7, line 8): missing answer" in _reason_of(recs[6])
  assert all(r["path"] == str(path) for r in recs[1:])
  assert [r["index"] for r in recs] == list(range(7))


def test_tables_as_users_export_them(tmp_path):
  """What real files hold: a byte-order mark, lowercase answers, one image written as a list,
  a file path where the image goes, a table that is not UTF-8 text."""
  good = base64.b64encode(_png(3)).decode()
  path = tmp_path / "excel.tsv"
  with open(path, "w", newline="", encoding="utf-8-sig") as f:  # Excel's UTF-8 starts with a BOM
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "image", "question", "A", "B", "answer"])
    w.writerow([10, good, "q", "yes", "no", "b"])  # a lowercase letter
    w.writerow([11, good, "q", "Yes", "No", "yes"])  # an option's text in another case
    w.writerow([12, repr([good]), "q", "yes", "no", "A"])  # one image, written as a list
    w.writerow([13, repr([good, good]), "q", "yes", "no", "A"])
    w.writerow([14, "images/r14.png", "q", "yes", "no", "A"])
    w.writerow([15, "10", "q", "yes", "no", "A"])  # the image of the row with index 10
  src = sources_vqa.VqaTsvSource(path)
  assert src.columns[0] == "index"  # not '\ufeffindex'
  recs = [src[i] for i in range(len(src))]
  assert [r["questions"][0]["answer"] for r in recs[:3]] == ["B", "A", "A"]
  assert recs[2]["image_bytes"] == _png(3) and recs[5]["image_bytes"] == _png(3)
  assert "2 images in one row; rows of one image are supported" in _reason_of(recs[3])
  assert "image 'images/r14.png' looks like a file path" in _reason_of(recs[4])
  for name, data in (("utf16.tsv", "index\timage\n".encode("utf-16")),
                     ("png.tsv", _png(0))):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(config_lib.ConfigError, match=f"{name} is not UTF-8 text"):
      sources_vqa.VqaTsvSource(tmp_path / name)


def test_bad_parquet_rows_are_named_by_the_table_s_id_too(tmp_path):
  table = pa.table({"image": [{"bytes": _png(0), "path": None}, {"bytes": None, "path": None}],
                    "question": ["a", "b"], "answer": ["x", "y"], "id": ["q7", "q8"]})
  pq.write_table(table, tmp_path / "ids.parquet")
  bad = sources_vqa.VqaParquetSource(tmp_path / "ids.parquet")[1]
  assert _reason_of(bad).startswith("row 1 (index q8, row group 0 of ids.parquet): ")


def test_broken_parquet_rows_become_markers(tmp_path):
  table = pa.table({
      "image": [{"bytes": _png(0), "path": None}, {"bytes": None, "path": None},
                {"bytes": None, "path": "missing.png"}, {"bytes": _png(1), "path": None},
                {"bytes": b"", "path": None}],
      "question": ["a", "b", "c", None, "e"],
      "answer": ["A", "A", "A", "A", "A"]})
  pq.write_table(table, tmp_path / "p.parquet")
  src = sources_vqa.VqaParquetSource(tmp_path / "p.parquet")
  recs = [src[i] for i in range(len(src))]
  assert not bad_records.is_skip(recs[0])
  assert "neither bytes nor path" in _reason_of(recs[1])
  assert f"image file {tmp_path / 'missing.png'}" in _reason_of(recs[2])
  assert "empty question" in _reason_of(recs[3])
  assert "neither bytes nor path" in _reason_of(recs[4])  # empty bytes are no image either

  b64 = pa.table({"image": ["%%%not base64%%%"], "question": ["q"], "answer": ["x"]})
  pq.write_table(b64, tmp_path / "b.parquet")
  assert "bad base64" in _reason_of(sources_vqa.VqaParquetSource(tmp_path / "b.parquet")[0])
  # An image column of numbers holds no image of a known form (it read "missing image (int)").
  ints = pa.table({"image": [7, None], "question": ["q", "r"], "answer": ["x", "y"]})
  pq.write_table(ints, tmp_path / "i.parquet")
  src = sources_vqa.VqaParquetSource(tmp_path / "i.parquet")
  assert _reason_of(src[0]).endswith("image of type int: not image bytes, a base64 string or a "
                                     "{bytes, path} struct")
  assert _reason_of(src[1]).endswith(": missing image")

  no_answer = pa.table({"image": [_png(0)], "question": ["q"], "choices": [["a", "b"]]})
  pq.write_table(no_answer, tmp_path / "n.parquet")
  with pytest.raises(ValueError, match=r"lacks required column\(s\) answer; its columns are "
                                       "image, question, choices"):
    sources_vqa.VqaParquetSource(tmp_path / "n.parquet")
  test_split = sources_vqa.VqaParquetSource(tmp_path / "n.parquet", require_answer=False)
  assert test_split[0]["questions"][0] == {"question": "q", "options": ["a", "b"], "answer": "",
                                           "kind": "vqa", "hint": ""}

  (tmp_path / "mixed").mkdir()
  pq.write_table(table, tmp_path / "mixed" / "0.parquet")
  pq.write_table(b64.append_column("hint", pa.array(["h"])), tmp_path / "mixed" / "1.parquet")
  with pytest.raises(ValueError, match="differ in columns"):
    sources_vqa.VqaParquetSource(tmp_path / "mixed")


# ------------------------------------------------------------------------------------ SkipTracker

def _records(n_good, bad_at=(), path="data/f{}.jpg"):
  out = []
  for i in range(n_good + len(bad_at)):
    if i in bad_at:
      out.append(bad_records.skip_record(f"broken #{i}", path.format(i), i))
    else:
      out.append({"index": i})
  return out


def test_tracker_counts_logs_and_drops(caplog):
  tracker = bad_records.SkipTracker(0.5, min_seen=10, name="train data")
  with caplog.at_level(logging.WARNING):
    kept = [r for r in _records(8, bad_at=(2, 5)) if tracker.filter(r)]
  assert [r["index"] for r in kept] == [0, 1, 3, 4, 6, 7, 8, 9]
  assert tracker.metrics() == {"skipped": 2, "seen": 10, "skip_ratio": 0.2}
  logged = "\n".join(m.getMessage() for m in caplog.records)
  assert "train data: bad record data/f2.jpg (index 2): broken #2" in logged
  assert "data/f5.jpg" in logged
  with caplog.at_level(logging.WARNING):  # each epoch meets a bad file again: the log says which
    bad_records.SkipTracker(0.5, name="train data").filter(
        {**_records(0, bad_at=(0,))[0], "epoch": 1})
  assert caplog.records[-1].getMessage() == ("train data: bad record data/f0.jpg (index 0, "
                                              "epoch 1): broken #0")
  assert tracker.worst()[0][:2] in (("data/f2.jpg", 1), ("data/f5.jpg", 1))
  assert [p for p, _, _ in tracker.recent()] == ["data/f2.jpg", "data/f5.jpg"]
  copy = pickle.loads(pickle.dumps(tracker))
  assert copy.metrics() == tracker.metrics() and copy.filter({"index": 11})


def test_a_short_run_says_what_it_skipped():
  """A run that ends before `min_seen` records (and no epoch) was never checked: it says so."""
  tracker = bad_records.SkipTracker(0.01, name="folder data (sft)",
                                    setting="data.max_skip_ratio")
  assert tracker.summary() is None
  for r in _records(12, bad_at=(2, 5, 8)):
    tracker.filter(r)
  assert tracker.summary() == (
      "folder data (sft): 3 of 15 records read were unreadable or unusable (20.00%), each logged "
      "as it was read; past data.max_skip_ratio (1.00%), which stops a run once 100 records or a "
      "whole epoch were read, more than this run read")
  # A whole epoch read ahead of a short run's last batch: its check raised where no step took it.
  epoch = bad_records.SkipTracker(0.01, name="d", epoch_size=4, setting="data.max_skip_ratio")
  with pytest.raises(bad_records.TooManyBadRecords):
    for r in _records(3, bad_at=(1,)):
      epoch.filter(r)
  assert epoch.summary().endswith(
      "past data.max_skip_ratio (1.00%), which stops a run once 100 records or a whole epoch were "
      "read, as the records read ahead of this run's last batch were: the run had ended")
  lenient = bad_records.SkipTracker(0.5, name="d")
  lenient.filter(_records(0, bad_at=(0,))[0])
  lenient.filter({"index": 1})
  assert lenient.summary() == ("d: 1 of 2 records read were unreadable or unusable (50.00%), "
                               "each logged as it was read")


def test_one_early_bad_file_does_not_stop_a_run():
  tracker = bad_records.SkipTracker(0.01, min_seen=100)
  kept = sum(tracker.filter(r) for r in _records(499, bad_at=(0,)))
  assert kept == 499 and tracker.metrics()["skip_ratio"] == pytest.approx(1 / 500)
  tracker.end_epoch()  # 0.2% is fine at the end too


def test_too_many_bad_records_names_the_worst_files():
  tracker = bad_records.SkipTracker(0.01, min_seen=100, keep=3)
  recs = _records(94, bad_at=())
  # One table with many bad rows, and two single bad files.
  recs += [bad_records.skip_record(f"row {i}: bad base64", "bench.tsv", i) for i in range(4)]
  recs += [bad_records.skip_record("not an image", "img/a.png", 7)]
  for r in recs:
    tracker.filter(r)  # 5 of 99 bad: no verdict before min_seen records
  assert tracker.seen == 99
  with pytest.raises(bad_records.TooManyBadRecords) as e:
    tracker.filter(bad_records.skip_record("truncated", "img/b.jpg", 9))
  msg = str(e.value)
  assert "6 of 100 records were unreadable" in msg and "max_skip_ratio 1.00%" in msg
  worst = msg.split("Worst files:")[1]
  assert worst.index("bench.tsv: 4 bad record(s), latest index 3: row 3: bad base64") < \
      worst.index("img/")
  # Each of the last 3 skips is its file's latest, shown above: not listed twice (it was).
  assert "img/b.jpg: 1 bad record(s), latest index 9: truncated" in worst
  assert msg.count("img/b.jpg") == 1 and "recent skips" not in msg

  # A table's earlier bad rows among the last skips are listed below its line.
  tracker = bad_records.SkipTracker(0.01, min_seen=100, keep=3)
  for r in _records(94, bad_at=()):
    tracker.filter(r)
  with pytest.raises(bad_records.TooManyBadRecords) as e:
    for i in range(6):
      tracker.filter(bad_records.skip_record(f"row {i}: bad base64", "bench.tsv", i))
  worst, recent = str(e.value).split("Worst files:")[1].split("Other recent skips:")
  assert worst.strip() == "bench.tsv: 6 bad record(s), latest index 5: row 5: bad base64"
  assert [line.strip() for line in recent.strip().splitlines()] == [
      "bench.tsv (index 3): row 3: bad base64", "bench.tsv (index 4): row 4: bad base64"]


def test_ratio_crossed_before_min_seen_is_caught_at_min_seen():
  tracker = bad_records.SkipTracker(0.01, min_seen=100)
  for r in _records(0, bad_at=(0, 1, 2)):
    tracker.filter(r)
  for i in range(96):
    tracker.filter({"index": i})
  with pytest.raises(bad_records.TooManyBadRecords, match="3 of 100"):
    tracker.filter({"index": 96})


def test_small_dataset_checked_at_end_of_epoch():
  recs = _records(18, bad_at=(3, 11))  # 20 records: fewer than min_seen
  tracker = bad_records.SkipTracker(0.01, min_seen=100)
  assert sum(tracker.filter(r) for r in recs) == 18  # no verdict mid-epoch
  with pytest.raises(bad_records.TooManyBadRecords, match="2 of 20"):
    tracker.end_epoch()
  auto = bad_records.SkipTracker(0.01, min_seen=100, epoch_size=20)
  with pytest.raises(bad_records.TooManyBadRecords, match="2 of 20"):
    for r in recs:
      auto.filter(r)


def test_grain_pipeline_end_to_end(broken_folder):
  src = sources.ImageFolderSource(broken_folder)  # 4 good, 6 broken
  tracker = bad_records.SkipTracker(0.9, min_seen=5, epoch_size=len(src))
  ds = grain.MapDataset.source(src).map(transforms.DecodeImages()).to_iter_dataset().filter(
      tracker)
  images = [r["image"] for r in ds]
  assert len(images) == 4 and tracker.metrics()["seen"] == 10
  strict = bad_records.SkipTracker(0.01, min_seen=5)
  ds = grain.MapDataset.source(src).map(transforms.DecodeImages()).to_iter_dataset().filter(
      strict)
  with pytest.raises(bad_records.TooManyBadRecords, match="Worst files"):
    list(ds)


def test_a_bad_record_is_replaced_by_a_good_one_drawn_from_its_index_and_epoch():
  made = []

  def make_record(index, epoch):
    made.append((index, epoch))
    return ({"index": index, "epoch": epoch} if index % 3 else
            bad_records.skip_record("bad", f"f{index}", index, epoch))

  tracker = bad_records.SkipTracker(0.5, enforce=False)  # counts; the caller enforces
  replace = bad_records.ReplaceBadRecords(tracker, make_record, num_records=100, seed=0)
  bad = bad_records.skip_record("truncated", "f6.jpg", 6, epoch=2)
  got = replace.map(bad)
  assert not bad_records.is_skip(got) and got["epoch"] == 2 and got["index"] % 3
  assert made[-1] == (got["index"], 2) and all(e == 2 for _, e in made)
  assert tracker.metrics() == {"skipped": 1, "seen": 1, "skip_ratio": 1.0}
  with pytest.raises(bad_records.TooManyBadRecords, match="1 of 1 records over 2 processes"):
    tracker.check(1, 1, final=True, where=" over 2 processes")
  assert replace.map(bad) == got  # a function of the bad record (and the seed) alone
  assert replace.map({"index": 7, "epoch": 0}) == {"index": 7, "epoch": 0}

  hopeless = bad_records.ReplaceBadRecords(
      tracker, lambda i, e: bad_records.skip_record("bad", "x", i, e), num_records=100, seed=0)
  # Several processes (the tracker not enforcing): past the 64 draws, up to 4096 records after
  # the bad one in order, so no process gives up alone.
  with pytest.raises(bad_records.TooManyBadRecords, match="so are the 64 records drawn to "
                     "replace it and the 100 after it: nearly all"):
    hopeless.map(bad)
  rare = bad_records.ReplaceBadRecords(
      tracker, lambda i, e: ({"index": i, "epoch": e} if i == 4000 else
                             bad_records.skip_record("bad", "x", i, e)), num_records=10**6, seed=0)
  assert rare.map(bad)["index"] == 4000  # 64 draws from a million miss it; the scan finds it
  # One process stops after the draws: nobody waits for it, and nearly all its data is bad.
  alone = bad_records.SkipTracker(0.99)
  with pytest.raises(bad_records.TooManyBadRecords, match="drawn to replace it: nearly all"):
    bad_records.ReplaceBadRecords(alone, rare.make_record, num_records=10**6, seed=0).map(bad)
  with pytest.raises(ValueError, match="without its source index and epoch"):
    replace.map(bad_records.skip_record("bad", "x", 3))


def test_tracker_argument_checks():
  with pytest.raises(ValueError, match="max_skip_ratio"):
    bad_records.SkipTracker(1.5)
  with pytest.raises(ValueError, match="min_seen"):
    bad_records.SkipTracker(0.1, min_seen=0)


def test_an_image_too_narrow_for_the_robust_r1_degradations_is_a_bad_record():
  """A 300 x 1000 photo under the tiny resize rule is 16 x 64: the pipeline's degradations need
  sides of 32, so the record is counted as bad, not a crash of the run."""
  from robust_u1_jax.data import corrupt_groups

  rng = np.random.default_rng(0)
  wide = {"image": rng.integers(0, 256, (16, 64, 3), np.uint8), "index": 3, "path": "wide.jpg"}
  square = [{"image": rng.integers(0, 256, (64, 64, 3), np.uint8), "index": i,
             "path": f"{i}.png"} for i in range(2)]
  single = transforms.CorruptOnTheFly("robust_r1_pipeline", seed=0)
  marker = single.map(wide)
  assert bad_records.is_skip(marker) and marker["path"] == "wide.jpg"
  assert "64 x 16 pixels after the resize rule" in marker[bad_records.SKIP]
  # In a group, the others are corrupted as they would be alone.
  group = corrupt_groups.CorruptGroup(single).map([square[0], wide, square[1]])
  assert bad_records.is_skip(group[1]) and not any(map(bad_records.is_skip, group[::2]))
  for out, alone in zip(group[::2], map(single.map, square)):
    np.testing.assert_array_equal(out["corrupted"], alone["corrupted"])
  # ImageNet-C corruptions take any size.
  assert not bad_records.is_skip(transforms.CorruptOnTheFly("fog", 3, seed=0).map(wide))
