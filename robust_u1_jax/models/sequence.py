"""Host-side construction of packed BAGEL rows (`bagel.SequenceInputs`) from block lists.

A sample is a list of blocks, in order:
  Text(ids)          causal text; RoPE advances one position per token
  Vit(image)         `<|vision_start|>` + SigLIP patches + `<|vision_end|>`, bidirectional
  Latent(h, w)       `<|vision_start|>` + VAE latent tokens + `<|vision_end|>` of an image of
                     h x w pixels, clean conditioning (t = 0), bidirectional
  Latent(h, w, noisy=True)  the same as a generation target: nothing else attends to it
An image block shares one RoPE position, then the counter advances by one
(docs/design.md#packed-sequences-and-the-attention-mask).
Latent values are not built here: the train step VAE-encodes a stack of images per row and gathers
each latent token from it (`latent_image_index`), so rows only carry where each token goes. Images
of different sizes share one stack by sitting top-left on a common canvas (BAGEL pads its VAE
batches the same way): a block's tokens are the top-left h x w region of its canvas' latent grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from robust_u1_jax import pixels
from robust_u1_jax.models import attention_mask, siglip
from robust_u1_jax.models.bagel import LATENT, PAD, TEXT, VIT, BagelConfig, SequenceInputs
from robust_u1_jax.models.bagel import latent_position_ids


@dataclasses.dataclass(frozen=True)
class Text:
  ids: Sequence[int]


@dataclasses.dataclass(frozen=True)
class Vit:
  # (H, W, 3) uint8 pixels (shipped as such; the model maps them to [-1, 1]), or float already in
  # [-1, 1]; sides multiples of the ViT patch.
  image: np.ndarray


@dataclasses.dataclass(frozen=True)
class Latent:
  height: int
  width: int
  noisy: bool = False
  image: int = 0  # which of the sample's VAE-encoded images feeds this block
  # (height, width) of the canvas that image is encoded on, top-left; None: the image's own size.
  canvas: tuple[int, int] | None = None


Block = Text | Vit | Latent


@dataclasses.dataclass(frozen=True)
class Markers:
  """Token ids that wrap image blocks."""
  vision_start: int
  vision_end: int


@dataclasses.dataclass
class _Sample:
  text_ids: list
  kind: list
  source_index: list
  positions: list
  layout_blocks: list  # (attention kind, length)
  vit_patches: list
  vit_position_ids: list
  vit_segment_ids: list
  latent_position_ids: list
  latent_seq_offsets: list
  latent_image: list  # per latent block: (image number, token indices within its canvas grid)


def _build(blocks: Sequence[Block], config: BagelConfig, markers: Markers, position0: int,
           patch_dtype=np.uint8):
  s = _Sample([], [], [], [], [], [], [], [], [], [], [])
  pos, n_vit, n_lat, images = position0, 0, 0, 0

  def image_block(kind_id, count, source_start, attention_kind):
    nonlocal pos
    start = len(s.kind)
    s.text_ids += [markers.vision_start] + [0] * count + [markers.vision_end]
    s.kind += [TEXT] + [kind_id] * count + [TEXT]
    s.source_index += [0] + list(range(source_start, source_start + count)) + [0]
    s.positions += [pos] * (count + 2)
    s.layout_blocks.append((attention_kind, count + 2))
    pos += 1
    return start + 1

  for block in blocks:
    if isinstance(block, Text):
      ids = list(block.ids)
      s.text_ids += ids
      s.kind += [TEXT] * len(ids)
      s.source_index += [0] * len(ids)
      s.positions += list(range(pos, pos + len(ids)))
      s.layout_blocks.append(("text", len(ids)))
      pos += len(ids)
    elif isinstance(block, Vit):
      image = np.asarray(block.image)
      if patch_dtype != np.uint8:  # a batch with float images: all go as floats in [-1, 1]
        image = pixels.to_float(image, model_range=True) if image.dtype == np.uint8 else image
      patches, pos_ids = siglip.patchify(image.astype(patch_dtype), config.vit.patch_size,
                                         config.vit.max_patches_per_side)
      images += 1
      image_block(VIT, len(patches), n_vit, "image")
      s.vit_patches.append(patches)
      s.vit_position_ids.append(np.asarray(pos_ids, np.int32))
      s.vit_segment_ids.append(np.full(len(patches), images, np.int32))
      n_vit += len(patches)
    elif isinstance(block, Latent):
      ids = latent_position_ids(block.height, block.width, config.latent_downsample,
                                config.max_latent_size)
      first = image_block(LATENT, len(ids), n_lat, "noisy" if block.noisy else "image")
      s.latent_position_ids.append(ids)
      s.latent_seq_offsets.append(np.arange(first, first + len(ids), dtype=np.int32))
      s.latent_image.append((block.image, _canvas_index(block, config.latent_downsample)))
      n_lat += len(ids)
    else:
      raise TypeError(f"unknown block {block!r}; use Text, Vit or Latent")
  return s


def _canvas_index(block: Latent, downsample: int) -> tuple[np.ndarray, int]:
  """(indices of the block's latent tokens in its canvas' token grid, tokens per canvas)."""
  ch, cw = block.canvas or (block.height, block.width)
  if block.height > ch or block.width > cw:
    raise ValueError(f"latent block of {block.height} x {block.width} exceeds its canvas "
                     f"{ch} x {cw}")
  gh, gw, cgw = block.height // downsample, block.width // downsample, cw // downsample
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
  return (rows * cgw + cols).reshape(-1).astype(np.int32), (ch // downsample) * cgw


def build_rows(rows: Sequence[Sequence[Sequence[Block]]], config: BagelConfig, markers: Markers,
               *, seq_len: int, max_vit: int, max_latent: int,
               images_per_sample: int | None = None) -> SequenceInputs:
  """Packs rows (each a list of samples, each a list of blocks) into numpy `SequenceInputs`.

  Samples in a row are isolated from each other by the mask and their positions restart at 0
  (`Bagel.prefill` adds the cache's next position, so block inputs serve any context).

  The row's VAE images are stacked sample after sample: sample k's image j is stacked image
  k * images_per_sample + j (default: as many as the sample's highest `Latent.image` + 1). All
  latent blocks of a batch must share one canvas size, the size of the stacked images.
  """
  patch_dim = 3 * config.vit.patch_size ** 2
  # ViT patches travel as uint8 pixels (a quarter of float32's bytes; the model maps them to
  # [-1, 1]), unless some block of the batch holds a float image: then all go as float32.
  floats = any(isinstance(b, Vit) and np.asarray(b.image).dtype != np.uint8
               for samples in rows for blocks in samples for b in blocks)
  patch_dtype = np.float32 if floats else np.uint8
  out = {k: [] for k in ("text_ids", "token_kind", "source_index", "positions", "layout",
                         "vit_patches", "vit_position_ids", "vit_segment_ids",
                         "latent_position_ids", "latent_seq_index", "latent_image_index")}
  canvas_tokens: set[int] = set()
  for r, samples in enumerate(rows):
    built = [_build(blocks, config, markers, 0, patch_dtype) for blocks in samples]
    layout, _ = attention_mask.pack_samples([b.layout_blocks for b in built], seq_len)
    text_ids, kind, source, positions = [], [], [], []
    vit_p, vit_pos, vit_seg, lat_pos, lat_idx, lat_img = [], [], [], [], [], []
    vit_offset = lat_offset = seg_offset = image_offset = 0
    for b in built:
      offset = len(kind)
      text_ids += b.text_ids
      kind += b.kind
      positions += b.positions
      source += [i + (vit_offset if k == VIT else lat_offset if k == LATENT else 0)
                 for i, k in zip(b.source_index, b.kind)]
      vit_p += b.vit_patches
      vit_pos += b.vit_position_ids
      vit_seg += [seg + seg_offset for seg in b.vit_segment_ids]
      seg_offset += len(b.vit_segment_ids)
      lat_pos += b.latent_position_ids
      lat_idx += [o + offset for o in b.latent_seq_offsets]
      for image, (index, per_canvas) in b.latent_image:
        canvas_tokens.add(per_canvas)
        lat_img.append((image + image_offset) * per_canvas + index)
      # The next sample's images follow this sample's in the row's stack of encoded images.
      image_offset += images_per_sample or max((i + 1 for i, _ in b.latent_image), default=0)
      vit_offset += sum(len(p) for p in b.vit_patches)
      lat_offset += sum(len(p) for p in b.latent_position_ids)
    if len(kind) > seq_len or vit_offset > max_vit or lat_offset > max_latent:
      raise ValueError(f"row {r}: {len(kind)} tokens, {vit_offset} ViT patches and {lat_offset} "
                       f"latent tokens exceed seq_len={seq_len}, max_vit={max_vit}, "
                       f"max_latent={max_latent}")
    pad = seq_len - len(kind)
    out["text_ids"].append(np.asarray(text_ids + [0] * pad, np.int32))
    out["token_kind"].append(np.asarray(kind + [PAD] * pad, np.int32))
    out["source_index"].append(np.asarray(source + [0] * pad, np.int32))
    out["positions"].append(np.asarray(positions + [0] * pad, np.int32))
    out["layout"].append(layout)
    out["vit_patches"].append(_pad(vit_p, max_vit, (patch_dim,), patch_dtype))
    out["vit_position_ids"].append(_pad(vit_pos, max_vit, (), np.int32))
    out["vit_segment_ids"].append(_pad(vit_seg, max_vit, (), np.int32))
    out["latent_position_ids"].append(_pad(lat_pos, max_latent, (), np.int32))
    out["latent_seq_index"].append(_pad(lat_idx, max_latent, (), np.int32))
    out["latent_image_index"].append(_pad(lat_img, max_latent, (), np.int32))
  if len(canvas_tokens) > 1:
    raise ValueError(f"latent blocks of one batch index canvases of {sorted(canvas_tokens)} "
                     "tokens: give every Latent block the same canvas")
  stacked = {k: (attention_mask.stack_layouts(v) if k == "layout" else np.stack(v))
             for k, v in out.items()}
  return SequenceInputs(**stacked)


def _pad(parts: list, length: int, tail: tuple, dtype) -> np.ndarray:
  out = np.zeros((length,) + tail, dtype)
  if parts:
    joined = np.concatenate(parts).astype(dtype)
    out[:len(joined)] = joined
  return out


def lengths(blocks: Sequence[Block], config: BagelConfig) -> tuple[int, int, int]:
  """(tokens, ViT patches, latent tokens) a sample occupies, from the block sizes alone."""
  tokens = vit = latent = 0
  for block in blocks:
    if isinstance(block, Text):
      tokens += len(block.ids)
    elif isinstance(block, Vit):
      p = config.vit.patch_size
      n = (block.image.shape[0] // p) * (block.image.shape[1] // p)
      vit, tokens = vit + n, tokens + n + 2
    elif isinstance(block, Latent):
      d = config.latent_downsample
      n = (block.height // d) * (block.width // d)
      latent, tokens = latent + n, tokens + n + 2
    else:
      raise TypeError(f"unknown block {block!r}; use Text, Vit or Latent")
  return tokens, vit, latent
