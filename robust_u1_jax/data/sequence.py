"""The model's inputs as the data side emits them: block lists -> packed `bagel.SequenceInputs`.

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

A stage's sample layout (`STAGE_BLOCKS`: a pipeline sample -> its blocks) is the one source of a
sample's size: the packer measures samples with it (`lengths`), and the stage's row function
builds the rows from the same blocks, as the pipeline's last map (data/pipeline.py), so the
model's inputs are computed once, in Grain, with the token kinds of `bagel` (TEXT, VIT, LATENT,
PAD) as the only token-type numbering.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class Open(Text):
  """The `<|im_start|>` alone, before an image the model makes itself: the release's reasoner
  opens a text block after the prompt, and the model's first token there, `<|vision_start|>`,
  starts the recovery (docs/design.md#reasoning-and-the-answer-format)."""


Block = Text | Vit | Latent


@dataclasses.dataclass(frozen=True)
class Markers:
  """Token ids that wrap image blocks, and the one that ends a reply (`<|endoftext|>`, where the
  release's reasoner stops; -1: not trained)."""
  vision_start: int
  vision_end: int
  end_of_text: int = -1


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


def strides(config: BagelConfig) -> tuple[int, int]:
  """(pixels per ViT patch, pixels per latent token) along a side: `lengths`' strides of a model
  (a data config's `vit_patch`, `vae_stride`, checked equal at start-up by run_setup)."""
  return config.vit.patch_size, config.latent_downsample


def lengths(blocks: Sequence[Block], vit_patch: int, vae_stride: int) -> tuple[int, int, int]:
  """(tokens, ViT patches, latent tokens) a sample occupies, from the block sizes alone."""
  tokens = vit = latent = 0
  for block in blocks:
    if isinstance(block, Text):
      tokens += len(block.ids)
    elif isinstance(block, Vit):
      n = (block.image.shape[0] // vit_patch) * (block.image.shape[1] // vit_patch)
      vit, tokens = vit + n, tokens + n + 2
    elif isinstance(block, Latent):
      n = (block.height // vae_stride) * (block.width // vae_stride)
      latent, tokens = latent + n, tokens + n + 2
    else:
      raise TypeError(f"unknown block {block!r}; use Text, Vit or Latent")
  return tokens, vit, latent


def write_labels(labels_t: np.ndarray, start: int, blocks: Sequence[Block], config: BagelConfig,
                 markers: Markers) -> None:
  """Writes the next-token targets of a sample that starts at `start` of its row (position p
  predicts token p + 1): its answer (the last block, a `Text` from `<|im_start|>` to
  `<|im_end|>`) after the first token, `<|endoftext|>` after the answer, and `<|vision_start|>`
  after each `Open` block, the steps of the release's reasoner loop."""
  vit_patch, vae_stride = strides(config)
  pos = start
  for block in blocks[:-1]:
    if isinstance(block, Open):
      labels_t[pos + len(block.ids) - 1] = markers.vision_start
    pos += lengths([block], vit_patch, vae_stride)[0]
  answer = list(blocks[-1].ids)
  labels_t[pos:pos + len(answer) - 1] = answer[1:]
  if markers.end_of_text >= 0:
    labels_t[pos + len(answer) - 1] = markers.end_of_text


def max_lengths(block_lists: Sequence[Sequence[Block]], config: BagelConfig
                ) -> tuple[int, int, int]:
  """(tokens, ViT patches, latent tokens) of the longest of `block_lists` in each: rows that
  hold any of them."""
  vit_patch, vae_stride = strides(config)
  return tuple(max(x) for x in zip(*(lengths(b, vit_patch, vae_stride) for b in block_lists)))


# -- pipeline batches ------------------------------------------------------------------------------
# A stage turns each sample of `packing.batch_samples(batch)` into blocks; these give the static
# shapes of the rows and the images the step VAE-encodes, the same way for unpacked batches (one
# sample per row) and packed ones (data.token_budget > 0, S slots per row).


def is_packed(batch: Mapping[str, Any]) -> bool:
  return "num_samples" in batch


def canvas(batch: Mapping[str, Any], field: str = "corrupted") -> tuple[int, int]:
  """(height, width) every image of `field` sits on, top-left."""
  return tuple(int(x) for x in batch[field].shape[-3:-1])


def bounds(batch: Mapping[str, Any], canvas_blocks: Callable[[dict], Sequence[Block]],
           config: BagelConfig) -> tuple[int, int, int]:
  """(seq_len, max_vit, max_latent) of the batch's rows, fixed for a data config.

  Packed rows have the token budget for each, or, split by data.latent_budget = L (the
  packer's `latent_segment_ids`), L latent slots and T - L for the ViT patches (a share of the
  understanding tokens). Unpacked rows take the length of a sample whose images fill their
  canvas and whose texts fill their padded width (`canvas_blocks` of that sample): an upper bound
  for every batch of the same text bucket, so the step compiles once even when the source's
  images vary in size.
  """
  if is_packed(batch):
    budget = int(batch["segment_ids"].shape[-1])
    if "latent_segment_ids" in batch:
      latent = int(batch["latent_segment_ids"].shape[-1])
      return budget, budget - latent, latent
    return budget, budget, budget
  return lengths(canvas_blocks({k: v[0] for k, v in batch.items()}), *strides(config))


def image_stack(batch: Mapping[str, Any], fields: Sequence[str]) -> np.ndarray:
  """(B, S * K, H, W, 3): per row, sample k's image of fields[j] at k * K + j (S = 1 unpacked)."""
  if not is_packed(batch):
    return np.stack([batch[f] for f in fields], axis=1)
  stacked = np.stack([batch[f] for f in fields], axis=2)  # (B, S, K, H, W, 3)
  b, s, k = stacked.shape[:3]
  return stacked.reshape((b, s * k) + stacked.shape[3:])


def place_like(canvas_array: np.ndarray, images: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
  """images[row][sample] top-left on zero canvases shaped like `canvas_array` ((B, H, W, 3)
  unpacked, (B, S, H, W, 3) packed)."""
  out = np.zeros_like(canvas_array)
  for r, row in enumerate(images):
    for k, image in enumerate(row):
      target = out[r, k] if out.ndim == 5 else out[r]
      target[:image.shape[0], :image.shape[1]] = image
  return out


# -- the stages' sample layouts --------------------------------------------------------------------


def vit_input(image_hwc: np.ndarray) -> np.ndarray:
  """A ViT block's image as it travels: uint8, 8 bits a value (the model maps it to SigLIP's
  [-1, 1] range, BAGEL's mean 0.5 / std 0.5, inside the step: `pixels.to_float`)."""
  image = np.asarray(image_hwc)
  if image.dtype != np.uint8:
    raise TypeError(f"vit_input takes a uint8 image, got {image.dtype}: quantize() it first")
  return image


def recovery_blocks(corrupted_vae: np.ndarray, corrupted_vit: np.ndarray,
                    instruction_ids: Sequence[int], *, use_text: bool = True,
                    use_vit: bool = True, use_vae: bool = True, target: bool = True,
                    canvas: tuple[int, int] | None = None) -> list[Block]:
  """`[VAE of the corrupted image] [its ViT] [instruction] [noisy target]`; image 0 is the
  corrupted image, image 1 the clean target, both encoded top-left on `canvas` (default: their
  own size). The SFT and RL stages train on these blocks; recovery samples the target."""
  h, w = corrupted_vae.shape[:2]
  blocks: list[Block] = []
  if use_vae:
    blocks.append(Latent(h, w, image=0, canvas=canvas))
  if use_vit:
    blocks.append(Vit(vit_input(corrupted_vit)))
  if use_text:
    blocks.append(Text(instruction_ids))
  if target:
    blocks.append(Latent(h, w, noisy=True, image=1, canvas=canvas))
  return blocks


def sft_blocks(sample: Mapping[str, Any], canvas: tuple[int, int] | None = None, **use
               ) -> list[Block]:
  """`recovery_blocks` of one pipeline sample (stages 'sft' and 'rl')."""
  return recovery_blocks(sample["corrupted"], sample.get("corrupted_vit", sample["corrupted"]),
                         sample["instruction_ids"], canvas=canvas, **use)


def reasoning_blocks(sample: Mapping[str, Any], canvas: tuple[int, int] | None = None,
                     recovered_vit: np.ndarray | None = None) -> list[Block]:
  """`[VAE][ViT] of the corrupted image [question] [VAE][ViT] of the recovered image [answer]`
  (stage 'reason'); VAE image 0 is the corrupted image, 1 the recovered one, which has the clean
  image's VAE size and the corrupted image's ViT size.

  Without `recovered_vit` (on-the-fly recovery) the recovered image's ViT block is a placeholder
  the step overwrites in-graph.
  """
  corrupted = sample["corrupted"]
  corrupted_vit = sample.get("corrupted_vit", corrupted)
  h, w = corrupted.shape[:2]
  if recovered_vit is None:
    recovered_vit = np.zeros(corrupted_vit.shape, np.uint8)
  return [Latent(h, w, image=0, canvas=canvas), Vit(vit_input(corrupted_vit)),
          Text(sample["question_ids"]), Open(sample["question_ids"][:1]),
          Latent(h, w, image=1, canvas=canvas), Vit(vit_input(recovered_vit)),
          Text(sample["answer_ids"])]


def vqa_blocks(sample: Mapping[str, Any], canvas: tuple[int, int] | None = None
               ) -> list[Block]:
  """`[ViT of the image] [question] [answer]` (stage 'vqa')."""
  del canvas  # no VAE image
  return [Vit(vit_input(sample.get("corrupted_vit", sample["corrupted"]))),
          Text(sample["question_ids"]), Text(sample["answer_ids"])]


def understanding_blocks(sample: Mapping[str, Any], prompt_ids: Sequence[int],
                         answer_ids: Sequence[int], canvas: tuple[int, int] | None = None, *,
                         use_vae: bool = True) -> list[Block]:
  """[VAE] [ViT] [prompt] [answer] of the sample's clean image (VAE image 0; stage 'pretrain');
  without `use_vae`, [ViT] [prompt] [answer].

  With data.corruption='none' the pipeline's 'corrupted_vit' is the clean image at its ViT size.
  """
  clean = sample["clean"]
  vae = [Latent(*clean.shape[:2], image=0, canvas=canvas)] if use_vae else []
  return vae + [Vit(vit_input(sample.get("corrupted_vit", clean))), Text(prompt_ids),
                Text(answer_ids)]


def text_to_image_blocks(sample: Mapping[str, Any], canvas: tuple[int, int] | None = None, *,
                         use_text: bool = True) -> list[Block]:
  """[caption] [noisy image] (stage 'pretrain'); the target is VAE image 1, as in
  `recovery_blocks`."""
  h, w = sample["clean"].shape[:2]
  text = [Text(sample["caption_ids"])] if use_text else []
  return text + [Latent(h, w, noisy=True, image=1, canvas=canvas)]


def reconstruction_blocks(sample: Mapping[str, Any], instruction_ids: Sequence[int],
                          canvas: tuple[int, int] | None = None, **use) -> list[Block]:
  """`recovery_blocks` with the clean image in the corrupted image's place (stage 'pretrain')."""
  return recovery_blocks(sample["clean"], sample.get("corrupted_vit", sample["clean"]),
                         instruction_ids, canvas=canvas, **use)


# (pipeline sample, VAE canvas) -> the sample's blocks, per pipeline stage that packs ('pretrain'
# makes two rows of a sample, from the three layouts above, and does not pack).
STAGE_BLOCKS: dict[str, Callable[..., list[Block]]] = {
    "sft": sft_blocks, "rl": sft_blocks, "reason": reasoning_blocks, "vqa": vqa_blocks}


def stage_blocks(stage: str) -> Callable[..., list[Block]]:
  if stage not in STAGE_BLOCKS:
    raise ValueError(f"stage {stage!r} has no sample layout to pack: allowed "
                     f"{', '.join(STAGE_BLOCKS)}")
  return STAGE_BLOCKS[stage]
