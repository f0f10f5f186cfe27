"""First-fit packing of variable-size samples into rows of a token budget.

Packing is host-side NumPy run in Grain workers (no JAX), so its checks are chex's tree and shape
assertions without jit variants."""

import json

import chex
import grain
import numpy as np
import pytest

from robust_u1_jax.data import bad_records, packing, sequence

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


def _measure(budget=64):
  return packing.SampleTokens("sft", vit_patch=VIT_PATCH, vae_stride=VAE_STRIDE,
                              token_budget=budget)


def test_sample_tokens_count_the_stage_blocks():
  rec = _records(1)[0]
  out = _measure(10_000).map(rec)
  h, w = rec["clean"].shape[:2]
  hv, wv = rec["corrupted_vit"].shape[:2]
  n_text = rec["instruction_ids"].size
  n_vit = (hv // VIT_PATCH) * (wv // VIT_PATCH)
  n_vae = (h // VAE_STRIDE) * (w // VAE_STRIDE)
  # [VAE][ViT][instruction][noisy VAE], each image framed by two vision markers.
  chex.assert_shape(out["tokens"], (n_text + n_vit + 2 * n_vae + 6,))
  assert out["tokens"].size == sequence.lengths(sequence.sft_blocks(rec), VIT_PATCH,
                                                VAE_STRIDE)[0]
  # Longer than a row: a bad record naming the setting (logged, counted and replaced).
  skipped = _measure(budget=10).map({**rec, "path": "a.png"})
  assert bad_records.is_skip(skipped) and (skipped["path"], skipped["index"]) == ("a.png", 0)
  assert skipped["epoch"] == 0
  assert skipped[bad_records.SKIP] == (f"needs {out['tokens'].size} tokens, more than "
                                       "data.token_budget=10: raise the budget or lower "
                                       "data.vae_max_side / data.vit_max_side")
  with pytest.raises(KeyError, match="stage 'sft' needs record field 'instruction_ids'"):
    _measure().map({k: v for k, v in rec.items() if k != "instruction_ids"})


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
  ds = grain.MapDataset.source(records).map(_measure(budget)).to_iter_dataset()
  canvas = {"clean": (48, 48), "corrupted": (48, 48), "corrupted_vit": (48, 48)}
  return packing.pack(ds, token_budget=budget, num_rows=rows, max_per_row=max_per_row,
                      image_canvas=canvas, scalar_fields=("index", "corruption"))


def test_pack_rows_hold_whole_samples_first_fit():
  records = _records(40)
  budget, bins, max_per_row = 96, 3, 4
  lengths = [_measure(budget).map(r)["tokens"].size for r in records]
  rows = list(_packed(records, budget, bins, max_per_row))
  expected = _reference_first_fit(lengths, budget, bins, max_per_row)
  assert [list(r["index"][:int(r["num_samples"])]) for r in rows] == expected
  seen = []
  for row in rows:
    chex.assert_shape(row["segment_ids"], (budget,))
    chex.assert_shape([row["clean"], row["corrupted"], row["corrupted_vit"]],
                      (max_per_row, 48, 48, 3))
    chex.assert_shape([row["index"], row["corruption"]], (max_per_row,))
    chex.assert_shape(row["clean_hw"], (max_per_row, 2))
    n = int(row["num_samples"])
    seg = row["segment_ids"]
    used = int((seg > 0).sum())
    # Samples are contiguous, numbered 1..n, followed by padding.
    assert list(np.unique(seg[seg > 0])) == list(range(1, n + 1))
    assert (seg[used:] == 0).all()
    for k, sample in enumerate(packing.unpack_row(row)):
      rec = records[int(sample["index"])]
      fields = ("clean", "corrupted", "corrupted_vit", "corruption")
      chex.assert_trees_all_equal({k: sample[k] for k in fields}, {k: rec[k] for k in fields})
      assert (seg == k + 1).sum() == _measure(budget).map(rec)["tokens"].size
      seen.append(int(sample["index"]))
    # Empty slots are marked.
    assert (row["index"][n:] == -1).all() and (row["clean_hw"][n:] == 0).all()
  assert sorted(seen) == list(range(len(records)))


def test_split_rows_hold_each_experts_tokens_within_its_budget():
  records = _records(40, seed=2)
  budget, latent_budget = 96, 40
  measure = packing.SampleTokens("sft", vit_patch=VIT_PATCH, vae_stride=VAE_STRIDE,
                                 token_budget=budget, latent_budget=latent_budget)
  ds = grain.MapDataset.source(records).map(measure).to_iter_dataset()
  canvas = {"clean": (48, 48), "corrupted": (48, 48), "corrupted_vit": (48, 48)}
  rows = list(packing.pack(ds, token_budget=budget, num_rows=3, max_per_row=4,
                           image_canvas=canvas, scalar_fields=("index",),
                           latent_budget=latent_budget))
  seen, fuller = [], 0
  for row in rows:
    chex.assert_shape(row["latent_segment_ids"], (latent_budget,))
    n = int(row["num_samples"])
    latent_used = 0
    for k, sample in enumerate(packing.unpack_row(row)):
      _, _, latent = sequence.lengths(sequence.sft_blocks(records[int(sample["index"])]),
                                      VIT_PATCH, VAE_STRIDE)
      assert (row["latent_segment_ids"] == k + 1).sum() == latent
      latent_used += latent
      seen.append(int(sample["index"]))
    # Each expert's tokens within its share: latent ones within L, the others within T - L.
    assert latent_used <= latent_budget
    assert int((row["segment_ids"] > 0).sum()) - latent_used <= budget - latent_budget
    fuller += n > 1
  assert sorted(seen) == list(range(len(records))) and fuller > 0
  rec = records[0]
  _, _, latent = sequence.lengths(sequence.sft_blocks(rec), VIT_PATCH, VAE_STRIDE)
  skipped = packing.SampleTokens("sft", vit_patch=VIT_PATCH, vae_stride=VAE_STRIDE,
                                 token_budget=budget, latent_budget=1).map(rec)
  assert skipped[bad_records.SKIP].startswith(f"needs {latent} latent and ")
  assert "more than data.latent_budget=1 / " in skipped[bad_records.SKIP]


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
  with pytest.raises(ValueError, match="allowed sft, rl, reason, vqa"):
    packing.min_sample_tokens("pretrain", vit_min_side=32, vit_patch=8, vae_min_side=32,
                              vae_stride=16)
