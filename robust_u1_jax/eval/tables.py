"""Benchmark tables as the evaluation reads them: a VLMEvalKit TSV (or CSV) or Hugging Face parquet
file, folder or pattern of shards, each row's image decoded as the model takes it (kept whole at its
size by the model's resize rule, or cut to its centred square) and its question read as
`evaluation.benchmark_question` asks it; bad rows logged, left out and counted."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import numpy as np

from robust_u1_jax import config_inputs, config_lib
from robust_u1_jax.eval.evaluation import Sample, benchmark_question
from robust_u1_jax.inference import images as images_lib

BAD_ROWS_LISTED = 10  # a benchmark's bad rows the report names (all are logged)


def open_table(path: str):
  """The source of a VLMEvalKit TSV (or CSV) or Hugging Face parquet benchmark file, or of a
  folder or pattern of parquet shards (its columns checked: a table without the ones it needs is a
  ConfigError naming them)."""
  from robust_u1_jax.data import sources_vqa

  parquet = (path.lower().endswith(config_inputs.PARQUET_EXTENSIONS) or os.path.isdir(path)
             or sources_vqa.is_pattern(path))
  return sources_vqa.VqaParquetSource(path) if parquet else sources_vqa.VqaTsvSource(path)


def read_table(path: str, count: int, max_skip_ratio: float = 0.01,
               keep: Callable[[int, Mapping[str, Any], np.ndarray], None] | None = None,
               log: bool = True, rules: images_lib.ImageRules | None = None,
               images: str = "whole") -> dict[str, Any]:
  """Reads the first `count` rows (0: all) of a benchmark file, decoding each image; calls
  `keep(row, record, image)` for each good row, its image as the model takes it (`model_image`,
  with `rules`; else as decoded). Returns what was read: {'rows': rows read, 'table_rows': the
  table's, 'bad_rows': how many were bad, 'bad': the first BAD_ROWS_LISTED of them as [row,
  reason]}.

  A bad row (unreadable, bad base64, an image PIL cannot read or with a side below the rules'
  smallest, which training skips too, or one narrower at the model's size than the Robust-R1
  degradations take; a question without its answer among the options) is logged with its row and
  reason (unless `log` is False); past `max_skip_ratio` of the rows read it raises
  `TooManyBadRecords`, naming them.
  """
  from robust_u1_jax.data import bad_records, transforms

  source = open_table(path)
  rows = min(count, len(source)) if count > 0 else len(source)
  # Logged here, once per row: the tracker's line would name the file twice and call the row's
  # place an index beside the table's own index column.
  tracker = bad_records.SkipTracker(max_skip_ratio, epoch_size=rows, name=f"benchmark {path}",
                                    setting="--config.max_skip_ratio", log=False)
  bad = []
  try:
    for i in range(rows):
      record = source[i]
      if not bad_records.is_skip(record):
        try:
          image = transforms.decode_image(record["image_bytes"])
          problem = rules and transforms.size_problem(image, rules.min_side,
                                                      images_lib.MIN_SIDE_SETTING)
          if rules and not problem:
            image = model_image(image, rules, images)
            problem = _too_narrow(image)
        except transforms.BadImageError as e:
          problem = str(e)
        if problem:
          record = bad_records.skip_record(f"{record['where']}: image: {problem}", path, i)
      if bad_records.is_skip(record):  # before the tracker, which raises on the last straw
        bad.append([i, record[bad_records.SKIP]])
        if log:
          logging.warning("benchmark %s: bad %s", path, record[bad_records.SKIP])
      if tracker.filter(record) and keep is not None:
        keep(i, record, image)
  except bad_records.TooManyBadRecords:
    # One line naming the rows: the tracker's own message lists files, and here the file is one.
    m = tracker.metrics()
    listed = "; ".join(reason for _, reason in bad[:BAD_ROWS_LISTED])
    more = f"; and {len(bad) - BAD_ROWS_LISTED} more" if len(bad) > BAD_ROWS_LISTED else ""
    fix = ("Fix or remove these rows, or raise it (--config.max_skip_ratio)"
           if not all(": not UTF-8 text" in reason for _, reason in bad) else
           "The table is not UTF-8 text, as VLMEvalKit writes its TSVs: convert it (e.g. iconv "
           "-f GBK -t UTF-8 in.tsv > out.tsv, naming its encoding)")
    raise bad_records.TooManyBadRecords(
        f"benchmark {path}: {m['skipped']} of {m['seen']} rows read were unreadable or unusable "
        f"({m['skip_ratio']:.2%} > max_skip_ratio {max_skip_ratio:.2%}): {listed}{more}. "
        f"{fix}") from None
  return {"rows": rows, "table_rows": len(source), "bad_rows": len(bad),
          "bad": bad[:BAD_ROWS_LISTED]}


def _too_narrow(image: np.ndarray) -> str | None:
  """Why the Robust-R1 degradations, which every benchmark intensity applies, cannot corrupt an
  image at the model's size (a long, narrow one, shrunk by the resize rule), or None."""
  from robust_u1_jax.data.corruptions import robust_r1_common

  h, w = image.shape[:2]
  if min(h, w) >= robust_r1_common.MIN_SIDE:
    return None
  return (f"{w} x {h} pixels at the model's image size: a side below the Robust-R1 "
          f"degradations' smallest {robust_r1_common.MIN_SIDE} (--config.benchmark_images=square "
          "cuts it square)")


def model_image(image: np.ndarray, rules: images_lib.ImageRules, images: str = "whole"
                ) -> np.ndarray:
  """A benchmark image as the evaluation gives it to the model: `images` 'whole', at its VAE size
  by the model's resize rule, as `recover` and `answer` take it; 'square', its centred square at
  the rule's largest side (one size for every image)."""
  from robust_u1_jax.data import transforms

  if images not in config_lib.BENCHMARK_IMAGES:
    raise ValueError(f"benchmark images {images!r}: one of "
                     f"{', '.join(config_lib.BENCHMARK_IMAGES)}")
  if images == "square":
    side = rules.vae_max_side
    image = transforms.resize_image(transforms.center_square(image), (side, side))
  return rules.at_vae_size(image)


def table_samples(path: str, count: int, rules: images_lib.ImageRules,
                  max_skip_ratio: float = 0.01, log: bool = True, images: str = "whole"
                  ) -> tuple[list[Sample], dict[str, Any]]:
  """The good rows among the first `count` of a benchmark file -> (samples, what was read, as
  `read_table` says), each image as `model_image` makes it. A bad row is left out of the scores.
  Whole images are batched by size (`Evaluator._batches`), each size its own compiled programs.
  """
  out = []

  def keep(i, record, image):
    # The table's own row id beside the question, for the answers file (run._benchmark).
    question = dict(benchmark_question(record["questions"][0]), id=record.get("id", str(i)))
    out.append(Sample(i, image, question, record.get("category", "")))

  read = read_table(path, count, max_skip_ratio, keep, log, rules, images)
  return out, read
