"""Config files, variants, overrides and validation errors."""

import glob
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from robust_u1_jax import config_inputs, config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
SFT = os.path.join(ROOT, "configs", "sft.py")
# Paths a user passes on the command line for the variants that read real data.
USER_PATHS = {"init_from": "/data/model", "data.path": "/data/set", "eval_data.path": "/data/set"}


def _variants(path):
  if os.path.basename(path) == "demo.py":
    return ["default", "quick"]
  text = open(path).read()
  return [v for v in ("tiny", "bagel_7b") if f'"{v}"' in text]


def _user_paths(path):
  """What a user gives on the command line for the variants that read real data."""
  name = os.path.basename(path)
  if name == "eval.py":
    return {"model": "/data/model"}
  if name == "demo.py":
    return {}
  paths = dict(USER_PATHS)
  if name == "rl.py":
    paths["rl.clip_checkpoint"] = "/data/clip.safetensors"
  return paths


@pytest.mark.parametrize("path", CONFIGS)
def test_every_variant_loads_and_validates(path):
  variants = _variants(path)
  assert variants, f"{path} names no variant"
  for variant in variants:
    paths = _user_paths(path)
    raw = config_lib.load_file(f"{path}:{variant}")
    for prefix in ("data", "eval_data"):  # the built-in world's variants read no path
      if prefix in raw and raw[prefix].source == "shapes":
        paths.pop(f"{prefix}.path", None)
    config = config_lib.load(f"{path}:{variant}", paths)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.is_locked


@pytest.mark.parametrize("name", ["sft.py", "rl.py", "reason.py"])
def test_pod_variants_batch_alike_on_every_host(name):
  # rl.py:bagel_7b read unpacked rows of per-batch text widths, which a run of several hosts
  # refuses: it stopped on a pod after the slice was made.
  from robust_u1_jax.training import trainer

  path = os.path.join(ROOT, "configs", name)
  config = config_lib.load(f"{path}:bagel_7b", _user_paths(path))
  trainer.check_shards_agree(config, 8, config.stage)


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match="tiny, bagel_7b"):
    config_lib.load(f"{SFT}:huge")


def test_override_and_unknown_field():
  c = config_lib.load(f"{SFT}:tiny", {"data.batch_size": 3})
  assert c.data.batch_size == 3
  with pytest.raises(config_lib.ConfigError, match="data.batchsize.*batch_size"):
    config_lib.load(f"{SFT}:tiny", {"data.batchsize": 3})


def test_wrong_type_is_refused_in_words():
  with pytest.raises(config_lib.ConfigError, match=r"data.batch_size='many': data.batch_size "
                     r"takes an integer \(the config has 8\)$"):
    config_lib.load(f"{SFT}:tiny", {"data.batch_size": "many"})
  with pytest.raises(config_lib.ConfigError, match=r"data=1: data is a section"):
    config_lib.load(f"{SFT}:tiny", {"data": 1})
  assert config_lib.load(f"{SFT}:tiny", {"optimizer.learning_rate": 1}).optimizer.learning_rate == 1


@pytest.mark.parametrize("field,value,message", [
    ("data.severity", -1, "data.severity"),
    ("data.severity", 6, "1..5"),
    ("data.intensity", 1.5, "data.intensity"),
    ("data.intensity_draw", "image", "stage, record"),
    ("data.clean_fraction", 1.0, r"in \[0, 1\)"),
    ("guidance.text_scale", 0.5, ">= 1"),
    ("guidance.image_scale", 0.0, ">= 1"),
    ("guidance.renorm_type", "none", "global, channel, text_channel"),
    ("data.image_size", 72, "multiple of data.vae_stride"),
    ("data.image_size", 16, ">= 32"),
    ("data.source", "webdataset", "shapes, folder, tfds"),
    ("data.corruption", "rain", "gaussian_noise"),
    ("data.vae_max_side", 70, "multiple of data.vae_stride"),
    ("data.max_skip_ratio", 1.5, "fraction"),
    ("mesh.fsdp", 0, "mesh.fsdp"),
    ("optimizer.learning_rate", -1.0, "positive"),
    ("remat", "some", "none, full, dots"),
    # A user walkthrough trained 300 steps on text_dropout=1.5; eval_num_steps=1 was a traceback.
    ("text_dropout", 1.5, "fraction"),
    ("vae_dropout", -0.5, "fraction"),
    ("timestep_shift", 0.0, "> 0"),
    ("eval_num_steps", 1, ">= 2"),
    ("seed", -1, ">= 0"),
    ("optimizer.eps", 0.0, "> 0"),
    ("guidance.renorm_min", 1.5, "fraction"),
    ("data.shapes_size", 0, "positive"),
    ("timestep_shift", float("inf"), "a finite number"),  # inf > 0, and the loss went NaN
])
def test_impossible_values_name_the_field(field, value, message):
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.load(f"{SFT}:tiny", {field: value})
  assert field.split(".")[-1] in str(info.value)


@pytest.mark.parametrize("path,field,value,named,message", [
    ("rl.py", "rl.noise_level", 0.0, "rl.noise_level", "> 0"),
    ("rl.py", "rl.noise_level", float("inf"), "rl.noise_level", "a finite number"),
    ("rl.py", "rl.adv_clip", 0.0, "rl.adv_clip", "> 0"),
    ("rl.py", "rl.clip_alpha", -1.0, "rl.clip_alpha", "> 0"),
    ("rl.py", "rl.reward_weights.ssim", -1.0, "rl.reward_weights", "weights >= 0"),
    ("rl.py", "rl.eval_num_steps", 1, "rl.eval_num_steps", ">= 2"),
    ("rl.py", "rl.timestep_shift", 0.0, "rl.timestep_shift", "> 0"),
    ("reason.py", "reason.recovery_steps", 1, "reason.recovery_steps", ">= 2"),
])
def test_impossible_stage_values_name_the_field(path, field, value, named, message):
  overrides = {"init_from": "random", field: value}
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.load(os.path.join(ROOT, "configs", path) + ":tiny", overrides)
  assert f"config field {named} = " in str(info.value)


def test_a_shorter_token_budget_alone_names_the_latent_budget_it_keeps():
  # As the README's `bench aot` example shortens the 7B rows: the split must shorten with them.
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load(os.path.join(ROOT, "configs", "sft.py:bagel_7b"), {"data.token_budget": 8192})
  message = str(info.value)
  assert message.startswith("config field data.latent_budget = 19456 is invalid"), message
  assert "data.token_budget (8192)" in message
  assert "token_budget given alone keeps the variant's share" in message


@pytest.mark.parametrize("field,value,message", [
    ("max_skip_ratio", 1.0, "a fraction in"),
    ("benchmark_samples", -1, "0 .every row."),
    ("severities", (6,), "1..5"),
    ("claim_samples", -1, "0 .num_samples."),
    # Past the split, the evaluation stopped on a record index after loading the model.
    ("claim_samples", 1024, "at most the world's 1,000 test records"),
    ("num_samples", 1001, "at most the world's 1,000 test records"),
    # 0 evaluates benchmark tables alone: without one there is nothing to evaluate.
    ("num_samples", 0, "or 0 beside a benchmark table"),
    ("benchmark_images", "crop", "whole, square"),
    ("seed", -1, ">= 0"),
])
def test_impossible_evaluation_values_name_the_field(field, value, message):
  with pytest.raises(config_lib.ConfigError, match=message) as info:
    config_lib.load(os.path.join(ROOT, "configs", "eval.py") + ":tiny", {field: value})
  assert field in str(info.value)


def test_benchmark_tables_alone_compare_no_models():
  eval_py = os.path.join(ROOT, "configs", "eval.py") + ":tiny"
  alone = {"num_samples": 0, "benchmarks.rbench": "R-Bench.tsv"}
  assert config_lib.load(eval_py, alone).num_samples == 0
  with pytest.raises(config_lib.ConfigError, match="compare.sft compare models on the built-in "
                     "world's images, which num_samples = 0 leaves out"):
    config_lib.load(eval_py, {**alone, "compare.sft": "runs/demo/sft"})


def test_the_whole_test_split_can_be_read():
  c = config_lib.load(os.path.join(ROOT, "configs", "eval.py") + ":tiny",
                      {"claim_samples": 1000, "num_samples": 1000})
  assert c.claim_samples == c.num_samples == 1000


def test_folder_source_needs_a_path():
  with pytest.raises(config_lib.ConfigError, match="data.path"):
    config_lib.load(f"{SFT}:tiny", {"data.source": "folder"})


def test_a_path_without_its_source_is_refused():
  # It trained on the built-in world without a word.
  with pytest.raises(config_lib.ConfigError, match=r"data.path = '/data/set' is invalid: allowed "
                     r"empty with data.source='shapes' .* give --config.data.source too"):
    config_lib.load(f"{SFT}:tiny", {"data.path": "/data/set"})
  with pytest.raises(config_lib.ConfigError, match="eval_data.path"):
    config_lib.load(f"{SFT}:tiny", {"eval_data.path": "/data/val.jsonl"})


def test_the_reasoning_stage_refuses_an_image_folder_at_start():
  reason = os.path.join(ROOT, "configs", "reason.py")
  with pytest.raises(config_lib.ConfigError, match=r"data.source = 'folder' .*an image folder "
                     "holds no questions"):
    config_lib.load(f"{reason}:tiny", {"data.source": "folder", "data.path": "/data/images",
                                       "init_from": "/data/model"})


def test_config_flags_override_on_the_command_line(tmp_path):
  script = tmp_path / "show.py"
  script.write_text(
      "from absl import app\n"
      "from ml_collections import config_flags\n"
      "C = config_flags.DEFINE_config_file('config', lock_config=True)\n"
      "app.run(lambda _: print(C.value.data.batch_size, C.value.optimizer.learning_rate))\n")
  out = subprocess.run(
      [sys.executable, str(script), "--config", f"{SFT}:tiny",
       "--config.data.batch_size=5", "--config.optimizer.learning_rate=0.5"],
      capture_output=True, text=True, check=True,
      env={**os.environ, "PYTHONPATH": ROOT})  # the configs import the package from this checkout
  assert out.stdout.split() == ["5", "0.5"]


def test_unknown_fields_are_named_with_the_nearest_or_the_list():
  c = config_lib.load_file(f"{SFT}:tiny")
  assert config_lib.unknown_field(c, "data.batch_size") is None
  assert config_lib.unknown_field(c, "data.batchsize") == (
      "no field data.batchsize; did you mean data.batch_size?")
  listed = config_lib.unknown_field(c, "foo")
  assert listed.startswith("no field foo; the fields are ") and "total_steps" in listed
  assert config_lib.unknown_field(c, "data.foo.bar").startswith(
      "no field data.foo; the fields of data are batch_size, ")
  assert config_lib.unknown_field(c, "seed.x") == "no field seed.x: seed holds a value (0), not " \
      "fields"
  with pytest.raises(config_lib.ConfigError, match="did you mean optimizer.learning_rate"):
    config_lib.load(f"{SFT}:tiny", {"optimizer.learningrate": 0.1})
  # A field's name where it is not, and the short names people type: the fields of that name
  # (`--config.lr` suggested lora).
  assert config_lib.unknown_field(c, "lr") == (
      "no field lr; did you mean optimizer.learning_rate?")
  assert config_lib.unknown_field(c, "batch_size") == (
      "no field batch_size; did you mean data.batch_size or eval_data.batch_size?")


def test_the_config_checks_list_what_the_code_takes():
  """config_lib imports no JAX, so it lists these itself."""
  from robust_u1_jax import sampling

  assert config_lib.GUIDANCE_RENORMS == sampling.RENORM_TYPES


def test_min_image_side():
  c = config_lib.load(f"{SFT}:tiny", {"data.min_image_side": 24})
  assert c.data.min_image_side == 24 and c.eval_data.min_image_side == 0
  with pytest.raises(config_lib.ConfigError, match="data.min_image_side"):
    config_lib.load(f"{SFT}:tiny", {"data.min_image_side": -1})


def test_pairs_are_not_corrupted_again():
  # The field named is the one at fault: eval_data's, once data's is set.
  with pytest.raises(config_lib.ConfigError, match=r"^config field eval_data.corruption = "
                     r"'robust_r1_pipeline' is invalid: allowed 'none' with eval_data.source="):
    config_lib.load(f"{SFT}:tiny", {"data.source": "jsonl", "data.path": "p.jsonl",
                                    "data.corruption": "none", "eval_data.source": "jsonl",
                                    "eval_data.path": "p.jsonl"})


def test_inputs_are_checked_before_a_run(tmp_path):
  """check_inputs: every path a config names exists and is a file or folder as it must be."""
  (tmp_path / "images" / "sub").mkdir(parents=True)
  (tmp_path / "images" / "sub" / "a.PNG").write_bytes(b"")  # any depth, any case
  (tmp_path / "no_images").mkdir()
  (tmp_path / "no_images" / "notes.txt").write_text("")
  (tmp_path / "rows.jsonl").write_text("{}\n")
  config_inputs.check_inputs(config_lib.load(f"{SFT}:tiny"))  # the built-in world: nothing to check
  config_inputs.check_inputs(config_lib.load(f"{SFT}:tiny", {
      "init_from": str(tmp_path), "data.source": "folder", "data.path": str(tmp_path / "images"),
      "eval_data.source": "jsonl", "eval_data.path": str(tmp_path / "rows.jsonl"),
      "eval_data.corruption": "none"}))
  missing = str(tmp_path / "missing")
  cases = [
      (SFT, {"init_from": missing}, "init_from = '.*missing': no such file or folder; give "
       "'random'"),
      (SFT, {"data.source": "folder", "data.path": missing}, "data.path = .*: no such folder"),
      (SFT, {"data.source": "folder", "data.path": str(tmp_path / "no_images")},
       "data.path = .*no_images': no image files under it"),
      (SFT, {"data.source": "folder", "data.path": str(tmp_path / "rows.jsonl")},
       "data.path = .*: a file, not a folder"),
      (SFT, {"eval_data.source": "jsonl", "eval_data.path": str(tmp_path / "images"),
             "eval_data.corruption": "none"},
       "eval_data.path = .*: a folder, not a file"),
      (SFT, {"data.tokenizer_dir": missing}, "data.tokenizer_dir"),
      (os.path.join(ROOT, "configs", "rl.py"), {"init_from": "random",
                                                "rl.clip_checkpoint": missing},
       "rl.clip_checkpoint"),
      (os.path.join(ROOT, "configs", "reason.py"), {
          "init_from": "random", "reason.recovered_images": "cache",
          "reason.recovery_cache": missing}, "reason.recovery_cache = .*: no such folder"),
      (os.path.join(ROOT, "configs", "eval.py"), {"model": missing}, "model = .*: no such folder"),
  ]
  for path, overrides, message in cases:
    config = config_lib.load(f"{path}:tiny", overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
      config_inputs.check_inputs(config)
  # The command that writes the recovery cache does not need it to exist yet.
  config_inputs.check_inputs(config_lib.load(f"{ROOT}/configs/reason.py:tiny", {
      "init_from": "random", "reason.recovered_images": "cache",
      "reason.recovery_cache": missing}), recovery_cache=False)
  config_inputs.check_inputs(config_lib.load(f"{SFT}:tiny", {"init_from": "gs://bucket/model"}))


def test_images_of_several_sizes_are_refused_before_a_stage_that_samples_them(tmp_path):
  """RL and on-the-fly reasoning recover a batch of one size: a folder or JSONL of several sizes
  is refused at the config check, naming two files and their sizes, not after the compile."""
  from PIL import Image

  RL, REASON = (os.path.join(ROOT, "configs", name) for name in ("rl.py", "reason.py"))
  (tmp_path / "mixed").mkdir()
  (tmp_path / "square").mkdir()
  for name, (w, h) in {"a.png": (64, 64), "b.png": (96, 64), "c.jpg": (64, 64)}.items():
    Image.new("RGB", (w, h)).save(tmp_path / "mixed" / name)
    Image.new("RGB", (h, h)).save(tmp_path / "square" / name)
  Image.new("RGB", (8, 8)).save(tmp_path / "square" / "d.png")  # too small: a bad record
  (tmp_path / "square" / "e.png").write_bytes(b"not an image")
  rows = [{"image": f"mixed/{n}", "target_image": f"mixed/{n}", "question": "q?", "answer": "A"}
          for n in ("a.png", "b.png")]
  (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  def check(path, **overrides):
    config_inputs.check_inputs(config_lib.load(f"{path}:tiny", {"init_from": "random",
                                                                 **overrides}))

  folder = {"data.source": "folder", "data.path": str(tmp_path / "mixed")}
  with pytest.raises(config_lib.ConfigError, match=r"mixed': images of several model sizes, "
                     r"width x height \(a.png: VAE 64x64, ViT 64x64; b.png: VAE 64x48.*the rl "
                     r"stage .*crop_square=True"):
    check(RL, **folder)
  (tmp_path / "sides").mkdir()
  for name, side in (("a.png", 64), ("b.png", 48)):
    Image.new("RGB", (side, side)).save(tmp_path / "sides" / name)
  with pytest.raises(config_lib.ConfigError, match=r"batch; set data.vae_min_side = "
                     r"data.vae_max_side$"):  # it named crop_square too, which was set
    check(RL, **{**folder, "data.path": str(tmp_path / "sides"), "data.crop_square": True})
  check(SFT, **folder)  # SFT's step samples nothing
  check(RL, **folder, **{"data.crop_square": True, "data.vae_min_side": 64})
  check(RL, **{**folder, "data.path": str(tmp_path / "square")})
  jsonl = {"data.source": "jsonl", "data.path": str(tmp_path / "rows.jsonl"),
           "data.corruption": "none"}
  with pytest.raises(config_lib.ConfigError, match=r"line 1 \(mixed/a.png\).*line 2 "
                     r"\(mixed/b.png\).*reason stage .*reason.recovered_images=cache"):
    check(REASON, **jsonl)
  check(REASON, **jsonl, **{"reason.recovered_images": "cache",
                            "reason.recovery_cache": str(tmp_path)})
  # Pairs without questions: the reasoning stage found every row bad at its first batch.
  (tmp_path / "pairs.jsonl").write_text("".join(
      json.dumps({"image": "square/a.png", "target_image": "square/a.png"}) + "\n"
      for _ in range(3)))
  pairs_only = {**jsonl, "data.path": str(tmp_path / "pairs.jsonl")}
  with pytest.raises(config_lib.ConfigError, match=r"pairs.jsonl': no row of the 3 read holds the "
                     r"'question' and 'answer' texts .*line 1 has: image, target_image"):
    check(REASON, **pairs_only)
  check(RL, **pairs_only)
  # The ViT copy is resized from the VAE-size image: photos of any shape cropped square to one VAE
  # size are one size (the check read the ViT size from the file and refused this variant).
  photos = {f"p{i}.png": size for i, size in enumerate([(640, 480), (1000, 300), (513, 900)])}
  for name, size in photos.items():
    Image.new("RGB", size).save(tmp_path / name)
  (tmp_path / "photos.jsonl").write_text("".join(
      json.dumps({"image": n, "target_image": n}) + "\n" for n in photos))
  pairs = {"data.path": str(tmp_path / "photos.jsonl"),
           "eval_data.path": str(tmp_path / "photos.jsonl"), "rl.reward_weights.clip": 0.0}
  config_inputs.check_inputs(config_lib.load(f"{RL}:bagel_7b", {"init_from": str(tmp_path),
                                                                **pairs}))


def test_setting_differences_name_each_changed_field_with_both_values():
  config = config_lib.load(SFT + ":tiny", {"total_steps": 80, "optimizer.ema_decay": 0.9})
  saved = json.loads(config_lib.load(SFT + ":tiny").to_json_best_effort())
  assert config_lib.setting_differences(saved, config) == [
      "optimizer.ema_decay 0.99, now 0.9", "total_steps 300, now 80"]
  # Ignored names cover the fields under them; equal configs differ in nothing.
  assert config_lib.setting_differences(saved, config, ("optimizer", "total_steps")) == []
  assert config_lib.setting_differences(saved, config_lib.load(SFT + ":tiny")) == []


def test_setting_differences_leave_out_fields_only_one_side_has():
  """A newer project adds fields (their defaults keep an older run's behaviour) and drops some."""
  saved = {"seed": 0, "retired": 1, "data": {"batch_size": 8}, "intensities": [0.23, 0.45]}
  now = {"seed": 0, "new": 2, "data": {"batch_size": 8, "new_too": 3},
         "intensities": (0.23, 0.9)}
  assert config_lib.setting_differences(saved, now) == ["intensities [0.23, 0.45], now [0.23, 0.9]"]
