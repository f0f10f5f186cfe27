"""Random-access data sources (Grain `RandomAccessDataSource`s): __len__ and __getitem__ -> dict.

Every record carries 'index' (its position in the source) and, where it comes from a file or a
table, 'path'. Images are returned encoded ('image_bytes', decoded by `transforms.DecodeImages`),
except the shapes world's, which are rendered arrays ('image'). A source never raises on a bad
input: an unreadable file or a malformed row gives a skip marker (`bad_records.skip_record`).
Problems with the whole source (no such folder, no images in it, a table without a required
column, an unknown TFDS dataset) raise at construction, naming the path and what is allowed.

  shapes       robust_u1_jax.data.shapes.ShapesWorld (rendered image, caption, questions)
  folder       ImageFolderSource: the image files (image_files.py) under a folder, recursively
  tfds         TfdsSource: any prepared TFDS dataset via tfds.data_source (ArrayRecord, no TF)
  jsonl        JsonlSource: Robust-R1 pairs {"prompt", "image", "target_image"} ("prompt"
               optional: the config's instruction), with "question" and "answer" for reasoning
  vqa_tsv      sources_vqa.VqaTsvSource: VLMEvalKit TSV with base64 images
  vqa_parquet  sources_vqa.VqaParquetSource: Hugging Face parquet (MMStar, RealWorldQA, ...)

Sources pickle without open file handles (Grain copies them into worker processes); files are
opened lazily in each process.
"""

import json
import os
import pathlib
import re
import threading


from robust_u1_jax import config_lib
from robust_u1_jax.data import answer_format, shapes, sources_vqa
from robust_u1_jax.data.bad_records import line_place, skip_record
from robust_u1_jax.data.record_files import LazyFile, check_index, line_spans
from robust_u1_jax.data.image_files import image_paths, looked_for

# A pair's own instruction, "prompt", is optional: rows without one get the stage's instruction.
PAIR_KEYS = ("image", "target_image")
# What the stages that answer questions read of a JSONL row besides (stage_fields.py); "options"
# is optional, one letter each.
ANSWERING_STAGES = ("reason", "vqa", "pretrain")
QUESTION_KEYS = ("question", "answer")


# ---------------------------------------------------------------------------------------- folder

class ImageFolderSource:
  """Every image file under `root`, recursively, sorted by path (`image_files.image_paths`:
  hidden files and folders left out).

  Record: image_bytes, path, relpath (POSIX, relative to root), index.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
    rel = list(image_paths(str(self.root)))
    if not rel:
      raise FileNotFoundError(f"image folder {self.root} holds no images: looked for "
                              f"{looked_for()}, recursively")
    self.relpaths = sorted(rel)  # sorted, so record i is the same file on every host

  def __len__(self) -> int:
    return len(self.relpaths)

  def __repr__(self) -> str:
    return f"ImageFolderSource({str(self.root)!r}, {len(self)} images)"

  def __getitem__(self, i) -> dict:
    i = check_index(i, len(self), "ImageFolderSource")
    path = self.root / self.relpaths[i]
    try:
      data = path.read_bytes()
    except OSError as e:
      return skip_record(f"unreadable file: {e.strerror or e}", path, i)
    return {"image_bytes": data, "path": str(path), "relpath": self.relpaths[i], "index": i}


# ------------------------------------------------------------------------------------------ tfds

class TfdsSource:
  """A split of a prepared TFDS dataset through `tfds.data_source` (ArrayRecord; no TensorFlow).

  The image feature `image_key` (a tfds.features.Image) is left encoded and returned as
  'image_bytes', so `DecodeImages` applies the same decoding and bad-input rules as for files;
  the other features are passed through. 'path' names the dataset and split ("tfds:name/split").
  `data_dir` None or "" means TFDS's default ($TFDS_DATA_DIR, else ~/tensorflow_datasets).
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               image_key: str = "image"):
    self.name, self.split, self.image_key = name, split, image_key
    self.data_dir = data_dir or None
    self.path = f"tfds:{name}/{split}"
    self._ds = None
    self._lock = threading.Lock()
    self.length = len(self._source())

  def _source(self):
    with self._lock:
      if self._ds is None:
        self._ds = self._open()
      return self._ds

  def _open(self):
    import tensorflow_datasets as tfds  # deferred: slow to import, only needed for this source

    where = self.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    base = re.split(r"[/:]", self.name)[0]
    folder = os.path.join(os.path.expanduser(where), base)
    if "://" not in where and not os.path.isdir(folder):  # TFDS would warn of a variant first
      try:
        tfds.builder_cls(base)
      except tfds.core.registered.DatasetNotFoundError:
        raise config_lib.ConfigError(
            f"TFDS dataset {self.name!r} is unknown to TFDS and not prepared in {where} (no "
            f"folder {folder})") from None
      how = " (ImageNet from its manual download)" if base.startswith("imagenet") else ""
      raise config_lib.ConfigError(
          f"TFDS dataset {self.name!r} is not prepared in {where}: no folder {folder}; prepare "
          f"it there first{how}, or give data.tfds_data_dir")
    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise config_lib.ConfigError(
          f"TFDS dataset {self.name!r} is unknown or unreadable in {where}: "
          f"{e}") from e
    features = builder.info.features
    if self.image_key not in features:
      raise config_lib.ConfigError(
          f"TFDS dataset {self.name!r} has no feature {self.image_key!r}: its "
          f"features are {', '.join(features.keys())}")
    if not isinstance(features[self.image_key], tfds.features.Image):
      raise config_lib.ConfigError(
          f"TFDS feature {self.name}:{self.image_key} is a "
          f"{type(features[self.image_key]).__name__}, not a tfds.features.Image")
    try:
      return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                              download=False,
                              decoders={self.image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except
      raise config_lib.ConfigError(
          f"TFDS dataset {self.name!r} split {self.split!r} cannot be opened from "
          f"{where} (prepare it there first, e.g. ImageNet from its manual "
          f"download; splits: {', '.join(builder.info.splits.keys()) or 'none'}): "
          f"{e}") from e

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"], state["_lock"] = None, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self.length

  def __repr__(self) -> str:
    return f"TfdsSource({self.path!r}, {self.length} records, data_dir={self.data_dir!r})"

  def __getitem__(self, i) -> dict:
    i = check_index(i, self.length, repr(self))
    try:
      example = dict(self._source()[i])
    except Exception as e:  # pylint: disable=broad-except
      # A damaged ArrayRecord chunk or example: this record is lost, not the run.
      return skip_record(f"unreadable TFDS record ({type(e).__name__}: {e})", self.path, i)
    record = {k: v for k, v in example.items() if k != self.image_key}
    record.update(image_bytes=example[self.image_key], path=self.path, index=i)
    return record


# ----------------------------------------------------------------------------------------- jsonl

class JsonlSource:
  """Rows of a JSONL file whose image fields are paths relative to the file's directory.

  Defaults are the Robust-R1 pairs {"prompt", "image", "target_image"}, "prompt" optional (the
  reasoning stage requires "question" and "answer" besides, and reads "options" when given,
  stage_fields.py). Record: the row's fields,
  with each image field f replaced by f + '_bytes' (the file's bytes) and its resolved path in
  'path' (for 'image') or f + '_path'; plus index and line (1-based). Blank lines are not rows.
  A row that is not JSON, not an object, lacks a required key, holds a text field that is not
  text (`text_field_error`), or names a missing or unreadable file gives a skip marker.
  """

  def __init__(self, path: str | os.PathLike, *, required: tuple[str, ...] = PAIR_KEYS,
               image_keys: tuple[str, ...] = ("image", "target_image")):
    self.path = str(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"JSONL file {self.path} does not exist")
    self.base = os.path.dirname(os.path.abspath(self.path))
    self.required, self.image_keys = tuple(required), tuple(image_keys)
    self.offsets, self.lengths, self.lines = line_spans(self.path)
    if not len(self.offsets):
      raise config_lib.ConfigError(f"JSONL file {self.path} has no rows")
    self._file = LazyFile(self.path)

  def __len__(self) -> int:
    return len(self.offsets)

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, {len(self)} rows)"

  def __getitem__(self, i) -> dict:
    i = check_index(i, len(self), repr(self))
    line = int(self.lines[i])

    def skip(reason, path=self.path):  # a bad image file is named; the line is in this file
      return skip_record(f"{line_place(line, self.path, path)}: {reason}", path, i)

    try:
      raw = self._file.read(int(self.offsets[i]), int(self.lengths[i]))
      row = json.loads(raw.rstrip())  # without its newline: an error's column is in the row
    except OSError as e:
      return skip(f"unreadable ({e.strerror or e})")
    except json.JSONDecodeError as e:  # not str(e): its "line 1" would count within the row
      return skip(f"bad JSON: {e.msg} at column {e.colno}")
    except ValueError as e:  # UnicodeDecodeError
      return skip(f"bad JSON: {e}")
    if not isinstance(row, dict):
      return skip(f"a JSON {type(row).__name__}, not an object with keys "
                  f"{', '.join(self.required)}")
    missing = [k for k in self.required if k not in row]
    if missing:
      return skip(f"missing key(s) {', '.join(missing)} (row has: {', '.join(row) or 'none'})")
    if error := text_field_error(row, questions=set(QUESTION_KEYS) <= set(self.required)):
      return skip(error)
    record = {k: v for k, v in row.items() if k not in self.image_keys}
    for key in self.image_keys:
      if key not in row:
        continue
      rel = row[key]
      if not isinstance(rel, str) or not rel:
        return skip(f"{key!r} is {rel!r}, not a file path")
      file = os.path.join(self.base, rel)
      try:
        with open(file, "rb") as f:
          record[f"{key}_bytes"] = f.read()
      except FileNotFoundError:
        beside = "" if os.path.isabs(rel) else " (a relative path is read from the JSONL's folder)"
        return skip(f"missing file for {key!r}: {file}{beside}", file)
      except OSError as e:
        return skip(f"unreadable file for {key!r}: {e.strerror or e}", file)
      record["path" if key == "image" else f"{key}_path"] = file
    record.update(index=i, line=line, line_file=self.path)  # a later map's bad-record line
    record.setdefault("path", self.path)
    return record


def text_field_error(row: dict, questions: bool = True) -> str | None:
  """What is wrong with a row's text fields, or None: "prompt" a text (empty: the config's
  instruction), and where the stage reads them (`questions`), "question" and "answer" non-empty
  texts, "options" a list of at most 26 non-empty texts: a stage that does not read them (SFT, RL)
  trains on a row whatever they hold."""
  def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

  if "prompt" in row and not isinstance(row["prompt"], str):
    return f"'prompt' is {shown(row['prompt'])}, not a text"
  if not questions:
    return None
  for key in QUESTION_KEYS:
    if key in row and not (isinstance(row[key], str) and row[key].strip()):
      return f"{key!r} is {shown(row[key])}, not a non-empty text"
  options = row.get("options")
  if options is not None:
    if not (isinstance(options, list) and options
            and all(isinstance(o, str) and o.strip() for o in options)):
      return f"'options' is {shown(options)}, not a list of non-empty texts"
    if len(options) > len(answer_format.LETTERS):
      return (f"'options' has {len(options)} options; at most {len(answer_format.LETTERS)}, "
              "one per letter")
  return None


# --------------------------------------------------------------------------------------- factory

def make_source(data_config, split: str | None = None, *, stage: str = "sft"):
  """The source data_config.source names. `split` overrides data_config.split.

  The split selects the shapes world's split and the TFDS split; folder, jsonl and table sources
  are selected by data_config.path alone; `stage` says which fields a JSONL row must hold. The
  shapes world's train split has data.shapes_size
  records (validation and test keep the world's default sizes) and a fixed world seed 0, so every
  run sees the same world.
  """
  source, split = data_config.source, split or data_config.split
  if source not in config_lib.SOURCES:
    raise ValueError(f"data.source={source!r} is unknown: valid sources are "
                     f"{', '.join(config_lib.SOURCES)}")
  if source == "shapes":
    size = data_config.shapes_size if split == "train" else None
    return shapes.ShapesWorld(split, size=size, image_size=data_config.image_size)
  if not data_config.path:
    raise ValueError(f"data.source={source!r} needs data.path (a "
                     f"{'TFDS dataset name' if source == 'tfds' else 'file or folder path'})")
  if source == "folder":
    return ImageFolderSource(data_config.path)
  if source == "tfds":
    image_key = data_config.get("tfds_image_key", "image")
    return TfdsSource(data_config.path, split, data_config.tfds_data_dir, image_key)
  if source == "jsonl":
    answers = stage in ANSWERING_STAGES
    return JsonlSource(data_config.path, required=PAIR_KEYS + (QUESTION_KEYS if answers else ()))
  if source == "vqa_tsv":
    return sources_vqa.VqaTsvSource(data_config.path)
  return sources_vqa.VqaParquetSource(data_config.path)
