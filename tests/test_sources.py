"""Tests of the random-access sources on small real files written here: image folder, TFDS
(a real ArrayRecord dataset prepared without TensorFlow), Robust-R1 JSONL pairs, VLMEvalKit TSV,
Hugging Face parquet, the shapes world, and the make_source factory."""

import base64
import csv
import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from robust_u1_jax import config_defaults
from robust_u1_jax.data import answer_format, bad_records, image_files
from robust_u1_jax.data import shapes
from robust_u1_jax.data import sources
from robust_u1_jax.data import sources_vqa
from robust_u1_jax.data import transforms
from robust_u1_jax.inference import reasoner


def _img(seed: int, h: int = 8, w: int = 6) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def _decode(record: dict) -> dict:
  return transforms.DecodeImages().map(record)


def _config(source: str, path="", **kw):
  d = config_defaults.get_data_config()
  d.source, d.path = source, str(path)
  d.update(kw)
  return d


# ---------------------------------------------------------------------------------------- folder

def test_image_folder_recursive_sorted_case_insensitive(tmp_path):
  (tmp_path / "b" / "deep").mkdir(parents=True)
  (tmp_path / "a").mkdir()
  arrays = {"a/x.png": _img(0), "b/deep/y.PNG": _img(1), "b/z.WebP": _img(2), "c.JPG": _img(3),
            "d.jpeg": _img(4)}
  for rel, a in arrays.items():
    fmt = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG", "jpeg": "JPEG"}[rel.rsplit(".")[1].lower()]
    Image.fromarray(a).save(tmp_path / rel, format=fmt, **({"lossless": True} if fmt == "WEBP"
                                                           else {}))
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "a" / "x.png.bak").write_bytes(b"x")
  # Hidden ones are not the user's images: a notebook's copies, macOS's resource forks.
  (tmp_path / ".ipynb_checkpoints").mkdir()
  Image.fromarray(_img(5)).save(tmp_path / ".ipynb_checkpoints" / "e.png")
  (tmp_path / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")

  src = sources.ImageFolderSource(tmp_path)
  assert len(src) == 5
  assert src.relpaths == sorted(arrays)
  for i, rel in enumerate(src.relpaths):
    rec = src[i]
    assert rec["index"] == i and rec["relpath"] == rel and rec["path"] == str(tmp_path / rel)
    assert isinstance(rec["image_bytes"], bytes)
    out = _decode(rec)
    assert out["image"].shape == (8, 6, 3) and out["image"].dtype == np.uint8
    if not rel.lower().endswith((".jpg", ".jpeg")):
      np.testing.assert_array_equal(out["image"], arrays[rel])
  assert src[-1]["relpath"] == src.relpaths[-1]
  with pytest.raises(IndexError):
    src[5]
  assert pickle.loads(pickle.dumps(src))[2]["image_bytes"] == src[2]["image_bytes"]
  assert len(sources.make_source(_config("folder", tmp_path))) == 5


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.ImageFolderSource(tmp_path / "nope")
  (tmp_path / "readme.md").write_text("x")
  (tmp_path / ".hidden").mkdir()
  (tmp_path / ".hidden" / "a.png").write_bytes(b"x")
  with pytest.raises(FileNotFoundError, match=r"no images.*\*\.webp"):
    sources.ImageFolderSource(tmp_path)
  assert not image_files.holds_images(str(tmp_path))


def test_image_folder_leaves_out_pipes_and_folders_met_again(tmp_path):
  # A named pipe called zz.png blocked the reader for good, Ctrl-C and SIGTERM ignored; a link to
  # the folder above made 40 files 1,558 records (each 19 levels of sub/loop/ deep).
  Image.fromarray(_img(1)).save(tmp_path / "a.png")
  (tmp_path / "sub").mkdir()
  Image.fromarray(_img(2)).save(tmp_path / "sub" / "b.png")
  os.mkfifo(tmp_path / "zz.png")
  os.symlink("..", tmp_path / "sub" / "loop")
  os.symlink("gone.png", tmp_path / "sub" / "dangling.png")  # kept: the reader names it
  (tmp_path / "elsewhere").mkdir()
  Image.fromarray(_img(3)).save(tmp_path / "elsewhere" / "c.png")
  os.symlink(tmp_path / "elsewhere", tmp_path / "sub" / "linked")  # followed once
  assert sorted(image_files.image_paths(str(tmp_path))) == [
      "a.png", "elsewhere/c.png", "sub/b.png", "sub/dangling.png"]


# ------------------------------------------------------------------------------------------ tfds

TFDS_IMAGES = {"train": [_img(10 + i, 6 + i, 5) for i in range(5)],
               "validation": [_img(20 + i, 7, 4) for i in range(2)]}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tensorflow_datasets as tfds

  class RobustU1TinyImages(tfds.core.GeneratorBasedBuilder):
    """Five train and two validation images with labels, stored as ArrayRecord."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split) for split in TFDS_IMAGES}

    def _generate_examples(self, split):
      # Encoded PNG bytes: TFDS encodes numpy images with TensorFlow, which is not installed.
      for i, a in enumerate(TFDS_IMAGES[split]):
        yield i, {"image": _png(a), "label": i % 3}

  data_dir = tmp_path_factory.mktemp("tfds")
  RobustU1TinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return str(data_dir)


def test_tfds_source_reads_array_record_without_tensorflow(tfds_dir):
  import importlib.util
  assert importlib.util.find_spec("tensorflow") is None

  src = sources.TfdsSource("robust_u1_tiny_images", "train", data_dir=tfds_dir)
  assert len(src) == 5
  seen = {}
  for i in range(len(src)):
    rec = src[i]
    assert rec["index"] == i and rec["path"] == "tfds:robust_u1_tiny_images/train"
    assert isinstance(rec["image_bytes"], bytes) and "image" not in rec
    seen[int(rec["label"])] = seen.get(int(rec["label"]), 0) + 1
    image = _decode(rec)["image"]
    # TFDS shuffles examples on disk: match each to one of the written images.
    assert any(image.shape == a.shape and np.array_equal(image, a) for a in TFDS_IMAGES["train"])
  assert seen == {0: 2, 1: 2, 2: 1}
  again = pickle.loads(pickle.dumps(src))
  assert again[3]["image_bytes"] == src[3]["image_bytes"]

  cfg = _config("tfds", "robust_u1_tiny_images", tfds_data_dir=tfds_dir)
  assert len(sources.make_source(cfg, split="validation")) == 2
  assert len(sources.make_source(cfg, split="train[:3]")) == 3


def test_tfds_source_errors(tfds_dir):
  with pytest.raises(ValueError, match="no feature 'img'.*image, label"):
    sources.TfdsSource("robust_u1_tiny_images", "train", data_dir=tfds_dir, image_key="img")
  with pytest.raises(ValueError, match="not a tfds.features.Image"):
    sources.TfdsSource("robust_u1_tiny_images", "train", data_dir=tfds_dir, image_key="label")
  with pytest.raises(ValueError, match="split 'test' cannot be opened"):
    sources.TfdsSource("robust_u1_tiny_images", "test", data_dir=tfds_dir)
  with pytest.raises(ValueError, match="'no_such_dataset_xyz' is unknown to TFDS and not prepared"):
    sources.TfdsSource("no_such_dataset_xyz", "train", data_dir=tfds_dir)
  # Not prepared there: said before TFDS warns of a missing variant folder.
  empty = os.path.join(tfds_dir, "empty")
  os.makedirs(empty, exist_ok=True)
  with pytest.raises(ValueError, match=f"'robust_u1_tiny_images:1.0.0' is not prepared in {empty}: "
                     f"no folder {empty}/robust_u1_tiny_images; prepare it there first, or give "
                     "data.tfds_data_dir$"):
    sources.TfdsSource("robust_u1_tiny_images:1.0.0", "train", data_dir=empty)


# ----------------------------------------------------------------------------------------- jsonl

def test_jsonl_pairs_relative_paths(tmp_path):
  (tmp_path / "imgs").mkdir()
  rows = []
  for i in range(3):
    Image.fromarray(_img(i)).save(tmp_path / "imgs" / f"c{i}.png")
    Image.fromarray(_img(100 + i)).save(tmp_path / "imgs" / f"t{i}.png")
    rows.append({"prompt": f"restore {i}", "image": f"imgs/c{i}.png",
                 "target_image": f"imgs/t{i}.png", "id": i})
  rows[2]["target_image"] = str(tmp_path / "imgs" / "t2.png")  # absolute paths work too
  lines = [json.dumps(r) for r in rows]
  (tmp_path / "pairs.jsonl").write_text(lines[0] + "\n\n" + lines[1] + "\n  \n" + lines[2])

  src = sources.JsonlSource(tmp_path / "pairs.jsonl")
  assert len(src) == 3  # blank lines are not rows
  rec = src[1]
  assert rec["prompt"] == "restore 1" and rec["id"] == 1 and rec["index"] == 1 and rec["line"] == 3
  assert rec["path"] == str(tmp_path / "imgs" / "c1.png")
  assert rec["target_image_path"] == str(tmp_path / "imgs" / "t1.png")
  out = _decode(rec)
  np.testing.assert_array_equal(out["image"], _img(1))
  np.testing.assert_array_equal(out["target_image"], _img(101))
  np.testing.assert_array_equal(_decode(src[2])["target_image"], _img(102))
  assert pickle.loads(pickle.dumps(src))[0]["prompt"] == "restore 0"
  assert len(sources.make_source(_config("jsonl", tmp_path / "pairs.jsonl"))) == 3

  paired = transforms.CorruptOnTheFly("none").map(out)
  np.testing.assert_array_equal(paired["clean"], _img(101))
  np.testing.assert_array_equal(paired["corrupted"], _img(1))


def test_jsonl_text_fields_are_checked_with_their_line(tmp_path):
  # A reasoning row with `question: 5` was blamed on its image, listing the record's inner keys.
  Image.fromarray(_img(0)).save(tmp_path / "c.png")
  pair = {"image": "c.png", "target_image": "c.png"}
  good = {**pair, "question": "Which shape?", "answer": "<ANSWER>A<ANSWER_END>",
          "options": ["circle", "square"]}
  rows = [good, {**good, "question": 5}, {**good, "answer": ""}, {**good, "options": "circle"},
          {**good, "options": [f"o{i}" for i in range(27)]}, {**good, "prompt": ["fix"]}, pair]
  (tmp_path / "rows.jsonl").write_text("\n".join(map(json.dumps, rows)))
  src = sources.make_source(_config("jsonl", tmp_path / "rows.jsonl"), stage="reason")
  assert src[0]["options"] == ["circle", "square"]
  reasons = [src[i][bad_records.SKIP] for i in range(1, len(rows))]
  assert reasons == ["line 2: 'question' is 5, not a non-empty text",
                     "line 3: 'answer' is '', not a non-empty text",
                     "line 4: 'options' is 'circle', not a list of non-empty texts",
                     "line 5: 'options' has 27 options; at most 26, one per letter",
                     "line 6: 'prompt' is ['fix'], not a text",
                     "line 7: missing key(s) question, answer (row has: image, target_image)"]
  assert all(src[i]["path"] == str(tmp_path / "rows.jsonl") for i in range(1, len(rows)))
  # SFT and RL read the pair and its prompt alone: whatever the question fields hold, they train.
  sft = sources.make_source(_config("jsonl", tmp_path / "rows.jsonl"))
  assert all(bad_records.SKIP not in sft[i] for i in (1, 2, 3, 4, 6))
  assert sft[5][bad_records.SKIP] == "line 6: 'prompt' is ['fix'], not a text"


# ------------------------------------------------------------------------------------------- TSV

def _write_tsv(path, header, rows, delimiter="\t"):
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)


def test_vqa_tsv_vlmevalkit(tmp_path):
  b64 = [base64.b64encode(_png(_img(i))).decode() for i in range(3)]
  header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category"]
  rows = [
      [101, b64[0], "What colour?", "", "red", "blue", "", "", "B", "color"],
      # A question over several lines with a tab (quoted by the writer), a hint, four options.
      [102, b64[1], 'Which\tshape is "it"?\nPick one.', "Look left.", "a", "b", "c", "d", "D",
       "shape"],
      # Option C empty, D present: the letters kept, A, B, D, as VLMEvalKit asks and scores it.
      [103, b64[2], "Count?", "nan", "one", "two", "", "four", "D", ""],
      # VLMEvalKit image reference: the image of row index 101.
      [104, "101", "Again?", "", "yes", "no", "", "", "A", "existence"],
  ]
  _write_tsv(tmp_path / "bench.tsv", header, rows)
  src = sources_vqa.VqaTsvSource(tmp_path / "bench.tsv")
  assert len(src) == 4 and src.option_columns == ["A", "B", "C", "D"]

  r0 = src[0]
  assert r0["id"] == "101" and r0["path"] == str(tmp_path / "bench.tsv") and r0["index"] == 0
  assert r0["questions"] == [{"question": "What colour?", "options": ["red", "blue"],
                              "answer": "B", "kind": "color", "hint": ""}]
  np.testing.assert_array_equal(_decode(r0)["image"], _img(0))
  q1 = src[1]["questions"][0]
  assert q1["question"] == 'Hint: Look left.\nWhich\tshape is "it"?\nPick one.'
  assert q1["options"] == ["a", "b", "c", "d"] and q1["answer"] == "D"
  assert "\nC. c\nD. d\n" in answer_format.format_question(q1)
  q2 = src[2]["questions"][0]
  assert q2["options"] == ["A. one", "B. two", "D. four"] and q2["answer"] == "D"
  assert q2["kind"] == "vqa" and "\nB. two\nD. four\n" in answer_format.format_question(q2)
  assert reasoner.extract_answer("<ANSWER>D<ANSWER_END>", q2["options"]) == "D"
  assert reasoner.extract_answer("<ANSWER>C<ANSWER_END>", q2["options"]) == ""
  np.testing.assert_array_equal(_decode(src[3])["image"], _img(0))
  assert pickle.loads(pickle.dumps(src))[1]["questions"] == src[1]["questions"]
  # Missing cells are the ones pandas reads as missing, as VLMEvalKit reads its TSVs: "None" and
  # "NA" are no options, "none" is one (an answer "C" to it was a bad row).
  _write_tsv(tmp_path / "none.tsv", header, [
      [1, b64[0], "Which?", "nan", "red", "None", "none", "NA", "C", ""]])
  q = sources_vqa.VqaTsvSource(tmp_path / "none.tsv")[0]["questions"][0]
  assert q["options"] == ["A. red", "C. none"] and q["answer"] == "C" and q["hint"] == ""
  assert len(sources.make_source(_config("vqa_tsv", tmp_path / "bench.tsv"))) == 4


def test_vqa_tsv_missing_required_column(tmp_path):
  _write_tsv(tmp_path / "t.tsv", ["index", "image", "A", "answer"], [[1, "aGk=", "x", "A"]])
  with pytest.raises(ValueError, match="lacks required column.*question.*columns are index, "
                                       "image, A, answer"):
    sources_vqa.VqaTsvSource(tmp_path / "t.tsv")


def test_vqa_csv_is_read_comma_separated_and_a_csv_named_tsv_is_refused(tmp_path):
  b64 = base64.b64encode(_png(_img(0))).decode()
  header = ["index", "image", "question", "A", "B", "answer"]
  rows = [[7, b64, "Which, of these?", "red, dark", "blue", "A"]]
  _write_tsv(tmp_path / "bench.csv", header, rows, delimiter=",")
  q = sources_vqa.VqaTsvSource(tmp_path / "bench.csv")[0]["questions"][0]
  assert q["question"] == "Which, of these?" and q["options"] == ["red, dark", "blue"]
  _write_tsv(tmp_path / "bench.tsv", header, rows, delimiter=",")
  with pytest.raises(ValueError, match="header has no tab but has commas.*ends in .csv"):
    sources_vqa.VqaTsvSource(tmp_path / "bench.tsv")


# --------------------------------------------------------------------------------------- parquet

def test_vqa_parquet_struct_images_and_option_lists(tmp_path):
  n = 5
  table = pa.table({
      "image": [{"bytes": _png(_img(i)), "path": f"{i}.png"} for i in range(n)],
      "question": [f"q{i}" for i in range(n)],
      "options": [["cat", "dog", "cow"]] * n,
      "answer": ["A", "C", "dog", "B", "cow"],  # letters or an option's text
      "category": ["animals"] * n,
  })
  pq.write_table(table, tmp_path / "mcq.parquet", row_group_size=2)  # 3 row groups
  src = sources_vqa.VqaParquetSource(tmp_path / "mcq.parquet")
  assert len(src) == n and len(src.groups) == 3
  assert [src[i]["questions"][0]["answer"] for i in range(n)] == ["A", "C", "B", "B", "C"]
  for i in range(n):
    np.testing.assert_array_equal(_decode(src[i])["image"], _img(i))
  assert src[4]["questions"][0]["options"] == ["cat", "dog", "cow"]


def test_vqa_parquet_letter_columns_int_answers_and_folders(tmp_path):
  (tmp_path / "ds").mkdir()
  a = pa.table({"index": [7, 8], "image": [_png(_img(0)), _png(_img(1))],
                "question": ["Which?", "Where?"], "hint": [None, "Outdoors."],
                "A": ["x", "left"], "B": ["y", "right"], "C": [None, "up"], "D": [None, None],
                "answer": ["B", "A"], "category": ["c1", None]})
  b = pa.table({"index": [9], "image": [base64.b64encode(_png(_img(2))).decode()],
                "question": ["Open?"], "hint": [None], "A": [None], "B": [None], "C": [None],
                "D": [None], "answer": ["a free-form answer"], "category": [None]},
               schema=pa.schema([("index", pa.int64()), ("image", pa.string()),
                                 ("question", pa.string()), ("hint", pa.string()),
                                 ("A", pa.string()), ("B", pa.string()), ("C", pa.string()),
                                 ("D", pa.string()), ("answer", pa.string()),
                                 ("category", pa.string())]))
  pq.write_table(a, tmp_path / "ds" / "test-00000-of-00002.parquet")
  pq.write_table(b, tmp_path / "ds" / "test-00001-of-00002.parquet")
  src = sources.make_source(_config("vqa_parquet", tmp_path / "ds"))
  assert len(src) == 3 and len(src.files) == 2
  r0, r1, r2 = src[0], src[1], src[2]
  assert r0["id"] == "7" and r0["questions"][0]["options"] == ["x", "y"]
  assert r0["questions"][0]["answer"] == "B" and r0["category"] == "c1"
  assert r1["questions"][0]["question"] == "Hint: Outdoors.\nWhere?"
  assert r1["questions"][0]["options"] == ["left", "right", "up"]
  assert r2["questions"][0] == {"question": "Open?", "options": [], "answer": "a free-form answer",
                                "kind": "vqa", "hint": ""}
  assert r2["path"].endswith("test-00001-of-00002.parquet") and r2["index"] == 2
  for i in range(3):
    np.testing.assert_array_equal(_decode(src[i])["image"], _img(i))
  assert pickle.loads(pickle.dumps(src))[1]["id"] == "8"


def test_vqa_parquet_answer_index_with_option_list(tmp_path):
  table = pa.table({"image": [_png(_img(0))] * 2, "question": ["a", "b"],
                    "choices": [["p", "q", "r"], ["s", "t"]], "answer": [2, 0]})
  pq.write_table(table, tmp_path / "t.parquet")
  src = sources_vqa.VqaParquetSource(tmp_path / "t.parquet")
  assert [src[i]["questions"][0]["answer"] for i in range(2)] == ["C", "A"]


# ------------------------------------------------------------------------------- shapes, factory

def test_shapes_source_and_factory():
  cfg = _config("shapes", shapes_size=50, image_size=64)
  train = sources.make_source(cfg)
  assert isinstance(train, shapes.ShapesWorld) and len(train) == 50
  rec = train[7]
  assert rec["image"].shape == (64, 64, 3) and rec["image"].dtype == np.uint8
  assert rec["index"] == 7 and rec["caption"] and rec["questions"]
  val = sources.make_source(cfg, split="validation")
  assert val.split == "validation" and len(val) == shapes.DEFAULT_SIZES["validation"]


def test_factory_errors():
  with pytest.raises(ValueError, match="valid sources are shapes, folder, tfds, jsonl, vqa_tsv, "
                                       "vqa_parquet"):
    sources.make_source(_config("webdataset", "x"))
  with pytest.raises(ValueError, match="needs data.path"):
    sources.make_source(_config("folder", ""))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.make_source(_config("jsonl", "/no/such/file.jsonl"))


def test_image_folder_takes_the_formats_recover_takes(tmp_path):
  from PIL import Image

  for name in ("a.bmp", "b.GIF", "c.tiff", "d.tif", "e.webp"):
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / name)
  (tmp_path / "notes.txt").write_text("x")
  source = sources.ImageFolderSource(tmp_path)
  assert len(source) == 5
  assert sorted(os.path.basename(str(source[i]["path"])) for i in range(5)) == [
      "a.bmp", "b.GIF", "c.tiff", "d.tif", "e.webp"]
