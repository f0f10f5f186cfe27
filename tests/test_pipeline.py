"""Grain pipelines: batch schema, per-process slices, exact resume, bad inputs, packing."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from robust_u1_jax import config_defaults, config_lib
from robust_u1_jax.data import answer_format
from robust_u1_jax.data import bad_records
from robust_u1_jax.data import packing
from robust_u1_jax.data import pipeline
from robust_u1_jax.data import sequence
from robust_u1_jax.data import shapes
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.data import transforms

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer()


def _data(stage="sft", **overrides):
  # A cheap corruption with one compilation (traced severity) unless a test names another.
  overrides.setdefault("corruption", "gaussian_noise")
  overrides = {f"data.{k}": v for k, v in overrides.items()}
  overrides["init_from"] = "random"
  config_file = {"sft": "sft.py", "rl": "rl.py", "reason": "reason.py", "vqa": "reason.py"}[stage]
  return config_lib.load(os.path.join(CONFIGS, config_file) + ":tiny", overrides).data


def _take(p, n):
  return [next(p) for _ in range(n)]


def _assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w)
    for key in w:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_sft_batch_schema(tok):
  data = _data(shapes_size=64, batch_size=4)
  p = pipeline.make_pipeline(data, seed=0, tokenizer=tok)
  batch = next(p)
  b = 4
  for key in ("clean", "corrupted", "corrupted_vit"):
    assert batch[key].shape == (b, 64, 64, 3) and batch[key].dtype == np.uint8
    np.testing.assert_array_equal(batch[f"{key}_hw"], np.full((b, 2), 64))
  assert batch["index"].dtype == np.int32 and batch["epoch"].tolist() == [0] * b
  assert (batch["corruption"] == "imagenet_c/gaussian_noise").all()
  assert (batch["corruption_steps"] == "imagenet_c/gaussian_noise(3)").all()
  # Corrupted on the fly from the clean world image of that index.
  world = shapes.ShapesWorld("train", size=64, image_size=64)
  for i, index in enumerate(batch["index"]):
    np.testing.assert_array_equal(batch["clean"][i], world[int(index)]["image"])
  assert np.mean([np.any(c != k) for c, k in zip(batch["clean"], batch["corrupted"])]) >= 0.5
  ids, lengths = batch["instruction_ids"], batch["instruction_lengths"]
  assert ids.dtype == np.int32 and ids.shape[1] >= lengths.max()
  text = tok.decode(ids[0, :lengths[0]].tolist())
  assert text == tokenizer_lib.text_block(tokenizer_lib.RECOVERY_INSTRUCTION)
  assert (ids[0, lengths[0]:] == tokenizer_lib.special_token_ids(tok)["pad"]).all()
  assert p.metrics() == {"skipped": 0, "seen": b, "skip_ratio": 0.0}


@pytest.mark.parametrize("num_records", [40, 42])
def test_process_slices_partition_each_epoch(tok, num_records):
  data = _data(shapes_size=num_records, batch_size=4, corruption="none")
  epoch_size = num_records // 4
  per_process = []
  for pi in range(4):
    p = pipeline.make_pipeline(data, seed=3, process_index=pi, process_count=4, tokenizer=tok)
    assert p.batch_size == 1 and p.epoch_size == epoch_size
    batches = _take(p, 2 * epoch_size)
    per_process.append([(int(b["index"][0]), int(b["epoch"][0])) for b in batches])
  for epoch in (0, 1):
    slices = [[i for i, e in pp if e == epoch] for pp in per_process]
    if epoch == 0:  # 2 * epoch_size records each reach past epoch 0
      assert sorted(len(s) for s in slices) == [epoch_size] * (4 - num_records % 4) + [
          epoch_size + 1] * (num_records % 4)
    union = [i for s in slices for i in s]
    assert len(set(union)) == len(union)  # no record is read by two processes
    if epoch == 0:  # together: the whole dataset, the remainder included
      assert sorted(union) == list(range(num_records))
  # Each epoch is shuffled anew.
  assert [i for i, e in per_process[0] if e == 0] != [i for i, e in per_process[0] if e == 1]


def test_resume_reads_the_same_batches_across_an_epoch(tok):
  # 24 records, batches of 8: steps 2..5 cross into epoch 1, whose corruption keys differ.
  data = _data(shapes_size=24, batch_size=8, severity=0)  # severity drawn per record
  p = pipeline.make_pipeline(data, seed=7, tokenizer=tok)
  _take(p, 2)
  state = json.loads(json.dumps(p.get_state()))  # as the Orbax handler stores it
  expected = _take(p, 3)
  assert {int(e) for b in expected for e in b["epoch"]} == {0, 1}
  resumed = pipeline.make_pipeline(data, seed=7, tokenizer=tok)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected)
  assert resumed.metrics()["seen"] == p.metrics()["seen"] == 40
  # Corruption is a function of (seed, index, epoch): the same record corrupts the same way
  # when another process layout delivers it.
  other = pipeline.make_pipeline(data, seed=7, process_index=1, process_count=2, tokenizer=tok)
  by_key = {(int(i), int(e)): c for b in expected
            for i, e, c in zip(b["index"], b["epoch"], b["corrupted"])}
  matched = 0
  for b in _take(other, 3):
    for i, e, c in zip(b["index"], b["epoch"], b["corrupted"]):
      if (int(i), int(e)) in by_key:
        np.testing.assert_array_equal(c, by_key[(int(i), int(e))])
        matched += 1
  assert matched > 0


def test_resume_on_data_of_another_size_says_so(tok, caplog):
  # Images added to a folder between a stop and its resume: the order is drawn over the records
  # there are, so the resumed run reads other batches. It goes on, and says why.
  p = pipeline.make_pipeline(_data(shapes_size=24, batch_size=4), seed=7, tokenizer=tok)
  _take(p, 2)
  state = json.loads(json.dumps(p.get_state()))
  assert state["records"] == 24
  same = pipeline.make_pipeline(_data(shapes_size=24, batch_size=4), seed=7, tokenizer=tok)
  same.set_state(state)
  assert "records" not in caplog.text
  grown = pipeline.make_pipeline(_data(shapes_size=28, batch_size=4), seed=7, tokenizer=tok)
  grown.set_state(state)
  assert ("the data holds 28 records now, 24 when this position was saved: the resumed run "
          "reads other batches") in caplog.text
  assert len(_take(grown, 1)) == 1


def test_resume_through_orbax_checkpointer(tok, tmp_path):
  import jax.numpy as jnp
  from robust_u1_jax.training import checkpoint

  data = _data(shapes_size=32, batch_size=4, corruption="none")
  p = pipeline.make_pipeline(data, seed=1, tokenizer=tok)
  _take(p, 3)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
  ckpt.save(3, {"w": jnp.zeros(2)}, p, {"step": 3}, force=True)
  ckpt.close()
  expected = _take(p, 2)
  resumed = pipeline.make_pipeline(data, seed=1, tokenizer=tok)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
  step, _, _ = ckpt.restore(checkpoint.abstract_like({"w": jnp.zeros(2)}), resumed)
  ckpt.close()
  assert step == 3
  _assert_batches_equal(_take(resumed, 2), expected)


def test_resume_refuses_another_record_order(tok, tmp_path):
  """A data position is stamped with the order its shards read the record stream in. Unstamped
  positions (older versions) of 2 shards over 33 records may come from an order that read other
  records: refused in one line and kept in place. Over 32 records, or on one shard, both orders
  read one stream: they resume, as a stamped position of 2 shards does."""
  import jax.numpy as jnp
  from robust_u1_jax.training import checkpoint

  state = {"w": jnp.zeros(2)}

  def save(workdir, records, stamp, **shard):
    data = _data(shapes_size=records, batch_size=4, corruption="none")
    p = pipeline.make_pipeline(data, seed=1, tokenizer=tok, **shard)
    _take(p, 2)
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=1, async_save=False)
    ckpt.save(2, state, p, {"step": 2}, force=True)
    ckpt.close()
    position = os.path.join(workdir, "checkpoints", "2", "data", "process_0-of-1.json")
    with open(position) as f:
      saved = json.load(f)
    assert saved["stream_order"] == pipeline.STREAM_ORDER
    if not stamp:
      del saved["stream_order"]
      with open(position, "w") as f:
        json.dump(saved, f)
    return _take(p, 1)

  def restore(workdir, records, **shard):
    data = _data(shapes_size=records, batch_size=4, corruption="none")
    p = pipeline.make_pipeline(data, seed=1, tokenizer=tok, **shard)
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=1, async_save=False)
    try:
      return ckpt.restore(checkpoint.abstract_like(state), p), p
    finally:
      ckpt.close()

  shards = {"process_index": 0, "process_count": 2}
  refused = str(tmp_path / "refused")
  save(refused, 33, stamp=False, **shards)
  with pytest.raises(checkpoint.UnreadableCheckpoints, match="has no record order") as e:
    restore(refused, 33, **shards)
  assert "process_0-of-1.json" in str(e.value) and "another --workdir" in str(e.value)
  assert os.listdir(os.path.join(refused, "checkpoints")) == ["2"]  # not moved aside
  # A file that holds no position at all is a damaged checkpoint, not one of another order.
  with open(os.path.join(refused, "checkpoints", "2", "data", "process_0-of-1.json"), "w") as f:
    json.dump({"x": 1}, f)
  with pytest.raises(checkpoint.UnreadableCheckpoints, match="no checkpoint can be restored"):
    restore(refused, 33, **shards)

  for name, records, stamp, shard in [("divides", 32, False, shards), ("stamped", 33, True, shards),
                                      ("one", 33, False, {})]:
    workdir = str(tmp_path / name)
    expected = save(workdir, records, stamp, **shard)
    (step, _, _), resumed = restore(workdir, records, **shard)
    assert step == 2, name
    _assert_batches_equal(_take(resumed, 1), expected)


def _write_folder(root, n_good, n_bad):
  rng = np.random.default_rng(0)
  os.makedirs(root)
  for i in range(n_good):
    h, w = (40, 30) if i % 2 else (64, 96)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(root, f"good_{i:02d}.png"))
  for i in range(n_bad):
    with open(os.path.join(root, f"bad_{i:02d}.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n-truncated" if i % 2 else b"")


def _unshuffled_folder(root, n_good, n_bad, **overrides):
  """A folder of images, the bad ones first (sorted names), read once in order."""
  _write_folder(root, n_good=n_good, n_bad=n_bad)
  return _data(source="folder", path=root, corruption="none", num_epochs=1, shuffle=False,
               **overrides)


def test_bad_files_are_counted_and_stop_the_run(tok, tmp_path):
  root = str(tmp_path / "images")
  data = _unshuffled_folder(root, 14, 2, batch_size=2, max_skip_ratio=0.2)
  p = pipeline.make_pipeline(data, seed=0, tokenizer=tok)
  batches = list(p)
  # Each bad file's place is taken by a good record, so the epoch keeps its 16 rows.
  assert len(batches) == 8
  assert p.metrics() == {"skipped": 2, "seen": 16, "skip_ratio": 2 / 16}
  source = sorted(os.listdir(root))  # the folder source's order: bad_00, bad_01, good_00, ...
  indices = [int(i) for b in batches for i in b["index"]]
  assert indices[2:] == list(range(2, 16))
  assert all(source[i].startswith("good_") for i in indices[:2])
  # Variable sizes: BAGEL's VAE rule (max 64, min 32, stride 16), placed on a 64 x 64 canvas.
  hws = {tuple(int(v) for v in hw) for b in batches for hw in b["clean_hw"]}
  rule = transforms.resize_rule(data, "vae")
  assert hws == {transforms.bagel_size(40, 30, **rule), transforms.bagel_size(64, 96, **rule)}
  for b in batches:
    assert b["clean"].shape == (2, 64, 64, 3)
    for img, (h, w) in zip(b["clean"], b["clean_hw"]):
      assert not img[h:].any() and not img[:, w:].any()
  # Past max_skip_ratio the run stops, naming the bad files.
  strict = pipeline.make_pipeline(_data(source="folder", path=root, batch_size=2,
                                        corruption="none", max_skip_ratio=0.05, shuffle=False),
                                  seed=0, tokenizer=tok)
  with pytest.raises(bad_records.TooManyBadRecords, match="bad_0"):
    _take(strict, 10)


def _global_batches(per_process: list[list[dict]]) -> list[dict]:
  """Each step's per-process batches, stacked in process order (multihost.global_batch's rows)."""
  return [{k: np.concatenate([b[k] for b in step]) for k in step[0]}
          for step in zip(*per_process)]


def test_bad_records_leave_every_process_reading_the_batches_of_one(tok, tmp_path):
  # The processes read different numbers of bad files. Dropped, they moved the later rows of the
  # process that read more, and it ran out of data first: a finite num_epochs then ended one
  # process while the other waited for it.
  root = str(tmp_path / "images")
  _write_folder(root, n_good=13, n_bad=3)
  data = _data(source="folder", path=root, batch_size=4, max_skip_ratio=0.5, num_epochs=2,
               shuffle=True, severity=0)
  reader = pipeline.make_pipeline(data, seed=0, tokenizer=tok)
  one = list(reader)
  readers = [pipeline.make_pipeline(data, seed=0, process_index=i, process_count=2,
                                    tokenizer=tok) for i in range(2)]
  per_process = [list(r) for r in readers]
  skipped = [r.metrics()["skipped"] for r in readers]
  assert sum(skipped) == reader.metrics()["skipped"] == 6  # 3 bad files, 2 epochs
  assert skipped == [1, 5]
  assert len(one) == 8 and [len(b) for b in per_process] == [8, 8]
  _assert_batches_equal(_global_batches(per_process), one)
  source = sorted(os.listdir(root))
  rows = [(int(i), int(e)) for b in one for i, e in zip(b["index"], b["epoch"])]
  assert all(source[i].startswith("good_") for i, _ in rows)
  assert len(set(rows)) == len(rows) - 6  # each replacement is a good record read twice


def test_processes_read_the_batches_of_one_whatever_the_record_count(tok):
  # 43 records over 2 processes and 3 shuffled epochs: the global batches of 8 straddle the
  # epochs, as one process's do. Dropping 43 % 2 records per epoch made the batches differ.
  data = _data(shapes_size=43, batch_size=8, num_epochs=3)
  one = list(pipeline.make_pipeline(data, seed=4, tokenizer=tok))
  per_process = [list(pipeline.make_pipeline(data, seed=4, process_index=i, process_count=2,
                                             tokenizer=tok)) for i in range(2)]
  assert len(one) == 129 // 8 and [len(b) for b in per_process] == [len(one)] * 2
  _assert_batches_equal(_global_batches(per_process), one)
  assert {int(e) for b in one for e in b["epoch"]} == {0, 1, 2}


def test_data_that_ends_short_of_an_epoch_is_still_checked(tok, tmp_path):
  # 50 records end at 3 whole batches of 16: 48 records read, fewer than min_seen (100).
  data = _unshuffled_folder(str(tmp_path / "images"), 40, 10, batch_size=16, max_skip_ratio=0.1)
  p = pipeline.make_pipeline(data, seed=0, tokenizer=tok)
  with pytest.raises(bad_records.TooManyBadRecords, match="10 of 48"):
    list(p)


def test_packed_rows_replace_a_bad_record_too(tok, tmp_path):
  data = _unshuffled_folder(str(tmp_path / "images"), 11, 1, batch_size=2, token_budget=256,
                            max_skip_ratio=0.5)
  p = pipeline.make_pipeline(data, seed=0, tokenizer=tok)
  samples = [int(i) for b in p for row, n in zip(b["index"], b["num_samples"]) for i in row[:n]]
  assert p.metrics()["skipped"] == 1 and len(samples) == 12
  (extra,) = [i for i in set(samples) if samples.count(i) == 2]  # in bad_00's place
  assert sorted(samples) == sorted([*range(1, 12), extra])


def test_several_processes_stop_together_on_the_sum_of_their_bad_records(tok, monkeypatch):
  from jax.experimental import multihost_utils

  data = _data(shapes_size=40, batch_size=4, max_skip_ratio=0.05)
  p = pipeline.make_pipeline(data, seed=0, process_index=0, process_count=2, tokenizer=tok,
                             enforce_skip_ratio=False)
  gathered = []

  def allgather(counts, seen_each, skipped_each):
    gathered.append(counts.tolist())
    return np.asarray([[seen_each, skipped_each]] * 4, np.int32)  # 4 processes, 2 per shard

  # 20 seen, 1 bad per shard: 5 % is not past 5 %; 2 bad of 20 are, at the end of the epoch
  # (40 records) or past min_seen (100), not mid-epoch.
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda c: allgather(c, 20, 1))
  p.check_skip_ratio(replicas=2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda c: allgather(c, 20, 2))
  with pytest.raises(bad_records.TooManyBadRecords,
                     match=r"4 of 40 records read by 4 processes were unreadable"):
    p.check_skip_ratio(replicas=2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda c: allgather(c, 19, 2))
  p.check_skip_ratio(replicas=2)  # 38 of 40 records: mid-epoch, below min_seen
  with pytest.raises(bad_records.TooManyBadRecords, match="4 of 38"):
    p.check_skip_ratio(replicas=2, final=True)  # the data has ended there
  assert gathered[0] == [0, 0]  # this process's own counts, nothing read yet


def test_reason_stage_questions_and_answers(tok):
  data = _data("reason", shapes_size=32, batch_size=4)
  batch = next(pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason"))
  for key in ("question_ids", "answer_ids"):
    assert batch[key].shape[0] == 4 and batch[key].dtype == np.int32
  for i in range(4):
    answer = tok.decode(batch["answer_ids"][i, :batch["answer_lengths"][i]].tolist())
    assert answer == tokenizer_lib.text_block(str(batch["answer_text"][i]))
    assert answer_format.parse_answer(answer) == batch["answer_letter"][i]
    # The applied corruption is named in <TYPE>.
    assert "<TYPE>gaussian noise(3)<TYPE_END>" in answer
    question = tok.decode(batch["question_ids"][i, :batch["question_lengths"][i]].tolist())
    assert question.endswith(f"{tokenizer_lib.RECOVERY_INSTRUCTION}\n"
                             f"{answer_format.ANSWER_FROM_RESTORED}\n{tokenizer_lib.IM_END}")
    assert question.startswith(f"{tokenizer_lib.IM_START}Question: ") and "\nA. " in question


def test_reason_stage_records_drawn_clean_say_so(tok):
  data = _data("reason", shapes_size=32, batch_size=16, clean_fraction=0.5)
  batch = next(pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason"))
  clean_rows = 0
  for i in range(16):
    answer = str(batch["answer_text"][i])
    if np.array_equal(batch["corrupted"][i], batch["clean"][i]):
      clean_rows += 1
      assert answer.startswith("<TYPE>none<TYPE_END>") and "The image is clean" in answer
    else:
      assert "<TYPE>gaussian noise(3)<TYPE_END>" in answer
  assert 0 < clean_rows < 16


def test_sft_records_drawn_for_a_question_prompt_recover_after_it(tok):
  """data.question_prompt_fraction: those SFT records' instruction is the release's prompt for one
  of the image's own questions (the context `answer` recovers in); the rest keep the instruction,
  and their corruptions are those of a run without the option."""
  data = _data(shapes_size=32, batch_size=16, question_prompt_fraction=0.5)
  batch = next(pipeline.make_pipeline(data, seed=0, tokenizer=tok))
  plain = next(pipeline.make_pipeline(_data(shapes_size=32, batch_size=16), seed=0,
                                      tokenizer=tok))
  np.testing.assert_array_equal(batch["corrupted"], plain["corrupted"])
  world = shapes.ShapesWorld("train", size=32)
  prompts = 0
  for i in range(16):
    text = tok.decode(batch["instruction_ids"][i, :batch["instruction_lengths"][i]].tolist())
    if text == tokenizer_lib.text_block(tokenizer_lib.RECOVERY_INSTRUCTION):
      continue
    prompts += 1
    questions = world[int(batch["index"][i])]["questions"]
    assert text in {tokenizer_lib.text_block(answer_format.format_question(
        q, tokenizer_lib.RECOVERY_INSTRUCTION)) for q in questions}, text
  assert 0 < prompts < 16
  with pytest.raises(config_lib.ConfigError, match="data.question_prompt_fraction = 1.5"):
    _data(question_prompt_fraction=1.5)


def test_text_widths_fix_one_field_and_name_the_setting(tok):
  data = _data("reason", shapes_size=32, batch_size=4)
  make = lambda: next(pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason"))
  bucketed = make()
  longest = int(bucketed["answer_lengths"].max())
  data.text_widths.answer = longest + 3
  fixed = make()
  assert fixed["answer_ids"].shape == (4, longest + 3)
  np.testing.assert_array_equal(fixed["answer_ids"][:, :longest],
                                bucketed["answer_ids"][:, :longest])
  assert fixed["question_ids"].shape == bucketed["question_ids"].shape  # still its bucket
  assert not pipeline.fixed_rows(data, "reason")  # the question's width still varies
  data.text_widths.question = 128
  assert pipeline.fixed_rows(data, "reason") and not pipeline.fixed_rows(data, "pretrain")
  # A record whose text is longer is a bad record naming the setting: logged, counted and
  # replaced (not a stop hours into a run); where most records are, the skip ratio stops the run.
  data.text_widths.answer = longest - 1
  data.max_skip_ratio = 0.9
  p = pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason")
  narrow = next(p)
  assert narrow["answer_ids"].shape == (4, longest - 1)
  assert p.tracker.metrics()["skipped"] >= 1
  reasons = {reason for _, _, reason in p.tracker.recent()}
  assert reasons == {f"the answer text is {longest} tokens, more than data.text_widths.answer = "
                     f"{longest - 1}: raise data.text_widths.answer to hold it"}
  data.text_widths.answer = 0
  data.text_pad_to = longest - 1
  p = pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason")
  assert next(p)["answer_ids"].shape == (4, longest - 1)
  assert {reason for _, _, reason in p.tracker.recent()} == {
      f"the answer text is {longest} tokens, more than data.text_pad_to = {longest - 1}: raise "
      "data.text_pad_to to hold it"}


def test_config_names_the_pipelines_text_fields():
  assert set(config_defaults.TEXT_FIELDS) == {f for fields in pipeline.TEXT_FIELDS.values()
                                         for f in fields}
  with pytest.raises(config_lib.ConfigError, match="data.text_widths.answer = -1 is invalid"):
    _data("reason", **{"text_widths.answer": -1})


def test_packed_pipeline_rows(tok):
  data = _data(shapes_size=64, batch_size=2, corruption="none", token_budget=256)
  p = pipeline.make_pipeline(data, seed=0, tokenizer=tok)
  unpacked = pipeline.make_pipeline(_data(shapes_size=64, batch_size=2, corruption="none"),
                                    seed=0, tokenizer=tok)
  order = [int(i) for b in _take(unpacked, 16) for i in b["index"]]
  rows = [row for b in _take(p, 3) for row in
          ({k: v[r] for k, v in b.items()} for r in range(2))]
  packed_order = []
  for row in rows:
    assert row["segment_ids"].shape == (256,)
    n = int(row["num_samples"])
    assert n >= 2  # 64 x 64 sft samples take about 110 tokens
    for k, sample in enumerate(packing.unpack_row(row)):
      assert sample["clean"].shape == (64, 64, 3)
      # The packer measured each sample with the blocks the SFT rows are built from.
      blocks = sequence.sft_blocks(sample)
      assert (row["segment_ids"] == k + 1).sum() == sequence.lengths(
          blocks, data.vit_patch, data.vae_stride)[0]
      packed_order.append(int(sample["index"]))
  # Packing keeps whole samples of the same stream, in rounds of consecutive samples.
  assert sorted(packed_order) == sorted(order[:len(packed_order)])
  # A packed pipeline resumes exactly too (Grain re-packs the open round from its records).
  state = json.loads(json.dumps(p.get_state()))
  expected = _take(p, 2)
  resumed = pipeline.make_pipeline(data, seed=0, tokenizer=tok)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 2), expected)



def test_format_rows_is_the_last_map_seeded_by_batch_number(tok):
  """The step's inputs come out of the pipeline, batch n formatted with (seed, n), so a resumed
  run formats its batches as the uninterrupted run did."""
  def format_rows(batch, rng):
    return {"index": batch["index"], "draw": rng.integers(1 << 30, size=1)}

  data = _data(shapes_size=24, batch_size=4, corruption="none")
  plain = _take(pipeline.make_pipeline(data, seed=3, tokenizer=tok), 4)
  p = pipeline.make_pipeline(data, seed=3, tokenizer=tok, format_rows=format_rows)
  got = _take(p, 2)
  state = json.loads(json.dumps(p.get_state()))
  got += _take(p, 2)
  for n, (rows, batch) in enumerate(zip(got, plain)):
    np.testing.assert_array_equal(rows["index"], batch["index"])
    assert rows["draw"] == np.random.default_rng([3, n]).integers(1 << 30, size=1)
  resumed = pipeline.make_pipeline(data, seed=3, tokenizer=tok, format_rows=format_rows)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 2), got[2:])
  p.close()
  resumed.close()

def test_reason_stage_on_jsonl_pairs(tok, tmp_path):
  rng = np.random.default_rng(0)
  rows = []
  for i in range(4):
    clean = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(clean).save(tmp_path / f"clean_{i}.png")
    Image.fromarray(255 - clean).save(tmp_path / f"degraded_{i}.png")
    rows.append({"prompt": "restore", "image": f"degraded_{i}.png",
                 "target_image": f"clean_{i}.png", "question": f"Question {i}?",
                 "answer": f"<REASONING>r{i}<REASONING_END>\n<ANSWER>B<ANSWER_END>"})
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  data = _data("reason", source="jsonl", path=str(path), corruption="none", batch_size=4,
               shuffle=False)
  batch = next(pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason"))
  assert batch["index"].tolist() == [0, 1, 2, 3]
  assert (batch["corruption"] == "dataset").all() and (batch["answer_letter"] == "B").all()
  for i in range(4):
    answer = tok.decode(batch["answer_ids"][i, :batch["answer_lengths"][i]].tolist())
    assert answer == tokenizer_lib.text_block(rows[i]["answer"])
    question = tok.decode(batch["question_ids"][i, :batch["question_lengths"][i]].tolist())
    assert question.startswith(f"{tokenizer_lib.IM_START}Question: Question {i}?\n")
    # The stored pair: the clean target and the degraded input, resized together.
    h, w = batch["clean_hw"][i]
    clean, corrupted = batch["clean"][i, :h, :w], batch["corrupted"][i, :h, :w]
    assert (h, w) == tuple(batch["corrupted_hw"][i])
    assert np.abs(clean.astype(int) + corrupted.astype(int) - 255).mean() < 8

  # An answer without the format's answer field is that field alone, as `answer` reads it (a bare
  # "C" trained as it stands, with no letter for the base's evaluation).
  rows[1]["answer"] = " C "
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  batch = next(pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason"))
  assert batch["answer_letter"].tolist() == ["B", "C", "B", "B"]
  answer = tok.decode(batch["answer_ids"][1, :batch["answer_lengths"][1]].tolist())
  assert answer == tokenizer_lib.text_block(answer_format.bare_answer("C"))

  # An answer wider than its fixed width is a bad record naming its line (it said "answer_ids of
  # 848 tokens"): past data.max_skip_ratio the run stops with it, else another row takes its place.
  rows[2]["answer"] = "<REASONING>" + "long " * 200 + "<REASONING_END>\n<ANSWER>B<ANSWER_END>"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  data = _data("reason", source="jsonl", path=str(path), corruption="none", batch_size=4,
               shuffle=False, **{"text_widths.answer": 64})
  with pytest.raises(bad_records.TooManyBadRecords,
                     match=rf"line 3 of {re.escape(str(path))}: the answer text is \d+ tokens, "
                           r"more than "
                           r"data.text_widths.answer = 64: raise data.text_widths.answer"):
    next(pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason"))
  data.max_skip_ratio = 0.5
  batch = next(pipeline.make_pipeline(data, seed=0, tokenizer=tok, stage="reason"))
  assert batch["index"].tolist()[:2] == [0, 1] and batch["index"][2] != 2
