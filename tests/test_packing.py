"""First-fit packing of variable-size samples into rows of a token budget.

Packing is host-side NumPy run in Grain workers (no JAX), so its checks are chex's tree and shape
assertions without jit variants."""

import json

import chex
import grain
import numpy as np
import pytest

from robust_u1_jax.data import packing

VISION_START, VISION_END, PAD = 901, 902, 900
VIT_PATCH, VAE_STRIDE = 8, 16


def _records(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    h, w = 16 * int(rng.integers(1, 4)), 16 * int(rng.integers(1, 4))
    clean = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    out.append({"clean": clean, "corrupted": 255 - clean,
                "corrupted_vit": clean[: h // 2 * 2, : w // 2 * 2],
                "instruction_ids": np.arange(int(rng.integers(3, 9)), dtype=np.int32) + 10 * i,
                "index": i, "epoch": 0, "corruption": f"c{i}"})
  return out


def _layout(budget=64):
  return packing.SampleLayout("sft", vit_patch=VIT_PATCH, vae_stride=VAE_STRIDE,
                              vision_start=VISION_START, vision_end=VISION_END, pad=PAD,
                              token_budget=budget)


def test_sample_layout_blocks_and_markers():
  rec = _records(1)[0]
  out = _layout(10_000).map(rec)
  h, w = rec["clean"].shape[:2]
  hv, wv = rec["corrupted_vit"].shape[:2]
  n_text = rec["instruction_ids"].size
  n_vit = (hv // VIT_PATCH) * (wv // VIT_PATCH)
  n_vae = (h // VAE_STRIDE) * (w // VAE_STRIDE)
  types = out["token_types"]
  chex.assert_shape([types, out["token_ids"]], (n_text + n_vit + 2 * n_vae + 6,))
  chex.assert_type([types, out["token_ids"]], [np.int8, np.int32])
  text_start = n_vae + n_vit + 4
  chex.assert_trees_all_equal(out["token_ids"][text_start:text_start + n_text],
                              rec["instruction_ids"])
  assert (types == packing.VIT).sum() == n_vit
  assert (types == packing.VAE).sum() == (types == packing.VAE_TARGET).sum() == n_vae
  # Blocks in the SFT stage's order, each image framed by vision markers.
  order = [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]
  assert order == [packing.TEXT, packing.VAE, packing.TEXT, packing.VIT, packing.TEXT,
                   packing.VAE_TARGET, packing.TEXT]
  assert (out["token_ids"] == VISION_START).sum() == 3 == (out["token_ids"] == VISION_END).sum()
  with pytest.raises(ValueError, match="record 0 .* needs .* tokens"):
    _layout(budget=10).map(rec)


def _reference_first_fit(lengths, budget, bins, max_per_row):
  """Grain's documented algorithm: fill `bins` bins first-fit; emit all when one does not fit."""
  rows, current = [], [[] for _ in range(bins)]
  used = [0] * bins
  for i, n in enumerate(lengths):
    while True:
      k = next((k for k in range(bins)
                if used[k] + n <= budget and len(current[k]) < max_per_row), None)
      if k is not None:
        current[k].append(i)
        used[k] += n
        break
      rows.extend(r for r in current if r)
      current, used = [[] for _ in range(bins)], [0] * bins
  rows.extend(r for r in current if r)
  return rows


def _packed(records, budget, rows, max_per_row):
  ds = grain.MapDataset.source(records).map(_layout(budget)).to_iter_dataset()
  canvas = {"clean": (48, 48), "corrupted": (48, 48), "corrupted_vit": (48, 48)}
  return packing.pack(ds, token_budget=budget, num_rows=rows, max_per_row=max_per_row,
                      image_canvas=canvas, scalar_fields=("index", "corruption"), pad_id=PAD)


def test_pack_rows_hold_whole_samples_first_fit():
  records = _records(40)
  budget, bins, max_per_row = 96, 3, 4
  lengths = [_layout(budget).map(r)["token_ids"].size for r in records]
  rows = list(_packed(records, budget, bins, max_per_row))
  expected = _reference_first_fit(lengths, budget, bins, max_per_row)
  assert [list(r["index"][:int(r["num_samples"])]) for r in rows] == expected
  seen = []
  for row in rows:
    chex.assert_shape([row[k] for k in ("token_ids", "token_types", "segment_ids", "positions")],
                      (budget,))
    chex.assert_shape([row["clean"], row["corrupted"], row["corrupted_vit"]],
                      (max_per_row, 48, 48, 3))
    chex.assert_shape([row["index"], row["corruption"]], (max_per_row,))
    chex.assert_shape(row["clean_hw"], (max_per_row, 2))
    n = int(row["num_samples"])
    seg = row["segment_ids"]
    used = int((seg > 0).sum())
    # Samples are contiguous, numbered 1..n, followed by padding.
    assert list(np.unique(seg[seg > 0])) == list(range(1, n + 1))
    assert (seg[used:] == 0).all() and (row["token_types"][used:] == packing.PAD).all()
    assert (row["token_ids"][used:] == PAD).all()
    for k, sample in enumerate(packing.unpack_row(row)):
      rec = records[int(sample["index"])]
      ref = _layout(budget).map(rec)
      fields = ("token_ids", "token_types", "clean", "corrupted", "corrupted_vit", "corruption")
      chex.assert_trees_all_equal({k: sample[k] for k in fields}, {k: ref[k] for k in fields})
      chex.assert_trees_all_equal(row["positions"][seg == k + 1],
                                  np.arange(ref["token_ids"].size, dtype=np.int32))
      seen.append(int(sample["index"]))
    # Empty slots are marked.
    assert (row["index"][n:] == -1).all() and (row["clean_hw"][n:] == 0).all()
  assert sorted(seen) == list(range(len(records)))


def test_packed_iterator_resumes_exactly():
  records = _records(30, seed=1)
  it = iter(_packed(records, 96, 3, 4))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  resumed = iter(_packed(records, 96, 3, 4))
  resumed.set_state(state)
  for want in expected:
    chex.assert_trees_all_equal(next(resumed), want)


def test_min_sample_tokens_bounds_every_layout():
  for stage in ("sft", "rl", "reason", "vqa"):
    n = packing.min_sample_tokens(stage, vit_min_side=32, vit_patch=8, vae_min_side=32,
                                  vae_stride=16)
    assert n > 0
  assert packing.min_sample_tokens("sft", vit_min_side=32, vit_patch=8, vae_min_side=32,
                                   vae_stride=16) == 2 + (16 + 2) + 2 * (4 + 2)
  with pytest.raises(ValueError, match="allowed sft, reason, vqa, rl"):
    packing.stage_layout("pretrain")
