"""Packing variable-size samples into rows of a fixed token budget (data.token_budget > 0).

A sample of a stage is a sequence of blocks in the order the stage builds it (training/sft.py,
training/reasoning.py; docs/design.md#packed-sequences-and-the-attention-mask):

  sft, rl   [VAE: corrupted] [ViT: corrupted] [text: instruction] [VAE target: clean]
  reason    [VAE: corrupted] [ViT: corrupted] [text: question] [VAE: recovered] [ViT: recovered]
            [answer]   (the recovered image has the clean image's VAE size and the corrupted
            image's ViT size, so those fields stand in for it here)
  vqa       [ViT: corrupted] [text: question] [answer]

Text blocks are the tokenised `<|im_start|>..<|im_end|>` ids. An image block is
`<|vision_start|>` + one token per patch + `<|vision_end|>`: (H/vit_patch)(W/vit_patch) patches
for the ViT, (H/vae_stride)(W/vae_stride) latent patches for the VAE (8x downsampling, then 2x2
patchify, so vae_stride 16). `sample_layout` writes a sample as two parallel 1-D arrays:

  token_ids    int32: text ids (markers included); the pad id at image-patch positions
  token_types  int8: TEXT, ANSWER (text trained with cross-entropy), VIT, VAE, VAE_TARGET

These decide what fits in a row; the model inputs are rebuilt from the slots below by the stage
(`batch_samples` gives each row's samples), to the same token counts.

Rows are filled first-fit by Grain's `FirstFitPackIterDataset` (checkpointable: its state is the
parent position of the open packing round), so a row holds whole samples only; a sample longer
than the budget is refused with its index. A packed row has

  token_ids, token_types        (T,)  T = token_budget; PAD (0) type after the last sample
  segment_ids                   (T,)  int32, 1..n for the row's samples, 0 for padding
  positions                     (T,)  int32, 0.. within each sample (the model derives RoPE
                                      positions from token_types: one per image block)
  <image field>                 (S, Hc, Wc, 3) uint8: the k-th sample's image in slot k (k =
                                      segment id - 1), top-left on a canvas of the rule's
                                      maximum side; S = max samples per row
  <image field>_hw              (S, 2) int32: each slot's (height, width); (0, 0) when empty
  <text field>                  (S, L) int32: the k-th sample's token ids, right-padded with the
                                      pad id; L is the batch's longest, rounded up to a power of 2
  <text field minus _ids>_lengths (S,) int32
  <scalar field>                (S,) (index, epoch: -1 in empty slots; strings: '')
  num_samples                   ()    int32

The k-th image block of a type in segment s belongs to slot s-1 of that block's image field,
so the model can scatter patch embeddings with static shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

# Token types of a packed row.
PAD, TEXT, ANSWER, VIT, VAE, VAE_TARGET = 0, 1, 2, 3, 4, 5

# (token type, record field) per stage: text fields hold token ids, image fields images.
STAGE_LAYOUTS: dict[str, tuple[tuple[int, str], ...]] = {
    "sft": ((VAE, "corrupted"), (VIT, "corrupted_vit"), (TEXT, "instruction_ids"),
            (VAE_TARGET, "clean")),
    "reason": ((VAE, "corrupted"), (VIT, "corrupted_vit"), (TEXT, "question_ids"),
               (VAE, "clean"), (VIT, "corrupted_vit"), (ANSWER, "answer_ids")),
    "vqa": ((VIT, "corrupted_vit"), (TEXT, "question_ids"), (ANSWER, "answer_ids")),
}
STAGE_LAYOUTS["rl"] = STAGE_LAYOUTS["sft"]


def stage_layout(stage: str) -> tuple[tuple[int, str], ...]:
  if stage not in STAGE_LAYOUTS:
    raise ValueError(f"stage {stage!r} has no packing layout: allowed {', '.join(STAGE_LAYOUTS)}")
  return STAGE_LAYOUTS[stage]


def image_tokens(height: int, width: int, stride: int) -> int:
  """Patch tokens of an image block (markers excluded); sides must be multiples of stride."""
  if height % stride or width % stride:
    raise ValueError(f"image of {height} x {width} is not a multiple of the patch stride "
                     f"{stride}: resize it by the BAGEL rule first")
  return (height // stride) * (width // stride)


class SampleLayout(grain.transforms.Map):
  """Adds 'token_ids' and 'token_types' (the sample's packed sequence) to a record.

  Args:
    stage: 'sft', 'rl', 'reason' or 'vqa' (STAGE_LAYOUTS).
    vit_patch, vae_stride: pixels per ViT patch / per VAE latent token along a side.
    vision_start, vision_end, pad: token ids of the image markers and of padding.
    token_budget: refuses samples longer than one row, naming the record index.
  """

  def __init__(self, stage: str, *, vit_patch: int, vae_stride: int, vision_start: int,
               vision_end: int, pad: int, token_budget: int):
    self.layout = stage_layout(stage)
    self.strides = {VIT: int(vit_patch), VAE: int(vae_stride), VAE_TARGET: int(vae_stride)}
    self.vision_start, self.vision_end, self.pad = int(vision_start), int(vision_end), int(pad)
    self.token_budget = int(token_budget)

  def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
    ids, types = [], []
    for kind, field in self.layout:
      if field not in element:
        raise KeyError(f"packing layout needs record field {field!r}; the record has "
                       f"{sorted(element)}")
      value = np.asarray(element[field])
      if kind in (TEXT, ANSWER):
        ids.append(value.astype(np.int32).reshape(-1))
        types.append(np.full(value.size, kind, np.int8))
        continue
      n = image_tokens(value.shape[0], value.shape[1], self.strides[kind])
      ids.append(np.asarray([self.vision_start] + [self.pad] * n + [self.vision_end], np.int32))
      types.append(np.asarray([TEXT] + [kind] * n + [TEXT], np.int8))
    token_ids, token_types = np.concatenate(ids), np.concatenate(types)
    if token_ids.size > self.token_budget:
      raise ValueError(
          f"record {element.get('index', '?')} ({element.get('path', '')}) needs "
          f"{token_ids.size} tokens, more than data.token_budget={self.token_budget}: raise the "
          "budget or lower data.vae_max_side / data.vit_max_side")
    return {**element, "token_ids": token_ids, "token_types": token_types}


def min_sample_tokens(stage: str, *, vit_min_side: int, vit_patch: int, vae_min_side: int,
                      vae_stride: int, min_text_tokens: int = 2) -> int:
  """A lower bound on one sample's tokens: images at their minimum side, 2-token texts.

  (BAGEL's rule can shrink the short side of an extremely elongated image below min_side; such a
  sample still fits the slot count, which Grain caps with max_sequences_per_bin.)
  """
  total = 0
  for kind, _ in stage_layout(stage):
    if kind in (TEXT, ANSWER):
      total += min_text_tokens
    elif kind == VIT:
      total += (vit_min_side // vit_patch) ** 2 + 2
    else:
      total += (vae_min_side // vae_stride) ** 2 + 2
  return total


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
    out = {"token_ids": row["token_ids"], "token_types": row["token_types"],
           "segment_ids": row["token_ids_segment_ids"], "positions": row["token_ids_positions"]}
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
         pad_id: int, text_fields: Sequence[str] = ()) -> grain.IterDataset:
  """Records with 'token_ids'/'token_types' (SampleLayout) -> packed rows (module docstring).

  `num_rows` is the number of bins one packing round fills (the rows of one batch), so a batch of
  `num_rows` rows is one first-fit round over consecutive samples. Batch the rows with
  `CollateRows` when `text_fields` are kept.
  """
  meta = tuple(image_canvas) + tuple(scalar_fields) + tuple(text_fields)
  packed = grain.experimental.FirstFitPackIterDataset(
      parent, length_struct={"token_ids": token_budget, "token_types": token_budget},
      num_packing_bins=num_rows, shuffle_bins=False, meta_features=meta,
      padding_struct={"token_ids": pad_id, "token_types": PAD},
      max_sequences_per_bin=max_per_row)
  return packed.map(SlotRow(image_canvas, scalar_fields, max_per_row, text_fields))


def unpack_row(row: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The samples of one packed row: [{'token_ids', 'token_types', images cropped to their hw,
  text ids cut to their length, scalars}]."""
  samples = []
  for k in range(int(row["num_samples"])):
    sel = row["segment_ids"] == k + 1
    sample = {"token_ids": row["token_ids"][sel], "token_types": row["token_types"][sel]}
    for key, value in row.items():
      if key in sample or key in ("segment_ids", "positions", "num_samples"):
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
