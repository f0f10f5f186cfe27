"""Grain input pipelines for every stage: source -> shuffled per-process slice -> batches.

`make_pipeline(data_config, seed=..., process_index=..., process_count=..., stage=...)` builds

  source (data.source)                            random access, record i = f(i)
  -> shuffle (seeded; reshuffled every epoch)     grain MapDataset.shuffle + repeat (a finite
                                                  stream ends at its last whole global batch)
  -> load, tag 'epoch'                            transforms.AddEpoch
  -> this process's slice                         multihost.process_slice: its rows of every
                                                  global batch, so n processes read the batches
                                                  of one (packed rows: every n-th record)
  -> decode                                       transforms.DecodeImages (skip marker if broken)
  -> resize by BAGEL's VAE rule                   before corrupting: the pair stays pixel-aligned
                                                  at the training size, and jitted corruptions
                                                  compile once per (rounded) size, not per file
  -> corrupt on the fly                           corrupt_groups.CorruptGroup (what
                                                  transforms.CorruptOnTheFly does per record, one
                                                  jitted call per group of GROUP records, on the
                                                  host CPU); key = f(seed, index, epoch), so a
                                                  resumed run redraws the same
  -> ViT-size copy of the corrupted image          BAGEL's ViT rule
  -> stage texts + tokenisation                   instruction / question / answer
                                                  (stage_fields.py)
  -> bad records counted, replaced                bad_records.SkipTracker, in the main process;
                                                  ReplaceBadRecords puts a record drawn from
                                                  (seed, index, epoch) in a bad one's place, so
                                                  no later row moves
  -> batch (per-process batch = data.batch_size / process_count)
     or, with data.token_budget > 0, first-fit packing into rows (packing.py), each sample
     measured by the stage's own block list (data/sequence.py)
  -> the model's rows (format_rows, given by      the stage's host_inputs: SequenceInputs and
     the trainer)                                 whatever else its step reads, built from the
                                                  same block lists; in a Grain thread ahead of
                                                  the training thread

The returned `Pipeline` is an iterator of batches (of the step's inputs with format_rows) with
`get_state()` / `set_state()`, `metrics()` -> {'skipped', 'seen', 'skip_ratio'}
(bad_records.TooManyBadRecords is raised from `next()` past data.max_skip_ratio, or from
`check_skip_ratio()` on several processes), `close()`, and
attributes num_records, epoch_size (records per process per epoch, rounded down) and batch_size
(per process).
On a multi-host mesh, pass `multihost.data_shard(mesh)` as (process_index, process_count), and
turn each batch into global arrays with `multihost.global_batch(multihost.host_fields(batch)[0],
mesh)`.

Checkpointing: `Pipeline.get_state()` is a JSON-able dict (Grain's iterator state plus the skip
counters, stamped with STREAM_ORDER); `set_state` on a NEW pipeline built with the same config and
seed continues with exactly the batches the uninterrupted run would have read. The training loop
saves it through Grain's Orbax handler (training/checkpoint.py), which asks `check_state` first.

Batch schema (unpacked, token_budget == 0): a dict of numpy arrays, B = per-process batch.

  clean            (B, H, W, 3) uint8   the clean image at its VAE size (the recovery target)
  corrupted        (B, H, W, 3) uint8   the corrupted image, pixel-aligned with clean
  corrupted_vit    (B, Hv, Wv, 3) uint8 corrupted, resized by the ViT rule (ViT input)
  clean_hw, corrupted_hw, corrupted_vit_hw  (B, 2) int32  valid (height, width) of each image
  index            (B,) int32           record index in the source
  epoch            (B,) int32
  corruption       (B,) str             name given to corrupt ('robust_r1_pipeline', 'none', a
                                        qualified name, or 'dataset' for stored pairs)
  corruption_steps (B,) str             what was applied, e.g. 'robust_r1/lens_blur(0.42)+...',
                                        'imagenet_c/fog(3)'
  stage 'sft'/'rl':
    instruction_ids      (B, L) int32   `<|im_start|>instruction<|im_end|>`, right-padded with
    instruction_lengths  (B,) int32     the pad id; L = text_widths.<field>, else text_pad_to,
                                        else the next power of two >= 16 that fits the batch
                                        (few distinct shapes to jit)
  stage 'reason'/'vqa' (one question per record, drawn from (seed, index, epoch)):
    question_ids, question_lengths      the question and its lettered options, one per line,
                                        then (reason only) the recovery instruction
    answer_ids, answer_lengths          the answer: the Robust-R1 format `<TYPE>..<ANSWER>X
                                        <ANSWER_END>` for the shapes world (corruption named),
                                        `<ANSWER>X<ANSWER_END>` for VQA tables, and the row's
                                        own 'answer' for JSONL rows with 'question'/'answer'
                                        (put in `<ANSWER>..<ANSWER_END>` when it has no such
                                        field)
    question_text, answer_text, answer_letter  (B,) str
  stage 'pretrain' (the bootstrap stages, training/bootstrap_clip.py and pretrain.py): the 'vqa'
    fields, plus
    caption_ids, caption_lengths        the record's caption (shapes world; records without one
                                        are bad records)
    recovery_question_ids, recovery_question_lengths  the question followed by the recovery
                                        instruction, as stage 'reason' writes it (the base's
                                        two-image rows)
    caption_text                        (B,) str

Strings are host-side: `multihost.host_fields` splits them off before `multihost.global_batch`.

Image sizes: the shapes world has one image size, so images are stacked as they are. Other
sources (folders, TFDS, tables) hold many sizes: BAGEL's rules resize each to multiples of the
patch stride, and unpacked batches place each image top-left on a canvas of the rule's maximum
side (vae_max_side or vit_max_side), with `*_hw` giving the valid region. The efficient way for
variable sizes is packing by token budget (data.token_budget > 0): samples of different sizes
share rows of a fixed token count, each image in a slot; see packing.py for that schema. With
packing, data.batch_size counts packed rows (MaxText's convention), not samples, and a batch
is the packed-row schema of packing.py with a leading (rows) axis.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
from absl import flags
from absl import logging

from robust_u1_jax.data import bad_records
from robust_u1_jax.data import batch_maps
from robust_u1_jax.data.batch_maps import IMAGE_FIELDS, MIN_TEXT_PAD
from robust_u1_jax.data import corrupt_groups
from robust_u1_jax.data import multihost
from robust_u1_jax.data import packing
from robust_u1_jax.data import sources
from robust_u1_jax.data import stage_fields
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.data import transforms

STAGES = ("sft", "rl", "reason", "vqa", "pretrain")
TEXT_FIELDS = {"sft": ("instruction",), "rl": ("instruction",),
               "reason": ("question", "answer"), "vqa": ("question", "answer"),
               "pretrain": ("question", "answer", "caption", "recovery_question")}
HOST_FIELDS = {"sft": (), "rl": (), "reason": ("question_text", "answer_text", "answer_letter"),
               "vqa": ("question_text", "answer_text", "answer_letter"),
               "pretrain": ("question_text", "answer_text", "answer_letter", "caption_text")}
FORMAT_AHEAD = 2  # batches of model rows kept ready ahead of the training thread


# --------------------------------------------------------------------------------------- pipeline

def _canvas(data_config, kind: str) -> tuple[int, int]:
  rule = transforms.resize_rule(data_config, kind)
  if data_config.source == "shapes":  # one size: the world's, resized once by the rule
    return transforms.bagel_size(data_config.image_size, data_config.image_size, **rule)
  return rule["max_side"], rule["max_side"]


def image_canvas(data_config) -> dict[str, tuple[int, int]]:
  """{image field: (H, W)} of the batch arrays for this data config."""
  vae, vit = _canvas(data_config, "vae"), _canvas(data_config, "vit")
  return {"clean": vae, "corrupted": vae, "corrupted_vit": vit}


def _default_read_options(per_process_batch: int) -> grain.ReadOptions:
  # A bounded buffer: Grain's default of 500 records is gigabytes at BAGEL's 1024-pixel sides.
  # Few threads: the work is Python (GIL) and JAX dispatch, which more threads only contend
  # for (2 beat 4 and 16 on 2 cores); worker_count > 0 adds processes for real parallelism.
  threads = max(2, min(8, os.cpu_count() or 2))
  records = max(2 * per_process_batch, 2 * threads)
  # Grain's elements are groups of records here (corrupt_groups.GROUP each).
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(2, -(-records // corrupt_groups.GROUP)))


# The order in which the data shards of a run read the record stream, saved with every data
# position: a position of another order points a shard at other records, and resuming there reads
# other batches without any error.
# 1 (unstamped): each epoch of the shuffled stream was cut to a multiple of the shard count before
#   the stream repeated and was sliced (num_records % shards records dropped an epoch); the same
#   stream as 2 where the shard count divides num_records, or with one shard.
# 2: the whole stream repeats, then each shard takes its rows of every global batch. Stamped since
#   the stamp came; cf0fb2c to ce3a6f6 (2026-12-05) read in order 2 without it.
STREAM_ORDER = 2


class Pipeline:
  """Iterator over batches; checkpointable (get_state/set_state), with skip metrics.

  Attributes: num_records (source length), epoch_size (records per process per epoch, rounded
  down), batch_size (per-process batch), process_count, stage, dataset (the Grain IterDataset).
  """

  def __init__(self, dataset: grain.IterDataset, tracker: bad_records.SkipTracker, *,
               num_records: int, epoch_size: int, batch_size: int, stage: str,
               process_count: int = 1):
    self.dataset, self.tracker = dataset, tracker
    self.num_records, self.epoch_size, self.batch_size = num_records, epoch_size, batch_size
    self.stage, self.process_count = stage, process_count
    self._iterator = iter(dataset)

  def __iter__(self) -> "Pipeline":
    return self

  def __enter__(self) -> "Pipeline":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return next(self._iterator)
    except StopIteration:
      # A finite stream ends at its last whole global batch, short of a whole epoch's records:
      # the epoch's check, however few records were seen.
      if self.tracker.enforce:
        self.tracker.end_epoch()
      raise

  def get_state(self) -> dict[str, Any]:
    """JSON-able position: Grain's iterator state and the skip counters.

    The counters are restored as totals (per-file details restart). With packing, Grain resumes
    an open packing round by re-reading its records, which the counters then see again; with
    format_rows, they include the records of the FORMAT_AHEAD batches formatted ahead.
    """
    m = self.tracker.metrics()
    return {"grain": self._iterator.get_state(), "stream_order": STREAM_ORDER,
            "records": self.num_records,
            "skips": {"seen": int(m["seen"]), "skipped": int(m["skipped"])}}

  def check_state(self, state: Mapping[str, Any]) -> None:
    """ValueError when a saved data position (a get_state) was read in another order than this
    pipeline reads its shard (STREAM_ORDER), so that resuming from it would read other batches
    than the run it continues. A state that is no position at all is left to `set_state`."""
    if not isinstance(state, Mapping) or "grain" not in state:
      return  # no position at all: set_state refuses it, and the checkpoint counts as damaged
    order = state.get("stream_order")
    if order == STREAM_ORDER:
      return
    if order is not None:
      raise ValueError(f"its data position was saved in record order {order} "
                       f"(data/pipeline.py STREAM_ORDER), by a version other than this one (order "
                       f"{STREAM_ORDER}): resume with the version that saved it, or start again in "
                       "another --workdir")
    if self.num_records % self.process_count == 0:
      return  # orders 1 and 2 read the same stream
    raise ValueError(
        f"its data position has no record order (data/pipeline.py STREAM_ORDER): a version "
        f"before cf0fb2c read {self.num_records} records over {self.process_count} data shards "
        "in another order, and resumed here it would read other batches than the run it "
        "continues; resume with the version that saved it, or start again in another "
        "--workdir (a position saved by cf0fb2c to ce3a6f6 reads as this version does: add "
        f'"stream_order": {STREAM_ORDER} to each of its process_*.json files)')

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or "grain" not in state:
      keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
      raise ValueError(f"pipeline state has keys {keys}: expected 'grain' and 'skips' (a state "
                       "from Pipeline.get_state)")
    self.check_state(state)
    saved = state.get("records")
    if saved is not None and saved != self.num_records:
      # Files added or removed since the position was saved (only the count is compared): the
      # stream's order is drawn over the records there are, so the rest differs. Said, not
      # refused: adding data to a stopped run is a choice, not a mistake.
      logging.warning(
          "the data holds %d records now, %d when this position was saved: the resumed run "
          "reads other batches from here than the run it continues would have", self.num_records,
          saved)
    self._iterator.set_state(state["grain"])
    with self.tracker._lock:  # pylint: disable=protected-access
      self.tracker.seen = int(state.get("skips", {}).get("seen", 0))
      self.tracker.skipped = int(state.get("skips", {}).get("skipped", 0))

  def metrics(self) -> dict[str, float]:
    """{'skipped', 'seen', 'skip_ratio'} of the records this process has read."""
    return self.tracker.metrics()

  def check_skip_ratio(self, replicas: int = 1, final: bool = False) -> None:
    """Enforces data.max_skip_ratio on the bad records of every process together: a collective
    that every process calls at the same step, so all of them stop there or none does (for
    pipelines built with enforce_skip_ratio=False). `replicas`: processes that read one data
    shard, each of whose records they all count; `final`: the data has ended (enforced however
    few records were seen)."""
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    m = self.tracker.metrics()
    counts = np.asarray(multihost_utils.process_allgather(
        np.asarray([m["seen"], m["skipped"]], np.int32))).reshape(-1, 2)  # (processes, 2)
    processes = counts.shape[0]
    seen, skipped = (int(v) // replicas for v in counts.sum(0))
    self.tracker.check(seen, skipped, final=final or seen >= self.num_records,
                       where=f" read by {processes} processes")

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def fixed_text_widths(data_config) -> dict[str, int]:
  """{text field: width} of the fields data.text_widths fixes (unpacked batches)."""
  return {field: int(width) for field, width in data_config.get("text_widths", {}).items()
          if width}


def text_limits(data_config, stage: str, text_pad_to: int | None) -> dict[str, tuple[int, str]]:
  """The fixed text widths of an unpacked `stage` batch, one rule for the records `Tokenize`
  refuses and the widths `Collate` pads to (`batch_maps.text_width_limits`)."""
  return batch_maps.text_width_limits(TEXT_FIELDS[stage], text_pad_to,
                                      fixed_text_widths(data_config))


def fixed_rows(data_config, stage: str) -> bool:
  """Whether every unpacked batch of `stage` has one row length (data.text_pad_to or a width for
  each of its text fields): what multi-host runs need."""
  widths = fixed_text_widths(data_config)
  return bool(data_config.text_pad_to) or all(f in widths for f in TEXT_FIELDS[stage])


def _check_stage(stage: str) -> None:
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r} is unknown: allowed {', '.join(STAGES)}")


def _record_steps(data_config, seed: int, stage: str, tokenizer, instruction: str | None,
                  text_pad_to: int | None
                  ) -> tuple[list[grain.transforms.Map], list[grain.transforms.Map]]:
  """(the steps that map one record, the steps that map a group of records) from a loaded
  record tagged with its epoch to the record a batch holds: the pipeline's readers run them,
  and so does `ReplaceBadRecords` for a bad record's replacement."""
  record_steps = [transforms.DecodeImages(),
                  transforms.ResizeImages.from_config(data_config, "vae",
                                                      keys=("image", "target_image"))]
  each = corrupt_groups.EachRecord
  text_fields = TEXT_FIELDS[stage]
  group_steps = [
      corrupt_groups.CorruptGroup.from_config(data_config, seed),
      each(stage_fields.StageFields(
          stage, seed=seed, instruction=instruction or tokenizer_lib.RECOVERY_INSTRUCTION,
          vit_rule=transforms.resize_rule(data_config, "vit"),
          question_prompt_fraction=data_config.get("question_prompt_fraction", 0.0))),
      each(batch_maps.Tokenize(
          text_fields, tokenizer, data_config.tokenizer_dir,
          # Packed rows take any text width that fits data.token_budget (`SampleTokens`).
          widths=None if data_config.token_budget > 0 else text_limits(data_config, stage,
                                                                        text_pad_to)))]
  keep = (*IMAGE_FIELDS, "index", "epoch", "corruption", "corruption_steps",
          *(f"{f}_ids" for f in text_fields), *HOST_FIELDS[stage])
  if data_config.token_budget > 0:
    group_steps.append(each(packing.SampleTokens(
        stage, vit_patch=data_config.vit_patch, vae_stride=data_config.vae_stride,
        token_budget=data_config.token_budget, latent_budget=data_config.latent_budget)))
    keep = keep + tuple(packing.length_features(data_config.token_budget,
                                                data_config.latent_budget))
  group_steps.append(each(batch_maps.KeepFields(keep)))
  return record_steps, group_steps


def make_pipeline(data_config, *, seed: int, process_index: int = 0, process_count: int = 1,
                  tokenizer=None, stage: str = "sft", split: str | None = None,
                  instruction: str | None = None, text_pad_to: int | None = None,
                  read_options: grain.ReadOptions | None = None,
                  format_rows: Callable[[dict, np.random.Generator], Any] | None = None,
                  enforce_skip_ratio: bool = True) -> Pipeline:
  """The batch iterator of one process (module docstring for the stages and the schema).

  Args:
    data_config: a `config_defaults.get_data_config()` ConfigDict (config.data or config.eval_data).
    seed: run seed: shuffling, corruption and question draws are pure functions of it.
    process_index, process_count: this process's data shard (`multihost.data_shard(mesh)`).
    tokenizer: a loaded tokenizer; None loads data.tokenizer_dir ('' = the built-in one).
    stage: 'sft', 'rl', 'reason', 'vqa' or 'pretrain'.
    split: overrides data.split.
    instruction: the recovery instruction (default: the paper's).
    text_pad_to: fixed text width; None takes data.text_pad_to (0: a power-of-two bucket per
      batch).
    read_options: Grain thread prefetch options (default: bounded, see _default_read_options).
    format_rows: (batch, generator) -> the step's inputs (a stage's `host_inputs`): the last map,
      given batch n a generator seeded with (seed, n) (the batch's step number), so a resumed run
      formats its batches as the uninterrupted run did. It runs in a Grain thread that keeps
      FORMAT_AHEAD batches ready, so the training thread only moves them to the devices.
    enforce_skip_ratio: False counts bad records without stopping at data.max_skip_ratio; the
      caller enforces it with `Pipeline.check_skip_ratio` on the counts of every process, as the
      trainer does so that all of them stop at one step.
  """
  _check_stage(stage)
  if text_pad_to is None:
    text_pad_to = data_config.get("text_pad_to", 0) or None
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, process_count="
                     f"{process_count})")
  batch_size = multihost.per_process_batch_size(data_config.batch_size, process_count)
  source = sources.make_source(data_config, split, stage=stage)
  num_records = len(source)
  epoch_size = num_records // process_count
  if epoch_size < 1:
    raise ValueError(f"data source {source!r} has {num_records} records, fewer than the "
                     f"{process_count} processes reading it")
  tok = tokenizer if tokenizer is not None else batch_maps.load_tokenizer(data_config.tokenizer_dir)
  special = tokenizer_lib.special_token_ids(tok)

  packed = data_config.token_budget > 0
  ds = grain.MapDataset.range(num_records)
  if data_config.shuffle:
    ds = ds.shuffle(seed=seed)
  # Every process walks the same record stream and tags epochs on it (record i of the stream is
  # loaded only by the process that reads it), then keeps its share: a run of its batch rows per
  # global batch, so a run's batches and corruption keys do not depend on the process count.
  # Global batches may straddle epochs, as one process's batches do; a finite stream ends at the
  # last whole global batch (a whole round of one record per process when packing).
  ds = ds.repeat(data_config.num_epochs or None)
  chunk = 1 if packed else batch_size
  if data_config.num_epochs:
    ds = ds[:len(ds) - len(ds) % (chunk * process_count)]
  ds = ds.map(batch_maps.LoadRecord(source))
  ds = ds.map_with_index(transforms.AddEpoch(num_records))
  ds = multihost.process_slice(ds, process_index, process_count, chunk)
  # Records are corrupted a group at a time (one jitted call per group of one image size); the
  # per-record steps after it map over each group's records, and `Ungroup` below restores the
  # record stream once Grain's readers are done.
  record_steps, group_steps = _record_steps(data_config, seed, stage, tokenizer, instruction,
                                            text_pad_to)
  for step in record_steps:
    ds = ds.map(step)
  ds = ds.batch(corrupt_groups.GROUP, batch_fn=list)
  for step in group_steps:
    ds = ds.map(step)
  it = ds.to_iter_dataset(read_options or _default_read_options(batch_size))
  if data_config.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's workers read their absl flags' defaults; outside an absl app (notebooks, tests)
      # nothing has marked them readable. No argv is parsed here.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  it = grain.experimental.FlatMapIterDataset(it, corrupt_groups.Ungroup())
  # After the worker processes, so one tracker in the main process counts every record.
  tracker = bad_records.SkipTracker(data_config.max_skip_ratio, epoch_size=epoch_size,
                                    name=f"{data_config.source} data ({stage})",
                                    enforce=enforce_skip_ratio)

  def make_record(index: int, epoch: int):
    record = {**source[index], "epoch": epoch}
    for step in record_steps:
      record = step.map(record)
    group = [record]
    for step in group_steps:
      group = step.map(group)
    return group[0]

  it = it.map(bad_records.ReplaceBadRecords(tracker, make_record, num_records, seed))
  text_fields = TEXT_FIELDS[stage]
  canvas = image_canvas(data_config)
  if packed:
    min_tokens = packing.min_sample_tokens(
        stage, vit_min_side=data_config.vit_min_side, vit_patch=data_config.vit_patch,
        vae_min_side=data_config.vae_min_side, vae_stride=data_config.vae_stride)
    max_per_row = max(1, data_config.token_budget // min_tokens)
    scalars = ("index", "epoch", "corruption", "corruption_steps", *HOST_FIELDS[stage])
    texts = tuple(f"{f}_ids" for f in text_fields)
    it = packing.pack(it, token_budget=data_config.token_budget, num_rows=batch_size,
                      max_per_row=max_per_row, image_canvas=canvas, scalar_fields=scalars,
                      text_fields=texts, latent_budget=data_config.latent_budget)
    it = it.batch(batch_size, drop_remainder=True,
                  batch_fn=packing.CollateRows(texts, max_per_row, special["pad"], MIN_TEXT_PAD))
  else:
    collate = batch_maps.Collate(
        text_fields, special["pad"], None if data_config.source == "shapes" else canvas,
        text_limits(data_config, stage, text_pad_to))
    it = it.batch(batch_size, drop_remainder=True, batch_fn=collate)
  if format_rows is not None:
    it = it.map_with_index(batch_maps.FormatRows(format_rows, seed))
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=FORMAT_AHEAD)
  return Pipeline(it, tracker, num_records=num_records, epoch_size=epoch_size,
                  batch_size=batch_size, stage=stage, process_count=process_count)
