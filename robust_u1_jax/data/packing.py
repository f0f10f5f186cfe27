"""Packing variable-size samples into rows of a fixed token budget (data.token_budget > 0).

A sample's size is that of the stage's own block list (`sequence.STAGE_BLOCKS`: SFT and RL
`[VAE][ViT][instruction][noisy VAE]`, reasoning `[VAE][ViT][question][VAE][ViT][answer]`, VQA
`[ViT][question][answer]`), measured by `sequence.lengths`, the same count the stage's rows are
built to (docs/design.md#packed-sequences-and-the-attention-mask). `SampleTokens` adds that count
to a record as a 'tokens' feature of ones, the only feature Grain packs.

Rows are filled first-fit by Grain's `FirstFitPackIterDataset` (checkpointable: its state is the
parent position of the open packing round), so a row holds whole samples only; a sample longer
than the budget is a bad record (`bad_records`: logged, counted and replaced). With
data.latent_budget = L > 0 a row also holds at most L latent (generation-expert) tokens and at
most T - L others, so the two experts' buffers together are one row (`bagel.bound_experts`). A
packed row has

  segment_ids                   (T,)  int32, 1..n where the row's samples go, 0 after them;
                                      T = token_budget
  latent_segment_ids            (L,)  int32, the same for the row's latent tokens (only with
                                      latent_budget > 0: its length gives the rows' split)
  <image field>                 (S, Hc, Wc, 3) uint8: the k-th sample's image in slot k (k =
                                      segment id - 1), top-left on a canvas of the rule's
                                      maximum side; S = max samples per row
  <image field>_hw              (S, 2) int32: each slot's (height, width); (0, 0) when empty
  <text field>                  (S, L) int32: the k-th sample's token ids, right-padded with the
                                      pad id; L is the batch's longest, rounded up to a power of 2
  <text field minus _ids>_lengths (S,) int32
  <scalar field>                (S,) (index, epoch: -1 in empty slots; strings: '')
  num_samples                   ()    int32

The stage builds the model's rows from the slots (`batch_samples` gives each row's samples), in
the pipeline's last map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from robust_u1_jax.data import bad_records
from robust_u1_jax.data import sequence


class SampleTokens(grain.transforms.Map):
  """Adds 'tokens' (ones, one per token of the sample's blocks) to a record.

  Args:
    stage: a stage of `sequence.STAGE_BLOCKS`.
    vit_patch, vae_stride: pixels per ViT patch / per VAE latent token along a side.
    token_budget: a sample longer than one row becomes a skip marker (a bad record) naming the
      setting to raise.
    latent_budget: > 0 adds 'latent_tokens' and 'und_tokens' (ones, the sample's latent tokens
      and the rest), packed within latent_budget and token_budget - latent_budget.
  """

  def __init__(self, stage: str, *, vit_patch: int, vae_stride: int, token_budget: int,
               latent_budget: int = 0):
    self.stage = stage
    self.blocks = sequence.stage_blocks(stage)
    self.strides = int(vit_patch), int(vae_stride)
    self.token_budget = int(token_budget)
    self.latent_budget = int(latent_budget)

  def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
    if bad_records.is_skip(element):
      return element
    try:
      blocks = self.blocks(element)
    except KeyError as e:
      raise KeyError(f"stage {self.stage!r} needs record field {e}; the record has "
                     f"{sorted(element)}") from None
    n, _, latent = sequence.lengths(blocks, *self.strides)
    # A record longer than a row (a long question or answer, most often) is a bad record: logged,
    # counted against data.max_skip_ratio and replaced, not a stop hours into a run. Where most
    # records are too long, the ratio stops the run with this reason.
    skip = lambda reason: bad_records.skip_record(reason, element.get("path"),
                                                  element.get("index"), element.get("epoch"))
    if n > self.token_budget:
      return skip(f"needs {n} tokens, more than data.token_budget={self.token_budget}: raise "
                  "the budget or lower data.vae_max_side / data.vit_max_side")
    out = {**element, "tokens": np.ones(n, np.int8)}
    if self.latent_budget:
      und_budget = self.token_budget - self.latent_budget
      if latent > self.latent_budget or n - latent > und_budget:
        return skip(f"needs {latent} latent and {n - latent} other tokens, more than "
                    f"data.latent_budget={self.latent_budget} / the {und_budget} left of "
                    f"data.token_budget={self.token_budget}: move the split or lower "
                    "data.vae_max_side / data.vit_max_side")
      out["latent_tokens"] = np.ones(latent, np.int8)
      out["und_tokens"] = np.ones(n - latent, np.int8)
    return out


def length_features(token_budget: int, latent_budget: int = 0) -> dict[str, int]:
  """The features `SampleTokens` adds and first-fit packs, with each one's budget per row."""
  if not latent_budget:
    return {"tokens": token_budget}
  return {"tokens": token_budget, "latent_tokens": latent_budget,
          "und_tokens": token_budget - latent_budget}


def min_sample_tokens(stage: str, *, vit_min_side: int, vit_patch: int, vae_min_side: int,
                      vae_stride: int, min_text_tokens: int = 2) -> int:
  """A lower bound on one sample's tokens: the stage's blocks of images at their minimum side and
  2-token texts.

  (BAGEL's rule can shrink the short side of an extremely elongated image below min_side; such a
  sample still fits the slot count, which Grain caps with max_sequences_per_bin.)
  """
  vae = np.zeros((vae_min_side, vae_min_side, 3), np.uint8)
  text = np.zeros(min_text_tokens, np.int32)
  smallest = {"clean": vae, "corrupted": vae,
              "corrupted_vit": np.zeros((vit_min_side, vit_min_side, 3), np.uint8),
              "instruction_ids": text, "question_ids": text, "answer_ids": text}
  return sequence.lengths(sequence.stage_blocks(stage)(smallest), vit_patch, vae_stride)[0]


class SlotRow(grain.transforms.Map):
  """Grain's packed row (meta features as per-row lists) -> fixed-shape slot arrays.

  Args:
    image_canvas: {image field: (canvas height, canvas width)}.
    scalar_fields: per-sample fields kept as (S,) arrays (numbers padded -1, strings '').
    max_per_row: S, the slot count (= max_sequences_per_bin).
    text_fields: per-sample token-id fields ('*_ids'), kept as a list per row until
      `collate_rows` pads them to the batch's width.
  """

  def __init__(self, image_canvas: Mapping[str, tuple[int, int]], scalar_fields: Sequence[str],
               max_per_row: int, text_fields: Sequence[str] = ()):
    self.image_canvas = {k: tuple(v) for k, v in image_canvas.items()}
    self.scalar_fields = tuple(scalar_fields)
    self.max_per_row = int(max_per_row)
    self.text_fields = tuple(text_fields)

  def map(self, row: Mapping[str, Any]) -> dict[str, Any]:
    out = {"segment_ids": row["tokens_segment_ids"]}
    if "latent_tokens_segment_ids" in row:
      out["latent_segment_ids"] = row["latent_tokens_segment_ids"]
    s = self.max_per_row
    n = None
    for field, (hc, wc) in self.image_canvas.items():
      images = row[field]
      n = len(images)
      canvas = np.zeros((s, hc, wc, 3), np.uint8)
      hw = np.zeros((s, 2), np.int32)
      for k, image in enumerate(images):
        h, w = image.shape[:2]
        if h > hc or w > wc:
          raise ValueError(f"{field} of {h} x {w} exceeds its packing canvas {hc} x {wc}")
        canvas[k, :h, :w] = image
        hw[k] = (h, w)
      out[field], out[f"{field}_hw"] = canvas, hw
    for field in self.scalar_fields:
      values = list(row[field])
      n = len(values)
      if values and isinstance(values[0], str):
        out[field] = np.asarray(values + [""] * (s - len(values)))
      else:
        out[field] = np.asarray(values + [-1] * (s - len(values)), np.int32)
    for field in self.text_fields:
      out[field] = [np.asarray(ids, np.int32).reshape(-1) for ids in row[field]]
    out["num_samples"] = np.int32(n or 0)
    return out


def text_width(longest: int, min_width: int = 16) -> int:
  """The padded width of a batch's texts: the next power of two >= longest, at least min_width
  (few distinct shapes to compile)."""
  return max(min_width, 1 << max(0, int(longest) - 1).bit_length())


class CollateRows:
  """Stacks packed rows into a batch; text fields become (B, S, L) plus (B, S) lengths."""

  def __init__(self, text_fields: Sequence[str], max_per_row: int, pad_id: int,
               min_width: int = 16):
    self.text_fields, self.max_per_row = tuple(text_fields), int(max_per_row)
    self.pad_id, self.min_width = int(pad_id), int(min_width)

  def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in self.text_fields}
    for field in self.text_fields:
      width = text_width(max((len(ids) for r in rows for ids in r[field]), default=1),
                         self.min_width)
      ids = np.full((len(rows), self.max_per_row, width), self.pad_id, np.int32)
      lengths = np.zeros((len(rows), self.max_per_row), np.int32)
      for b, row in enumerate(rows):
        for k, seq in enumerate(row[field]):
          ids[b, k, :len(seq)], lengths[b, k] = seq, len(seq)
      batch[field], batch[f"{field[:-4]}_lengths"] = ids, lengths
    return batch


def pack(parent: grain.IterDataset, *, token_budget: int, num_rows: int, max_per_row: int,
         image_canvas: Mapping[str, tuple[int, int]], scalar_fields: Sequence[str],
         text_fields: Sequence[str] = (), latent_budget: int = 0) -> grain.IterDataset:
  """Records with 'tokens' (SampleTokens) -> packed rows (module docstring).

  `num_rows` is the number of bins one packing round fills (the rows of one batch), so a batch of
  `num_rows` rows is one first-fit round over consecutive samples. Batch the rows with
  `CollateRows` when `text_fields` are kept. `latent_budget` > 0: a sample goes to a row only
  where its latent tokens and its other tokens both fit (SampleTokens with the same budget).
  """
  meta = tuple(image_canvas) + tuple(scalar_fields) + tuple(text_fields)
  lengths = length_features(token_budget, latent_budget)
  packed = grain.experimental.FirstFitPackIterDataset(
      parent, length_struct=lengths, num_packing_bins=num_rows, shuffle_bins=False,
      meta_features=meta, padding_struct={k: 0 for k in lengths},
      max_sequences_per_bin=max_per_row)
  return packed.map(SlotRow(image_canvas, scalar_fields, max_per_row, text_fields))


def unpack_row(row: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The samples of one packed row: [{images cropped to their hw, text ids cut to their length,
  scalars}]."""
  samples = []
  for k in range(int(row["num_samples"])):
    sample = {}
    for key, value in row.items():
      if key in ("segment_ids", "latent_segment_ids", "num_samples"):
        continue
      sample.update(_slot(row, key, value, k))
    samples.append(sample)
  return samples


def _slot(batch: Mapping[str, Any], key: str, value: Any, k: int) -> dict[str, Any]:
  """Field `key` of sample k (axis 0 of `value`), cropped or cut to its valid extent."""
  if f"{key}_hw" in batch:
    h, w = batch[f"{key}_hw"][k]
    return {key: value[k, :h, :w]}
  if key.endswith("_ids") and f"{key[:-4]}_lengths" in batch:
    return {key: value[k, :batch[f"{key[:-4]}_lengths"][k]]}
  if key.endswith("_hw") or key.endswith("_lengths"):
    return {}
  return {key: value[k]}


def batch_samples(batch: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
  """Any pipeline batch -> per row, its samples (dicts of one sample's fields, images cropped to
  their valid size). A packed batch (data.token_budget > 0) has rows of several samples; an
  unpacked one has a row per sample."""
  if "num_samples" in batch:
    rows = len(batch["num_samples"])
    return [unpack_row({key: value[r] for key, value in batch.items()}) for r in range(rows)]
  n = len(next(iter(batch.values())))
  return [[{k: v for key, value in batch.items() for k, v in _slot(batch, key, value, i).items()}]
          for i in range(n)]
