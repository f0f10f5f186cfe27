"""VQA benchmark tables as random-access sources: VLMEvalKit TSV (or CSV) and Hugging Face parquet.

Both give records shaped like the shapes world's, so one pipeline serves all of them:

  {'image_bytes', 'questions': [{'question', 'options', 'answer', 'kind', 'hint'}], 'id',
   'category', 'path' (the table), 'index' (row position)}

Options come from single-letter columns A, B, C, ... (missing ones dropped: a TSV's cells as pandas
reads them, `TSV_MISSING`, a parquet table's nulls; where that skips
a letter, A, B, D, the options keep their letters as 'D. text', as VLMEvalKit asks them) or from a
list column 'options' / 'choices'.
Without options (MMStar and RealWorldQA write them into the question), 'options' is empty and the
answer is kept as written. A hint (VLMEvalKit's `hint` column) is put before the question as
"Hint: ...". The answer may be a letter, a 0-based index into a list of options, or an option's
text, in any case where that is unambiguous; anything else in a multiple-choice row is a bad row.
A TSV is UTF-8 text (a byte-order mark is read past); its image is base64, another row's index
(VLMEvalKit's repeated images) or a list of one image.

A bad row (bad base64, missing or empty field, too few TSV fields, an answer that is no option)
gives a skip marker naming the table, the row and the reason. A table without a required column
raises at construction, listing the columns it has.
"""

import ast
import base64
import binascii
import csv
import glob
import io
import math
import os
import pathlib
import re
import sys
import threading

import numpy as np

from robust_u1_jax import config_lib
from robust_u1_jax.data.answer_format import LETTERS
from robust_u1_jax.data.bad_records import skip_record
from robust_u1_jax.data.record_files import LazyFile, check_index, line_spans

OPTION_LIST_COLUMNS = ("options", "choices")
# VLMEvalKit stores a repeated image once; other rows hold that row's `index` (<= 64 characters).
_MAX_IMAGE_REFERENCE = 64


class BadRow(ValueError):
  """A table row that cannot become a record; the message says why."""


# The cells pandas reads as missing (`read_csv`'s default na_values), as VLMEvalKit reads its TSVs:
# an option "NA" or "None" is no option there; "none" and "n.a." are texts. A parquet table's
# strings are texts, whatever they say.
TSV_MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                         "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                         "nan", "null"})


def _missing(value) -> bool:
  if value is None:
    return True
  if isinstance(value, float) and math.isnan(value):
    return True
  return isinstance(value, str) and not value.strip()


def _text(value) -> str:
  return "" if _missing(value) else str(value).strip()


def row_label(i: int, row_id=None, place: str = "") -> str:
  """'row i' in a message, with the table's own index where it differs from i, and `place` (its
  line, its row group): 'row 5 (index 105, line 7)'."""
  named = _text(row_id)
  parts = ([f"index {named}"] if named not in ("", str(i)) else []) + ([place] if place else [])
  return f"row {i} ({', '.join(parts)})" if parts else f"row {i}"


def vqa_record(*, image_bytes: bytes, question, options: list[tuple[str, str]], answer,
               hint=None, category=None, row_id=None, path: str, index: int, where: str = "",
               require_answer: bool = True) -> dict:
  """The record of one VQA row. `options` are (original letter, text); raises BadRow. `where`:
  the row's `row_label`, kept for what later finds the row bad (its image, say).

  Without require_answer a missing answer is kept as "" (benchmark test splits).
  """
  question = _text(question)
  if not question:
    raise BadRow("empty question")
  texts = [t for _, t in options]
  letters = [letter for letter, _ in options]
  # A table whose options skip a letter (A, B, D) keeps its letters, as VLMEvalKit asks and scores
  # it; options lettered A, B, C, ... in order stay bare texts.
  kept = letters != list(LETTERS[:len(letters)])
  answer_text = _text(answer)
  if _missing(answer):
    if require_answer:
      raise BadRow("missing answer")
  elif texts:
    if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
      if not 0 <= int(answer) < len(texts):
        raise BadRow(f"answer index {answer} is outside the {len(texts)} options")
      answer_text = (letters if kept else LETTERS)[int(answer)]
    elif (j := _find(answer_text, letters)) is not None:
      answer_text = (letters if kept else LETTERS)[j]
    elif (j := _find(answer_text, texts)) is not None:
      answer_text = (letters if kept else LETTERS)[j]
    else:
      raise BadRow(f"answer {answer_text!r} is neither a letter of the options "
                   f"({', '.join(letter for letter, _ in options)}) nor one of their texts")
  hint = _text(hint)
  category = _text(category)
  if kept:
    texts = [f"{letter}. {text}" for letter, text in options]
  q = {"question": f"Hint: {hint}\n{question}" if hint else question, "options": texts,
       "answer": answer_text, "kind": category or "vqa", "hint": hint}
  return {"image_bytes": image_bytes, "questions": [q], "id": _text(row_id) or str(index),
          "category": category, "path": path, "index": index,
          "where": where or row_label(index, row_id)}


def _find(answer: str, candidates: list[str]) -> int | None:
  """The position of `answer` among `candidates`: as written, else the one that matches it up to
  case ('a' for option A, 'yes' for 'Yes'), else None."""
  if answer in candidates:
    return candidates.index(answer)
  folded = [j for j, c in enumerate(candidates) if c.casefold() == answer.casefold()]
  return folded[0] if len(folded) == 1 else None


def _b64(value: str) -> bytes:
  data = base64.b64decode("".join(value.split()), validate=True)
  if not data:
    raise BadRow("empty image")
  return data


def _check_columns(path: str, columns: list[str], needed: list[str]) -> None:
  missing = [c for c in needed if c not in columns]
  if missing:
    raise config_lib.ConfigError(
        f"VQA table {path} lacks required column(s) {', '.join(missing)}; its "
        f"columns are {', '.join(columns)}")


def _letter_columns(columns: list[str]) -> list[str]:
  return [c for c in LETTERS if c in columns]


def _one_image(field: str) -> str:
  """A TSV image field written as a list (VLMEvalKit's multi-image rows): its one image, or
  BadRow for several."""
  try:
    images = ast.literal_eval(field)
  except (ValueError, SyntaxError):
    raise BadRow("image field starts with '[' but is not a list of images") from None
  if not isinstance(images, (list, tuple)) or not images:
    raise BadRow("image field is an empty list")
  if len(images) > 1:
    raise BadRow(f"{len(images)} images in one row; rows of one image are supported")
  return str(images[0]).strip()


# ------------------------------------------------------------------------------------------- TSV

class VqaTsvSource:
  """A VLMEvalKit benchmark TSV: index, image (base64), question, A..D, answer[, category, hint].

  Records are located by one scan of the file (quote-aware, so quoted fields may hold newlines
  and tabs, as pandas writes them; a stray unbalanced quote merges rows, exactly as pandas, which
  VLMEvalKit reads these files with, would) and parsed on access. Rows whose image is a short
  reference use the image of the row with that index, as VLMEvalKit does. require_answer=False
  accepts test splits without answers. A `.csv` file is read the same way, comma-separated.
  """

  def __init__(self, path: str | os.PathLike, *, require_answer: bool = True):
    self.path = str(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"VQA TSV file {self.path} does not exist")
    offsets, lengths, lines = line_spans(self.path, quoted=True)
    if len(offsets) < 2:
      what = "a header but no rows" if len(offsets) else "no header"
      raise config_lib.ConfigError(f"VQA TSV file {self.path} has {what}")
    self._file = LazyFile(self.path)
    self.offsets, self.lengths, self.lines = offsets[1:], lengths[1:], lines[1:]
    self.delimiter = "," if self.path.lower().endswith(".csv") else "\t"
    try:  # utf-8-sig: a byte-order mark (as Excel writes one) is not part of the first name
      self.columns = self._parse(offsets[0], lengths[0], encoding="utf-8-sig")
    except UnicodeDecodeError as e:
      raise config_lib.ConfigError(
          f"VQA table {self.path} is not UTF-8 text ({e.reason} at byte {e.start}): a benchmark "
          "table is a TSV or CSV in UTF-8, as VLMEvalKit writes them, or a .parquet file"
      ) from None
    if len(self.columns) == 1 and self.delimiter == "\t" and "," in self.columns[0]:
      raise config_lib.ConfigError(
          f"VQA table {self.path}: its header has no tab but has commas; a comma-separated "
          "table is read as such when its name ends in .csv")
    _check_columns(self.path, self.columns, ["question", "image"] + (["answer"] * require_answer))
    self.option_columns = _letter_columns(self.columns)
    self.require_answer = require_answer
    self._by_id = None
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_by_id"], state["_lock"] = None, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.offsets)

  def __repr__(self) -> str:
    return f"VqaTsvSource({self.path!r}, {len(self)} rows)"

  def _parse(self, offset, length, encoding: str = "utf-8") -> list[str]:
    text = self._file.read(int(offset), int(length)).decode(encoding)
    if csv.field_size_limit() < sys.maxsize // 2:
      csv.field_size_limit(sys.maxsize // 2)  # base64 images are far beyond csv's 128 KiB default
    rows = list(csv.reader(io.StringIO(text), delimiter=self.delimiter))
    return rows[0] if rows else []

  def _row(self, i: int) -> dict[str, str]:
    fields = self._parse(self.offsets[i], self.lengths[i])
    if len(fields) != len(self.columns):
      missing = self.columns[len(fields):]
      raise BadRow(f"{len(fields)} fields for {len(self.columns)} columns"
                   + (f" (missing column(s) {', '.join(missing)})" if missing else ""))
    return dict(zip(self.columns, fields))

  def _image_of(self, row_id: str) -> str:
    with self._lock:
      if self._by_id is None:
        if "index" not in self.columns:
          raise BadRow(f"image is a {len(row_id)}-character reference, but the table has no "
                       "index column to resolve it")
        by_id = {}
        for j in range(len(self)):
          try:
            by_id.setdefault(self._row(j)["index"], j)
          except (BadRow, UnicodeDecodeError, OSError):
            continue  # a bad row is reported when it is read itself
        self._by_id = by_id
    if row_id not in self._by_id:
      if "/" in row_id or os.path.splitext(row_id)[1]:
        raise BadRow(f"image {row_id!r} looks like a file path; a TSV row carries its image as "
                     "base64 (or another row's index, as VLMEvalKit stores a repeated image)")
      raise BadRow(f"image refers to row index {row_id!r}, which is not in the table")
    image = self._row(self._by_id[row_id])["image"]
    if len(image) <= _MAX_IMAGE_REFERENCE:
      raise BadRow(f"image refers to row index {row_id!r}, whose image is itself a reference")
    return image

  def __getitem__(self, i) -> dict:
    i = check_index(i, len(self), repr(self))
    line = f"line {int(self.lines[i])}"
    where = row_label(i, None, line)
    try:
      row = {k: None if v in TSV_MISSING else v for k, v in self._row(i).items()}
      where = row_label(i, row.get("index"), line)
      image = (row["image"] or "").strip()
      if not image:
        raise BadRow("empty image")
      if image.startswith("["):
        image = _one_image(image)
      if len(image) <= _MAX_IMAGE_REFERENCE:
        image = self._image_of(image)
      try:
        image_bytes = _b64(image)
      except (binascii.Error, ValueError) as e:
        raise BadRow(f"bad base64 in column 'image' ({e})") from None
      options = [(c, _text(row[c])) for c in self.option_columns if not _missing(row[c])]
      return vqa_record(image_bytes=image_bytes, question=row["question"], options=options,
                        answer=row.get("answer"), hint=row.get("hint"),
                        category=row.get("category"), row_id=row.get("index"), path=self.path,
                        where=where,
                        index=i, require_answer=self.require_answer)
    except BadRow as e:
      return skip_record(f"{where}: {e}", self.path, i)
    except UnicodeDecodeError as e:
      return skip_record(f"{where}: not UTF-8 text ({e})", self.path, i)
    except OSError as e:
      return skip_record(f"{where}: unreadable ({e.strerror or e})", self.path, i)


# --------------------------------------------------------------------------------------- parquet

# A Hugging Face dataset's shard names its split: data/test-00000-of-00002.parquet (the hub's
# layout; a fingerprint may follow the count), or sits in a folder named for it
# (default/test/0000.parquet, the parquet converter's).
_SHARD = re.compile(r"^(.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
_SPLIT_FOLDERS = ("train", "test", "validation", "val", "dev", "testmini")


def is_pattern(path: str) -> bool:
  """Whether a table's path is a glob pattern of parquet shards (`data/test-*.parquet`)."""
  return any(ch in path for ch in "*?[")


def _split_of(file: str) -> str | None:
  shard = _SHARD.match(os.path.basename(file))
  if shard:
    return shard.group(1)
  folder = os.path.basename(os.path.dirname(file))
  return folder if folder in _SPLIT_FOLDERS else None


def _check_one_split(folder: str, files: list[str]) -> None:
  """A folder of parquet shards is one table: a dataset's folder holding several splits (its
  train and test shards) would mix them silently."""
  splits = {}
  for f in files:
    splits.setdefault(_split_of(f), f)
  splits.pop(None, None)
  if len(splits) > 1:
    name = "test" if "test" in splits else min(splits)
    first = splits[name]
    shards = f"{name}-*.parquet" if _SHARD.match(os.path.basename(first)) else "*.parquet"
    pattern = os.path.join(os.path.dirname(first), shards)
    raise config_lib.ConfigError(
        f"{folder}: holds the shards of several splits ({', '.join(sorted(splits))}), which one "
        f"table would mix; give one split's: a pattern such as '{pattern}', a folder of its "
        "shards alone or one .parquet file")


class VqaParquetSource:
  """Hugging Face parquet VQA tables: one .parquet file, or every .parquet under a folder.

  Columns: image ({'bytes', 'path'} struct as `datasets` writes it, raw bytes, or base64 text),
  question, answer, options as A..D columns or a list column 'options' / 'choices', optional
  index/id, category, hint. Reads one row group at a time (the last two stay cached per process),
  so sequential access to a large file touches each group once.
  """

  def __init__(self, path: str | os.PathLike, *, require_answer: bool = True):
    import pyarrow as pa  # deferred: only this source needs pyarrow
    import pyarrow.parquet as pq

    self.path = str(path)
    p = pathlib.Path(self.path)
    if is_pattern(self.path):  # one split's shards: data/test-*.parquet
      self.files = sorted(f for f in glob.glob(self.path, recursive=True)
                          if f.endswith(".parquet"))
      if not self.files:
        raise FileNotFoundError(f"no .parquet files match {self.path}")
    elif p.is_dir():
      self.files = [str(f) for f in sorted(p.rglob("*.parquet"))]
      if not self.files:
        raise FileNotFoundError(f"folder {self.path} holds no .parquet files")
      _check_one_split(self.path, self.files)
    elif p.is_file():
      self.files = [self.path]
    else:
      raise FileNotFoundError(f"VQA parquet path {self.path} does not exist")
    groups, columns = [], None
    for f in self.files:
      try:
        meta = pq.ParquetFile(f).metadata
      except pa.ArrowException as e:  # not parquet, or cut short
        raise config_lib.ConfigError(f"{f}: not a readable parquet file ({e})") from None
      names = list(meta.schema.to_arrow_schema().names)
      _check_columns(f, names, ["question", "image"] + (["answer"] * require_answer))
      if columns is not None and names != columns:
        raise config_lib.ConfigError(
            f"parquet files of {self.path} differ in columns: {self.files[0]} has "
            f"{', '.join(columns)}; {f} has {', '.join(names)}")
      columns = columns or names
      groups += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    self.columns = columns
    self.require_answer = require_answer
    self.option_columns = _letter_columns(columns)
    self.list_column = next((c for c in OPTION_LIST_COLUMNS if c in columns), None)
    wanted = ["image", "question", "answer", "hint", "category", "index", "id",
              *self.option_columns, self.list_column]
    self.read_columns = [c for c in wanted if c and c in columns]
    self.groups = [(f, g) for f, g, n in groups if n]
    self.starts = np.cumsum([0] + [n for _, _, n in groups if n]).astype(np.int64)
    self._cache: dict[int, object] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __repr__(self) -> str:
    return f"VqaParquetSource({self.path!r}, {len(self)} rows in {len(self.files)} file(s))"

  def _group(self, k: int):
    import pyarrow.parquet as pq

    with self._lock:
      if k in self._cache:
        return self._cache[k]
    file, g = self.groups[k]
    table = pq.ParquetFile(file).read_row_group(g, columns=self.read_columns)
    with self._lock:
      while len(self._cache) >= 2:
        self._cache.pop(next(iter(self._cache)))
      self._cache[k] = table
    return table

  def _image_bytes(self, value, file: str) -> bytes:
    if isinstance(value, dict):
      if value.get("bytes"):
        return bytes(value["bytes"])
      if value.get("path"):
        image_path = os.path.join(os.path.dirname(os.path.abspath(file)), value["path"])
        try:
          with open(image_path, "rb") as f:
            return f.read()
        except OSError as e:
          raise BadRow(f"image file {image_path}: {e.strerror or e}") from None
      raise BadRow("image struct has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
      if not value:
        raise BadRow("empty image")
      return bytes(value)
    if isinstance(value, str) and value.strip():
      try:
        return _b64(value)
      except (binascii.Error, ValueError) as e:
        raise BadRow(f"bad base64 in column 'image' ({e})") from None
    if value is None or isinstance(value, str):
      raise BadRow("missing image")
    raise BadRow(f"image of type {type(value).__name__}: not image bytes, a base64 string or a "
                 "{bytes, path} struct")

  def __getitem__(self, i) -> dict:
    i = check_index(i, len(self), repr(self))
    k = int(np.searchsorted(self.starts, i, side="right") - 1)
    file, group = self.groups[k]
    place = f"row group {group} of {os.path.basename(file)}"
    where = row_label(i, None, place)
    try:
      row = self._group(k).slice(i - int(self.starts[k]), 1).to_pylist()[0]
    except Exception as e:  # pylint: disable=broad-except
      # pyarrow reports damaged pages with assorted error types; the rows are lost, not the run.
      return skip_record(f"{where}: unreadable ({type(e).__name__}: {e})", file, i)
    row_id = row.get("index", row.get("id"))
    where = row_label(i, row_id, place)
    try:
      image_bytes = self._image_bytes(row["image"], file)
      if self.list_column and isinstance(row.get(self.list_column), (list, tuple)):
        options = [(LETTERS[j], _text(t)) for j, t in enumerate(row[self.list_column])]
      else:
        options = [(c, _text(row[c])) for c in self.option_columns if not _missing(row[c])]
      return vqa_record(image_bytes=image_bytes, question=row["question"], options=options,
                        answer=row.get("answer"), hint=row.get("hint"),
                        category=row.get("category"), row_id=row_id, path=file, index=i,
                        where=where,
                        require_answer=self.require_answer)
    except BadRow as e:
      return skip_record(f"{where}: {e}", file, i)
