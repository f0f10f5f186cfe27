"""Corruption on the fly, a group of records at a time (the Grain pipeline's corruption step).

The pipeline hands `CorruptGroup` lists of GROUP consecutive records (`MapDataset.batch`); each
record comes out exactly as `transforms.CorruptOnTheFly` makes it (same keys from (seed, index,
epoch), same images, same 'corruption_steps'), but a group whose records share one image size
and one corruption (the Robust-R1 pipeline, or one named corruption at per-record levels) is
corrupted by ONE jitted call (`corruptions.corrupt_batch` loops over the images inside the
program): per-record dispatch, argument transfers and plan read-backs are paid once per group.
Records that cannot share a call (ImageNet-C's per-record names, sizes that differ, a short last
group) are corrupted one by one, as before. `EachRecord` applies a per-record transform to every
record of a group; `Ungroup` flattens the groups again after Grain's reader threads.

Everything runs on the host CPU (`placement.data_device`): the keys are made there and the
images never leave it, whatever the default backend (docs/design.md#the-data-path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from robust_u1_jax.data import bad_records
from robust_u1_jax.data import corruptions
from robust_u1_jax.data.corruptions import placement
from robust_u1_jax.data import transforms

# Records per group: one call corrupts them all when they share a size. More amortises more
# dispatch but makes Grain's unit of work (and its prefetch) coarser.
GROUP = 8


class CorruptGroup(grain.transforms.Map):
  """A list of records -> the list with each corrupted as `transforms.CorruptOnTheFly` would."""

  def __init__(self, single: transforms.CorruptOnTheFly):
    self.single = single

  @classmethod
  def from_config(cls, data_config, seed: int) -> "CorruptGroup":
    return cls(transforms.CorruptOnTheFly.from_config(data_config, seed))

  def map(self, records: Sequence[Any]) -> list[Any]:
    with placement.running_on(placement.data_device()):  # keys are made on the host too
      return self._map(list(records))

  def _map(self, records: list[Any]) -> list[Any]:
    spec = self.single.spec
    # Images the corruption cannot take become skip markers first (`CorruptOnTheFly.map`).
    records = [self.single.map(r) if self._too_small(r) else r for r in records]
    plain = [i for i, r in enumerate(records)
             if not bad_records.is_skip(r) and "image" in r and "target_image" not in r]
    shapes = {np.shape(records[i]["image"]) for i in plain}
    shared = spec.mode in ("pipeline", "single") and len(plain) == len(records) and len(
        shapes) == 1 and len(records) > 1
    if not shared:
      return [self.single.map(r) for r in records]
    # Records drawn clean (data.clean_fraction) are corrupted with the rest, one program for the
    # group's shape, and given back clean.
    clean = [transforms.drawn_clean(spec, self.single.seed, int(r["index"]),
                                    int(r.get("epoch", 0))) for r in records]
    return [self.single.map(r) if c else out
            for r, c, out in zip(records, clean, self._corrupt_together(records))]

  def _too_small(self, record: Any) -> bool:
    return (not bad_records.is_skip(record) and "image" in record
            and "target_image" not in record
            and transforms.corruption_size_problem(record["image"], self.single.spec) is not None)

  def _corrupt_together(self, records: list[dict]) -> list[dict]:
    spec, seed = self.single.spec, self.single.seed
    draws = [transforms.draw_corruption(spec, seed, int(r["index"]), int(r.get("epoch", 0)))
             for r in records]
    images = np.stack([r["image"] for r in records])
    keys = jax.numpy.stack([key for _, _, key in draws])
    name = draws[0][0]
    if spec.mode == "pipeline":
      from robust_u1_jax.data.corruptions import robust_r1  # deferred: heavy, pipeline only

      drawn = [level["intensity"] for _, level, _ in draws]
      if spec.intensity >= 0 or drawn[0] is None:
        intensity = drawn[0]  # the config's, or None: each key draws one per stage
      else:
        intensity = np.asarray(drawn, np.float32)  # one per record
      out, plans = robust_r1.apply_pipeline_batch(images, keys, intensity, batch="map",
                                                  return_plans=True)
      infos = [{"corruption": name,
                "corruption_steps": [f"robust_r1/{step}" for _, step, _ in plan],
                "corruption_levels": [float(v) for _, _, v in plan]} for plan in plans]
    else:
      kind = next(iter(draws[0][1]))  # 'severity' or 'intensity', drawn per record
      levels = [level[kind] for _, level, _ in draws]
      out = corruptions.corrupt_batch(images, name, keys, batch="map", **{kind: levels})
      infos = [{"corruption": name, "corruption_steps": [name],
                "corruption_levels": [float(v)]} for v in levels]
    result = []
    for r, corrupted, info in zip(records, out, infos):
      r = dict(r)
      r.update(clean=r.pop("image"), corrupted=np.asarray(corrupted), **info)
      result.append(r)
    return result


class EachRecord(grain.transforms.Map):
  """Applies a per-record Map transform to every record of a group."""

  def __init__(self, transform: grain.transforms.Map):
    self.transform = transform

  def map(self, records: Sequence[Any]) -> list[Any]:
    return [self.transform.map(r) for r in records]


class Ungroup(grain.experimental.FlatMapTransform):
  """A group of records -> its records, in order (for grain.experimental.FlatMapIterDataset)."""

  def __init__(self, group: int = GROUP):
    self.max_fan_out = int(group)

  def flat_map(self, records: Sequence[Any]) -> Sequence[Any]:
    return list(records)
