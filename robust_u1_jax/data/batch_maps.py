"""The input pipeline's Grain maps (data/pipeline.py): a record loaded from its source, its texts
tokenised, the fields a batch carries kept, records stacked into the batch schema (`Collate`, the
schema in pipeline.py's docstring), and a batch formatted into the model's rows (`FormatRows`).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from robust_u1_jax.data import bad_records
from robust_u1_jax.data import packing
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.data import transforms

IMAGE_FIELDS = ("clean", "corrupted", "corrupted_vit")
MIN_TEXT_PAD = 16


# ------------------------------------------------------------------------------- record transforms

class LoadRecord(grain.transforms.Map):
  """Source position -> the source's record (a dict, or a skip marker)."""

  def __init__(self, source):
    self.source = source

  def map(self, index):
    return self.source[int(index)]


class Tokenize(grain.transforms.Map):
  """Tokenises text fields into '<field>_ids', memoising repeated texts (instructions, prompts).

  Given a tokenizer directory instead of an object, it pickles as the path (Grain workers) and
  loads the tokenizer once per process. `widths` ({field: (tokens, the setting that fixes them)},
  `text_width_limits`) makes a record whose text is longer a bad record (`bad_records`), so one
  long answer does not stop a run hours in; `Collate` would refuse the batch.
  """

  def __init__(self, fields: Sequence[str], tok=None, tokenizer_dir: str = "",
               cache_size: int = 4096, widths: Mapping[str, tuple[int, str]] | None = None):
    self.fields, self.tokenizer_dir, self.cache_size = tuple(fields), tokenizer_dir, cache_size
    self.widths = dict(widths or {})
    self._tok, self._cache = tok, {}
    self._picklable_tok = tok is None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}
    if state["_picklable_tok"]:
      state["_tok"] = None
    return state

  def _ids(self, text: str) -> np.ndarray:
    ids = self._cache.get(text)
    if ids is None:
      if self._tok is None:
        self._tok = load_tokenizer(self.tokenizer_dir)
      ids = transforms.tokenize_text(self._tok, text)
      if len(self._cache) < self.cache_size:
        self._cache[text] = ids
    return ids

  def map(self, element):
    if bad_records.is_skip(element):
      return element
    out = dict(element)
    for field in self.fields:
      out[f"{field}_ids"] = ids = self._ids(out[field])
      width, setting = self.widths.get(field, (None, ""))
      if width is not None and len(ids) > width:
        where = (bad_records.line_place(element["line"], element.get("line_file"),
                                        element.get("path")) + ": " if "line" in element else "")
        return bad_records.skip_record(
            f"{where}the {field} text is {len(ids)} tokens, more than {setting} = {width}: raise "
            f"{setting} to hold it", element.get("path"), element.get("index"),
            element.get("epoch"))
    return out


def text_width_limits(fields: Sequence[str], text_pad_to: int | None,
                      text_widths: Mapping[str, int]) -> dict[str, tuple[int, str]]:
  """{field: (its fixed width, the setting that fixes it)}, which `Tokenize` refuses longer texts
  at and `Collate` pads to: data.text_widths.<field> first, else data.text_pad_to; a field of
  neither is padded to its batch's longest and has no limit."""
  limits = {}
  for field in fields:
    if text_widths.get(field):
      limits[field] = (int(text_widths[field]), f"data.text_widths.{field}")
    elif text_pad_to:
      limits[field] = (int(text_pad_to), "data.text_pad_to")
  return limits


_TOKENIZER_LOCK = threading.Lock()


def load_tokenizer(tokenizer_dir: str):
  """The tokenizer of `tokenizer_dir` ('' for the built-in one), loaded once per process."""
  # Grain's reader threads would otherwise race through transformers' lazy imports.
  with _TOKENIZER_LOCK:
    return _load_tokenizer_cached(tokenizer_dir)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(tokenizer_dir: str):
  return tokenizer_lib.load_tokenizer(tokenizer_dir or None)


class KeepFields(grain.transforms.Map):
  """Drops everything the batch does not carry (encoded bytes, object lists, raw texts)."""

  def __init__(self, fields: Sequence[str]):
    self.fields = tuple(fields)

  def map(self, element):
    if bad_records.is_skip(element):
      return element
    return {k: element[k] for k in self.fields}


# ---------------------------------------------------------------------------------------- collate

@dataclasses.dataclass(frozen=True)
class Collate:
  """Stacks per-sample records into the batch schema (module docstring)."""
  text_fields: tuple[str, ...]
  pad_id: int
  image_canvas: Mapping[str, tuple[int, int]] | None  # None: the source has one image size
  # field -> (fixed width, its setting), `text_width_limits`; other fields pad to a power of two
  widths: Mapping[str, tuple[int, str]] = dataclasses.field(default_factory=dict)

  def _images(self, key: str, images: list[np.ndarray]) -> np.ndarray:
    if self.image_canvas is None:
      shapes_seen = {im.shape for im in images}
      if len(shapes_seen) > 1:
        raise ValueError(f"batch field {key!r} holds images of sizes {sorted(shapes_seen)} from "
                         "a source declared to have one size")
      return np.stack(images)
    hc, wc = self.image_canvas[key]
    out = np.zeros((len(images), hc, wc, 3), np.uint8)
    for i, im in enumerate(images):
      out[i, :im.shape[0], :im.shape[1]] = im
    return out

  def _texts(self, key: str, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([len(s) for s in seqs], np.int32)
    field = key.removesuffix("_ids")
    width, setting = self.widths.get(field, (0, ""))
    width = width or packing.text_width(int(lengths.max()), MIN_TEXT_PAD)
    if lengths.max() > width:  # `Tokenize` makes such a record a bad record first
      raise ValueError(f"{setting} = {width}: a {field} text of {int(lengths.max())} tokens "
                       "reached the batch")
    out = np.full((len(seqs), width), self.pad_id, np.int32)
    for i, s in enumerate(seqs):
      out[i, :len(s)] = s
    return out, lengths

  def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    batch = {}
    for key in samples[0]:
      values = [s[key] for s in samples]
      if key in IMAGE_FIELDS:
        batch[key] = self._images(key, values)
        batch[f"{key}_hw"] = np.asarray([v.shape[:2] for v in values], np.int32)
      elif key.endswith("_ids") and key[:-4] in self.text_fields:
        batch[key], batch[f"{key[:-4]}_lengths"] = self._texts(key, values)
      elif isinstance(values[0], str):
        batch[key] = np.asarray(values)
      else:
        batch[key] = np.asarray(values, np.int32 if key in ("index", "epoch") else None)
    return batch


class FormatRows(grain.transforms.MapWithIndex):
  """Batch n -> `format_rows(batch, numpy Generator seeded with (seed, n))`."""

  def __init__(self, format_rows: Callable[[dict, np.random.Generator], Any], seed: int):
    self.format_rows, self.seed = format_rows, int(seed)

  def map_with_index(self, index: int, element):
    return self.format_rows(element, np.random.default_rng([self.seed, index]))
