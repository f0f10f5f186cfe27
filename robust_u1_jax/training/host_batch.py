"""Host side: the row bounds and VAE image stack of a pipeline batch, packed or not.

A stage turns each sample of `packing.batch_samples(batch)` into blocks (sequence.py); these
helpers give the static shapes of the rows and the images the step VAE-encodes, the same way for
unpacked batches (one sample per row) and packed ones (data.token_budget > 0, S slots per row).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from robust_u1_jax.models import sequence
from robust_u1_jax.models.bagel import BagelConfig


def is_packed(batch: Mapping[str, Any]) -> bool:
  return "num_samples" in batch


def canvas(batch: Mapping[str, Any], field: str = "corrupted") -> tuple[int, int]:
  """(height, width) every image of `field` sits on, top-left."""
  return tuple(int(x) for x in batch[field].shape[-3:-1])


def bounds(batch: Mapping[str, Any], canvas_blocks: Callable[[dict], Sequence[sequence.Block]],
           config: BagelConfig) -> tuple[int, int, int]:
  """(seq_len, max_vit, max_latent) of the batch's rows, fixed for a data config.

  Packed rows have the token budget for each. Unpacked rows take the length of a sample whose
  images fill their canvas and whose texts fill their padded width (`canvas_blocks` of that
  sample): an upper bound for every batch of the same text bucket, so the step compiles once
  even when the source's images vary in size.
  """
  if is_packed(batch):
    budget = int(batch["token_ids"].shape[-1])
    return budget, budget, budget
  return sequence.lengths(canvas_blocks({k: v[0] for k, v in batch.items()}), config)


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


def recovery_inputs(batch: Mapping[str, Any], config: BagelConfig, markers: sequence.Markers,
                    instruction_ids: Sequence[int] | None = None):
  """`inference.recovery.recovery_inputs` of an unpacked pipeline batch (one sample per row)."""
  from robust_u1_jax.data import packing
  from robust_u1_jax.inference import recovery as recovery_lib

  if is_packed(batch):
    raise ValueError("recovery sampling takes unpacked batches: set data.token_budget=0")
  samples = [row[0] for row in packing.batch_samples(batch)]
  return recovery_lib.recovery_inputs(samples, config, markers, instruction_ids)
