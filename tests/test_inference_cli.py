"""`python -m robust_u1_jax.recover --model` and `python -m robust_u1_jax.answer` on a tiny random
model: what they write, what they print, and how they refuse bad input.

The CLIs run in process through their `run(argv)` (a subprocess pays the JAX import and every
compile again); one test goes through the real entry points for --help and the exit status.
"""

import json
import os
import signal
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from robust_u1_jax import answer as answer_cli
from robust_u1_jax import recover as recover_cli
from robust_u1_jax.inference import engine as engine_lib
from robust_u1_jax.inference import images
from robust_u1_jax.inference import reasoner
from robust_u1_jax.inference import recovery

RULES = images.ImageRules(64, 32, 16, 64, 32, 8)
FAST = ("--steps=3", "--noprogress")  # three sampler steps: every code path, little compute


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, random_bagel):
  from robust_u1_jax.checkpoints import orbax_io
  from robust_u1_jax.data import tokenizer as tl
  from robust_u1_jax.models import bagel

  tok = tl.load_tokenizer()
  model = random_bagel(bagel.BagelConfig.tiny(vocab_size=len(tok)))
  path = str(tmp_path_factory.mktemp("cli") / "model")
  orbax_io.save_orbax(model, path, tokenizer_dir=tl.default_tokenizer_dir())
  RULES.save(path)
  return path


def _image(height: int, width: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A folder: two 64x64 images, a 60 x 100 one, a truncated PNG and a text file."""
  folder = tmp_path_factory.mktemp("cli") / "photos"
  folder.mkdir()
  Image.fromarray(_image(64, 64, 0)).save(folder / "a.png")
  Image.fromarray(_image(64, 64, 1)).save(folder / "b.jpg", quality=95)
  Image.fromarray(_image(60, 100, 2)).save(folder / "wide.png")
  whole = (folder / "a.png").read_bytes()
  (folder / "truncated.png").write_bytes(whole[:len(whole) // 2])
  (folder / "notes.txt").write_text("not an image\n")
  return folder


def _run(cli, capsys, *args: str) -> tuple[int, str, str]:
  rc = cli.run([cli.__name__, *args])
  out = capsys.readouterr()
  return rc, out.out, out.err


def _pixels(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_recover_file_writes_the_vae_size_beside_the_input(capsys, model_dir, inputs, tmp_path):
  photo = tmp_path / "photo.png"
  photo.write_bytes((inputs / "a.png").read_bytes())
  rc, out, err = _run(recover_cli, capsys, f"--model={model_dir}", f"--image={photo}", *FAST)
  assert rc == 0, err
  written = tmp_path / "photo_recovered.png"
  # A line once the model is loaded (the first result waits for the compiles), one when written.
  assert re.fullmatch(rf"loaded {model_dir} in \d+\.\d s; recovering \(a first run compiles the "
                      rf"model's programs first\)\nwrote {written} \(64x64\)", out.strip())
  assert _pixels(written).shape == (64, 64, 3)

  out_path = tmp_path / "new" / "wide.png"  # a missing parent folder is created
  rc, _, err = _run(recover_cli, capsys, f"--model={model_dir}",
                    f"--image={inputs / 'wide.png'}", f"--out={out_path}", *FAST)
  assert rc == 0, err
  assert _pixels(out_path).shape[:2] == RULES.vae_size(60, 100) == (32, 64)
  # Without --noprogress, a bar over the sampler's steps (a 7B model's take seconds each).
  rc, _, err = _run(recover_cli, capsys, f"--model={model_dir}", f"--image={photo}",
                    f"--out={tmp_path / 'barred.png'}", "--steps=3")
  assert rc == 0, err
  assert re.search(r"recovering: 100%.*\b3/3\b", err.replace("\r", "\n").splitlines()[-1]), err
  # A model whose stage trained no recovery (the demo's vae and vit parts) draws noise: said so.
  recovery.save_no_recovery(model_dir, "bootstrap_vae")
  try:
    rc, out, err = _run(recover_cli, capsys, f"--model={model_dir}", f"--image={photo}",
                        f"--out={tmp_path / 'noise.png'}", *FAST)
  finally:
    os.remove(os.path.join(model_dir, "no_recovery.json"))
  assert rc == 0, err
  assert (f"note: {model_dir} is the model of the bootstrap_vae stage, which trains no recovery: "
          "its language model never learned to recover an image or to answer") in out


@pytest.mark.slow
def test_recover_folder_goes_past_bad_files_and_resumes(capsys, model_dir, inputs, tmp_path):
  out_dir = tmp_path / "out" / "recovered"
  args = (f"--model={model_dir}", f"--image={inputs}", f"--out={out_dir}", "--batch=2", *FAST)
  (inputs / "more").mkdir()  # read by training (recursively), not here: said so
  try:
    rc, out, err = _run(recover_cli, capsys, *args)
  finally:
    (inputs / "more").rmdir()
  assert rc == 1
  assert ", 1 subfolder(s) not read (more/: give each as --image) in " in out
  assert f"loaded {model_dir} in " in out and "; recovering 3 images (a first run" in out
  assert sorted(os.listdir(out_dir)) == ["a.png", "b.png", "wide.png"]
  assert _pixels(out_dir / "wide.png").shape[:2] == RULES.vae_size(60, 100)
  assert _pixels(out_dir / "a.png").shape[:2] == (64, 64)
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  # A file not named as an image is left out, as an image folder for training leaves it out; it
  # was tried, failed and made every run of a folder with notes beside its images exit 1.
  assert len(errors) == 1 and f"{inputs / 'truncated.png'}: cannot decode image" in errors[0]
  assert (f"{out_dir}: 3 written, 0 skipped (already there), 1 failed (truncated.png), 1 left "
          "out (not named as images: notes.txt)") in out

  # a.png is image 0 of the listing, as a single file is: same noise, so the same recovery
  # whether it was recovered alone or in a batch of two.
  alone = tmp_path / "alone.png"
  assert _run(recover_cli, capsys, f"--model={model_dir}", f"--image={inputs / 'a.png'}",
              f"--out={alone}", *FAST)[0] == 0
  diff = np.abs(_pixels(alone).astype(int) - _pixels(out_dir / "a.png"))
  assert diff.max() <= 2 and diff.mean() < 0.05

  before = {n: os.stat(out_dir / n).st_mtime_ns for n in os.listdir(out_dir)}
  rc, out, err = _run(recover_cli, capsys, *args)
  assert rc == 1
  assert "0 written, 3 skipped (already there), 1 failed (truncated.png), 1 left out" in out
  assert {n: os.stat(out_dir / n).st_mtime_ns for n in os.listdir(out_dir)} == before


def test_one_option_that_reads_as_several_is_noted(capsys):
  answer_cli._check_option_letters(["red, green, blue"])
  assert capsys.readouterr().err == ("note: --options gives one option, 'red, green, blue'; give "
                                     "each option with its own --options\n")
  answer_cli._check_option_letters(["A. red", "B. green"])  # letters of their own: as given
  answer_cli._check_option_letters(["red", "green"])
  assert capsys.readouterr().err == ""


def test_folder_output_names_never_collide():
  # a.jpg and a.png share a stem, so a.jpg's file is a.jpg.png, which is a.jpg.png's `<stem>.png`:
  # each input keeps a file of its own (two recoveries were written to one file, one lost).
  names = ["a.jpg", "a.png", "a.jpg.png", "b.jpg", "b.jpg.png", "c.webp", "d"]
  out = recover_cli.output_names(names)
  assert out == {"a.jpg": "a.jpg.png", "a.png": "a.png.png", "a.jpg.png": "a.jpg.png.png",
                 "b.jpg": "b.png", "b.jpg.png": "b.jpg.png.png", "c.webp": "c.png", "d": "d.png"}
  assert len(set(out.values())) == len(names)


@pytest.fixture(scope="module")
def broken_models(model_dir, tmp_path_factory):
  """{case: (model path, what its error line must say)}."""
  root = tmp_path_factory.mktemp("broken")
  no_config = root / "no_config"
  no_config.mkdir()
  for name in os.listdir(model_dir):
    if name != "bagel_config.json":
      os.symlink(os.path.join(model_dir, name), no_config / name)
  # A tiny model without its image rules would get BAGEL's 1024-pixel ones.
  no_rules = root / "no_rules"
  no_rules.mkdir()
  for name in os.listdir(model_dir):
    if name != "image_rules.json":
      os.symlink(os.path.join(model_dir, name), no_rules / name)
  # Damaged side files: named in the error line.
  damaged = {}
  for case, name, text in (("bad_rules", "image_rules.json", "5"),
                           ("bad_guidance", "guidance.json", "[]"),
                           ("cut_rules", "image_rules.json", '{"vae_max')):
    folder = root / case
    folder.mkdir()
    for entry in os.listdir(model_dir):
      if entry != name:
        os.symlink(os.path.join(model_dir, entry), folder / entry)
    (folder / name).write_text(text)
    damaged[case] = (folder, f"{folder / name}: ")
  (root / "empty").mkdir()
  # A BAGEL directory copied without its llm_config.json was "neither a BAGEL model directory
  # nor an Orbax model checkpoint", as was an Orbax checkpoint without its config.
  (root / "no_llm_config").mkdir()
  for name in ("vit_config.json", "ema.safetensors"):
    (root / "no_llm_config" / name).write_text("{}")
  # Its config without its weights: told only what a model holds.
  no_params = root / "no_params"
  no_params.mkdir()
  os.symlink(os.path.join(model_dir, "bagel_config.json"), no_params / "bagel_config.json")
  (root / "run" / "checkpoints" / "3").mkdir(parents=True)
  (root / "done" / "checkpoints" / "3").mkdir(parents=True)
  (root / "done" / "model").mkdir()
  # The demo's CLIP part: its workdir's model/ was taken for a BAGEL model lacking a tokenizer.
  (root / "clip" / "model").mkdir(parents=True)
  (root / "clip" / "model" / "clip.safetensors").write_bytes(b"")
  return {**damaged,
          "no_config": (no_config, f"{no_config} has an Orbax model checkpoint's params/ but no "
                                   "bagel_config.json"),
          "no_params": (no_params, f"{no_params} has an Orbax model checkpoint's "
                                   "bagel_config.json but no params/, its weights"),
          "no_llm_config": (root / "no_llm_config",
                            f"{root / 'no_llm_config'} has a BAGEL model directory's "
                            "ema.safetensors, vit_config.json but no llm_config.json"),
          "no_rules": (no_rules, "there is no image_rules.json beside it"),
          # It was 'missing tokenizer.json', as if the tokenizer were all it lacked.
          "empty": (root / "empty", f"{root / 'empty'} is neither a BAGEL model directory"),
          "checkpoint": (root / "run" / "checkpoints" / "3",
                         f"a stage's training checkpoint: the stage's model is "
                         f"{root / 'run' / 'model'} once its run has finished"),
          # A finished stage's model is there: not "once its run has finished".
          "finished_checkpoint": (root / "done" / "checkpoints" / "3",
                                  f"the stage's model is {root / 'done' / 'model'}\n"),
          "clip": (root / "clip", f"{root / 'clip' / 'model'} holds a CLIP model "
                   "(clip.safetensors: the RL stage's reward model"),
          "absent": (root / "absent", "no such model directory")}


@pytest.mark.parametrize("cli", [recover_cli, answer_cli], ids=["recover", "answer"])
@pytest.mark.parametrize("case", ["no_config", "no_params", "no_llm_config", "no_rules",
                                  "bad_rules", "bad_guidance", "cut_rules", "empty", "checkpoint",
                                  "finished_checkpoint", "clip", "absent", "missing_image",
                                  "truncated_image", "bad_mesh"])
def test_bad_input_is_one_error_line_and_status_2(capsys, cli, case, model_dir, inputs,
                                                  broken_models, tmp_path):
  image, model, extra = inputs / "a.png", model_dir, []
  if case in broken_models:
    model, message = broken_models[case]
  elif case == "missing_image":
    image, message = tmp_path / "nope.png", f"{tmp_path / 'nope.png'}: No such file or directory"
  elif case == "truncated_image":
    image, message = inputs / "truncated.png", f"{inputs / 'truncated.png'}: cannot decode image"
  else:
    extra, message = ["--mesh=fsdp=two"], "--mesh 'fsdp=two': expected axis=size pairs"
  args = [f"--model={model}", f"--image={image}", f"--out={tmp_path / 'out.png'}", *extra, *FAST]
  if cli is answer_cli:
    args[2] = f"--out={tmp_path / 'out'}"
    args.append("--question=What is it?")
  rc, out, err = _run(cli, capsys, *args)
  assert rc == 2
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
  assert message in err
  assert not os.listdir(tmp_path) and not out


def test_damaged_side_files_are_bad_inputs_wherever_they_are_read(tmp_path):
  """The readers themselves raise the bad-input type, so `recover`, `answer`, `evaluate` and the
  engine all report one line naming the file."""
  from robust_u1_jax import cli as cli_lib
  from robust_u1_jax.inference import images, recovery

  (tmp_path / "image_rules.json").write_text("5")
  (tmp_path / "guidance.json").write_text('{"text_scale": ')
  for text in ('{"instruction": ', '{"instruction": ""}', '["Restore it."]'):
    (tmp_path / "instruction.json").write_text(text)
    for read in (images.ImageRules.for_model_dir, recovery.Guidance.for_model_dir,
                 recovery.instruction_of_model):
      with pytest.raises(ValueError) as e:
        read(str(tmp_path))
      assert cli_lib.is_bad_input(e.value) and str(e.value).startswith(str(tmp_path)), e.value


def _looks_like_an_orbax_model(folder) -> None:
  """What tells a model's folder apart (`orbax_io.is_model`), for checks that stop before it is
  read."""
  (folder / "bagel_config.json").write_text("{}\n")
  (folder / "params").mkdir()


def test_sampler_guidance_is_the_model_s_unless_given(tmp_path):
  """A trained model's directory holds the guidance it was trained and evaluated with; the
  flags given override it, BAGEL's 4 / 2 stand in for a model without one."""
  import types

  from robust_u1_jax import model_cli
  from robust_u1_jax.inference import recovery

  _looks_like_an_orbax_model(tmp_path)
  flags = lambda **given: types.SimpleNamespace(**{"model": str(tmp_path), "cfg_text": None,
                                                   "cfg_img": None, "shift": 3.0, "sde": False,
                                                   **given})
  assert model_cli.make_sampler(flags(), 5).guidance == recovery.Guidance(4.0, 2.0)
  recovery.Guidance(1.5, 1.25).save(str(tmp_path))
  assert model_cli.make_sampler(flags(), 5).guidance == recovery.Guidance(1.5, 1.25)
  assert model_cli.make_sampler(flags(cfg_text=3.0), 5).guidance == recovery.Guidance(3.0, 1.25)
  # 1 turns guidance off (the model's 1.5 does not come back in its place); below 1 is refused
  assert model_cli.make_sampler(flags(cfg_text=1.0), 5).guidance == recovery.Guidance(1.0, 1.25)
  with pytest.raises(model_cli.InputError, match=r"text_scale \(--cfg_text\) 0.0: a scale is >= 1"):
    model_cli.make_sampler(flags(cfg_text=0.0), 5)
  (tmp_path / recovery.GUIDANCE_FILE).write_text('{"text_scale": 2, "strength": 1}')
  with pytest.raises(model_cli.InputError, match="guidance.json: .*strength"):
    model_cli.make_sampler(flags(), 5)


def _fake_model_text(scripts):
  """Conversation.generate_text answering from `scripts`: (text, stop token name) per call (a
  random model almost never writes the reasoner's action tokens)."""
  calls = iter(scripts)

  def generate_text(self, **kwargs):
    text, stop = next(calls)
    return self.engine.tokenizer.encode(text, add_special_tokens=False), self.engine.special[stop]

  return generate_text


@pytest.mark.slow
def test_answer_with_a_generated_image(capsys, model_dir, inputs, tmp_path, monkeypatch):
  fake = _fake_model_text(
      [("The image is noisy.", "vision_start"), ("<ANSWER>B<ANSWER_END>", "endoftext")])
  printed_before = []  # what the terminal showed as each text step began

  def generate_text(self, **kwargs):
    printed_before.append(capsys.readouterr().out)
    return fake(self, **kwargs)

  monkeypatch.setattr(engine_lib.Conversation, "generate_text", generate_text)
  out_dir = tmp_path / "run"
  rc, out, err = _run(answer_cli, capsys, f"--model={model_dir}", f"--image={inputs / 'wide.png'}",
                      "--question=Which colour?", "--options=red", "--options=blue",
                      f"--out={out_dir}", *FAST)
  assert rc == 0, err
  # Each step is shown as it is done, not all at the end: the first text and the image were
  # printed before the model wrote its second text.
  # Before it, one line: the model is loaded and the answer begins (its first step waits for
  # the compiles).
  assert re.fullmatch(rf"loaded {model_dir} in \d+\.\d s; answering \(a first run compiles the "
                      r"model's programs first\)\n", printed_before[0])
  shown = printed_before[1].strip().splitlines()
  assert shown[0].startswith("[1] text (") and shown[1] == "The image is noisy."
  assert re.fullmatch(r"\[2\] image 64x32 \(\d+\.\d\d s\)", shown[2])  # written at the end
  lines = out.strip().splitlines()
  assert lines[-1] == "answer: B"
  assert lines[0].startswith("[3] text (") and lines[1] == "<ANSWER>B<ANSWER_END>"
  assert f"wrote {out_dir}/step_02.png" in lines
  image_step = reasoner.Step("image", image=np.zeros((32, 64, 3), np.uint8), seconds=1.5)
  assert (answer_cli.step_line(2, image_step, None)
          == "[2] image 64x32 (1.50 s): not saved (give --out)")
  assert _pixels(out_dir / "step_02.png").shape[:2] == RULES.vae_size(60, 100)
  record = json.loads((out_dir / "exchange.json").read_text())
  assert [(s["type"], s.get("text"), s.get("image")) for s in record["steps"]] == [
      ("text", "The image is noisy.", None), ("image", None, "step_02.png"),
      ("text", "<ANSWER>B<ANSWER_END>", None)]
  assert record["answer"] == "B" and record["stopped_by"] == "end_of_text"
  assert set(record["seconds"]) == {"context", "text", "image"}
  assert "A. red\nB. blue" in record["prompt"] and record["model"] == model_dir
  assert record["settings"]["sampler"]["num_steps"] == 3
  assert sorted(os.listdir(out_dir)) == ["exchange.json", "step_02.png"]


def test_answer_names_no_option_when_the_reply_does_not(capsys, model_dir, inputs, tmp_path,
                                                       monkeypatch):
  # A reply that mentions both options (or one in a long text) names none, as benchmarks score it.
  monkeypatch.setattr(engine_lib.Conversation, "generate_text", _fake_model_text(
      [("<ANSWER>red or blue, hard to tell<ANSWER_END>", "endoftext")]))
  rc, out, err = _run(answer_cli, capsys, f"--model={model_dir}", f"--image={inputs / 'a.png'}",
                      "--question=Which colour?", "--options=red", "--options=blue",
                      f"--out={tmp_path / 'run'}", *FAST)
  assert rc == 0, err
  lines = out.strip().splitlines()
  assert lines[-1] == "answer: none" and "stopped by end_of_text after 1 step;" in out
  assert json.loads((tmp_path / "run" / "exchange.json").read_text())["answer"] == ""


def test_answer_stopped_by_its_rounds_says_how_many(capsys, model_dir, inputs, monkeypatch):
  # --max_iterations counts rounds (text, then an image where asked): 2 rounds made 4 steps, and
  # "after 4 steps" beside --max_iterations=2 read as a miscount.
  monkeypatch.setattr(engine_lib.Conversation, "generate_text", _fake_model_text(
      [("Noisy.", "vision_start"), ("Better.", "vision_start")]))
  rc, out, err = _run(answer_cli, capsys, f"--model={model_dir}", f"--image={inputs / 'a.png'}",
                      "--question=Which colour?", "--max_iterations=2", "--steps=1", *FAST)
  assert rc == 0, err
  assert "stopped by max_iterations (2 rounds) after 4 steps;" in out, out
  # Its answer line said "none" without a word on why: the rounds ran out before an answer.
  assert ("note: the rounds ran out before the model wrote its <ANSWER> field; give more than "
          "--max_iterations=2") in err, err


def test_answer_replaces_an_earlier_answer_and_makes_no_folder_when_stopped(
    capsys, model_dir, inputs, tmp_path, monkeypatch):
  out_dir = tmp_path / "run"
  args = (f"--model={model_dir}", f"--image={inputs / 'a.png'}", "--question=Which colour?",
          "--options=red", "--options=blue", f"--out={out_dir}", *FAST)

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt
  # Ctrl-C while the model writes: no empty --out is left behind.
  monkeypatch.setattr(engine_lib.Conversation, "generate_text", stopped)
  rc, _, err = _run(answer_cli, capsys, *args)
  assert rc == 130 and err.strip() == "interrupted"
  assert not out_dir.exists()

  # A reused --out held an earlier answer's image beside this one's exchange.
  out_dir.mkdir()
  for name in ("step_03.png", "exchange.json", "notes.txt"):
    (out_dir / name).write_text("earlier")
  monkeypatch.setattr(engine_lib.Conversation, "generate_text", _fake_model_text(
      [("<ANSWER>A<ANSWER_END>", "endoftext")]))
  rc, out, err = _run(answer_cli, capsys, *args)
  assert rc == 0, err
  assert f"removed 1 file of an earlier answer in {out_dir}" in out
  assert sorted(os.listdir(out_dir)) == ["exchange.json", "notes.txt"]
  assert json.loads((out_dir / "exchange.json").read_text())["answer"] == "A"


def test_answer_refuses_an_out_holding_step_images_no_answer_wrote(capsys, model_dir, inputs,
                                                                   tmp_path):
  # A user's own frames, no exchange.json beside them: they were overwritten and removed as "an
  # earlier answer's".
  out_dir = tmp_path / "frames"
  out_dir.mkdir()
  for name in ("step_01.png", "step_02.png"):
    (out_dir / name).write_text("mine")
  rc, out, err = _run(answer_cli, capsys, f"--model={model_dir}", f"--image={inputs / 'a.png'}",
                      "--question=Which colour?", f"--out={out_dir}", *FAST)
  assert rc == 2 and out == "", out
  assert err.strip() == (f"error: --out {out_dir}: holds step_01.png and 1 more but no "
                         "exchange.json, so no earlier answer wrote them, and this one would "
                         "replace them; give another folder")
  assert [(out_dir / n).read_text() for n in ("step_01.png", "step_02.png")] == ["mine"] * 2

  # An answer whose write was cut short (its images, not yet its exchange.json) is its own.
  (out_dir / answer_cli.WRITING).write_text("")
  rc, out, err = _run(answer_cli, capsys, f"--model={model_dir}", f"--image={inputs / 'a.png'}",
                      "--question=Which colour?", "--no_recover", f"--out={out_dir}", *FAST)
  assert rc == 0, err
  assert sorted(os.listdir(out_dir)) == ["exchange.json"]  # the marker gone with the record


def test_answer_from_the_model_matches_its_record(capsys, model_dir, inputs, tmp_path):
  out_dir = tmp_path / "run"
  rc, out, err = _run(answer_cli, capsys, f"--model={model_dir}", f"--image={inputs / 'a.png'}",
                      "--question=What is it?", "--greedy", "--max_iterations=2",
                      "--max_new_tokens=8", "--no_recover", f"--out={out_dir}", *FAST)
  assert rc == 0, err
  record = json.loads((out_dir / "exchange.json").read_text())
  texts = [s["text"] for s in record["steps"] if s["type"] == "text"]
  assert len(texts) == len(record["steps"]) >= 1  # --no_recover: no image step
  for n, text in enumerate(texts, 1):
    assert f"[{n}] text (" in out and answer_cli.printable(text) in out
  assert out.strip().splitlines()[-1].startswith("answer: ")
  assert f"wrote {out_dir / 'exchange.json'}" in out
  assert record["settings"]["temperature"] == 0.0 and record["settings"]["recover"] is False
  assert record["settings"]["max_new_tokens"] == 8
  assert "restore" not in record["prompt"]


def test_recover_refuses_a_folder_without_files(capsys, model_dir, tmp_path):
  # It wrote an empty output folder and said '0 written' with status 0; a folder named like an
  # image was taken for a folder of images the same way.
  folder = tmp_path / "photo.png"
  (folder / "inner").mkdir(parents=True)  # subfolders are not read
  (folder / ".hidden.png").write_bytes(b"")  # nor hidden files (an interrupted write's)
  (folder / "notes.txt").write_text("x")  # nor files not named as images
  rc, out, err = _run(recover_cli, capsys, f"--model={model_dir}", f"--image={folder}", *FAST)
  assert rc == 2 and not out
  assert err.strip() == (f"error: --image {folder}: a folder without image files to recover "
                         "(looked for *.jpg, *.jpeg, *.png, *.webp, *.bmp, *.gif, *.tif, *.tiff "
                         "(any case); its subfolders and hidden files are not read)")
  assert sorted(os.listdir(tmp_path)) == ["photo.png"]  # no photo.png_recovered


@pytest.mark.parametrize("stop,at,code,said", [("ctrl-c", 2, 130, "interrupted"),
                                                ("ctrl-c", 1, 130, "interrupted"),
                                                ("sigterm", 2, 143, "terminated")])
def test_a_stopped_folder_recovery_says_what_it_kept(capsys, model_dir, inputs, tmp_path,
                                                     monkeypatch, stop, at, code, said):
  from robust_u1_jax import model_cli

  write, calls = model_cli.write_image, []

  def stopped_on_the_second(path, image):
    calls.append(path)
    if len(calls) == at:  # while the folder is recovered
      if stop == "ctrl-c":
        raise KeyboardInterrupt
      # A service's stop: it used to end the process where it stood, saying nothing.
      os.kill(os.getpid(), signal.SIGTERM)
    write(path, image)

  monkeypatch.setattr(model_cli, "write_image", stopped_on_the_second)
  out_dir = tmp_path / "out"
  rc, out, err = _run(recover_cli, capsys, f"--model={model_dir}", f"--image={inputs}",
                      f"--out={out_dir}", *FAST)
  assert rc == code and err.strip().endswith(said), err
  assert out.strip().splitlines()[-1] == (
      f"{out_dir}: stopped after 1 written; they are kept, and the same command goes on with the "
      "rest" if at == 2 else
      f"{out_dir}: stopped before the first recovery was written; the same command starts again")
  assert len(os.listdir(out_dir)) == at - 1


def test_recover_folder_refuses_an_image_name_for_its_output_folder(capsys, model_dir, inputs,
                                                                     tmp_path):
  # A folder named res.png was created and filled with the recoveries.
  rc, out, err = _run(recover_cli, capsys, f"--model={model_dir}", f"--image={inputs}",
                      f"--out={tmp_path / 'res.png'}", *FAST)
  assert rc == 2 and not out
  assert err.strip() == (f"error: --out {tmp_path / 'res.png'}: an image file's name, but it is "
                         f"the folder of the recoveries of the folder --image {inputs}; give a "
                         f"folder, e.g. {tmp_path / 'res'}")
  assert not os.path.exists(tmp_path / "res.png")


@pytest.mark.slow
def test_recover_file_into_a_folder_to_create(capsys, model_dir, inputs, tmp_path):
  # '--out DIR/' was refused as 'a folder; give a file name', though an existing DIR was used.
  out_dir = tmp_path / "new"
  rc, out, err = _run(recover_cli, capsys, f"--model={model_dir}",
                      f"--image={inputs / 'a.png'}", f"--out={out_dir}{os.sep}", *FAST)
  assert rc == 0, err
  assert os.listdir(out_dir) == ["a_recovered.png"]
  assert _pixels(out_dir / "a_recovered.png").shape[:2] == (64, 64)


def test_usage_errors(capsys, model_dir, inputs, tmp_path):
  image = f"--image={inputs / 'a.png'}"
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "sft.py")
  cases = [
      (answer_cli, [f"--model={model_dir}", image, "--question=q", "--greedy",
                    "--temperature=0.5"], "--greedy or --temperature"),
      # An empty option or question went into the prompt ('A. ' and nothing after it).
      (answer_cli, [f"--model={model_dir}", image, "--question=q", "--options=red",
                    "--options= "], "--options: option 2 of 2 is empty"),
      (answer_cli, [f"--model={model_dir}", image, "--question=  "], "missing --question"),
      # Checked by reasoner.Settings, whose fields the flags share (a library caller got an
      # IndexError for max_new_tokens=0, and a negative temperature ran).
      (answer_cli, [f"--model={model_dir}", image, "--question=q", "--max_new_tokens=0"],
       r"--max_new_tokens must be >= 1, got 0"),
      (answer_cli, [f"--model={model_dir}", image, "--question=q", "--temperature=-1"],
       r"--temperature must be >= 0 \(0: greedy\), got -1.0"),
      (recover_cli, [image], "give one: --model recovers images, --config precomputes"),
      (recover_cli, [f"--model={model_dir}", f"--config={config}:tiny", image],
       "one of --model and --config, not both"),
      (recover_cli, [f"--model={model_dir}", image, f"--cache_dir={tmp_path}"],
       "--cache_dir: only used with --config"),
      # The cache mode reads its config (with overrides) from the same command line.
      (recover_cli, [f"--config={config}:tiny", "--config.seed=3", f"--cache_dir={tmp_path}"],
       "'sft' config; recoveries are precomputed for the reasoning stage"),
  ]
  for cli, args, message in cases:
    rc, out, err = _run(cli, capsys, *args)
    assert rc == 2 and not out
    assert err.startswith("error: ") and "(--help lists the flags)" in err, err
    assert re.search(message, err), err


def test_a_stopped_recovery_cache_says_how_to_go_on(capsys, tmp_path, monkeypatch):
  from robust_u1_jax.training import recovery_cache

  def stopped(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C while recovering: what is written stays

  monkeypatch.setattr(recovery_cache, "build", stopped)
  config = os.path.join(os.path.dirname(__file__), "..", "configs", "reason.py")
  rc, out, err = _run(recover_cli, capsys, f"--config={config}:tiny", "--config.init_from=random",
                      f"--cache_dir={tmp_path / 'cache'}")
  assert rc == 130 and "interrupted" in err, err
  assert out.strip() == (f"{tmp_path / 'cache'}: stopped; the recoveries written are kept, and "
                         "the same command resumes after them")


def test_entry_points_help_and_exit_status(tmp_path):
  """Through `python -m`: --help exits 0 (absl's own exits 1), an error exits 2."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "robust_u1_jax.answer", "--help"],
                        capture_output=True, text=True, env=env, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "--question" in proc.stdout and "--model" in proc.stdout and "--mesh" in proc.stdout
  missing = tmp_path / "missing.png"
  _looks_like_an_orbax_model(tmp_path)  # the image is checked once the model passes its check
  proc = subprocess.run([sys.executable, "-m", "robust_u1_jax.recover", f"--model={tmp_path}",
                         f"--image={missing}"],
                        capture_output=True, text=True, env=env, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"error: {missing}: No such file or directory"


def _readme_python_block() -> str:
  with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
    section = f.read().split("### From Python\n", 1)[1]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_readme_s_python_block_runs(model_dir, tmp_path, monkeypatch, capsys):
  code = _readme_python_block()
  assert code.count('"runs/demo/reason"') == 1
  monkeypatch.chdir(tmp_path)
  names: dict = {}
  exec(compile(code.replace('"runs/demo/reason"', repr(model_dir)), "README.md", "exec"), names)
  assert names["recovered"].shape == (1, 64, 64, 3) and names["recovered"].dtype == np.uint8
  assert _pixels(tmp_path / "recovered.png").shape == (64, 64, 3)
  assert names["quick"].shape == (1, 64, 64, 3)
  exchange = names["exchange"]
  assert exchange.steps and exchange.answer in ("", "A", "B", "C", "D", "E", "F")
  assert capsys.readouterr().out == f"{exchange.answer}\n"


def test_a_loaded_model_recovers_at_its_own_guidance(model_dir, tmp_path):
  import shutil

  from robust_u1_jax.inference import recovery

  assert engine_lib.Engine.load(model_dir).guidance == recovery.Guidance()  # none saved: BAGEL's
  own = shutil.copytree(model_dir, tmp_path / "model")
  recovery.Guidance(text_scale=1.5, image_scale=1.5).save(str(own))
  eng = engine_lib.Engine.load(str(own))
  assert eng.guidance == recovery.Guidance(text_scale=1.5, image_scale=1.5)
  image = [_image(64, 64, 0)]
  by_default, _ = eng.recover(image)  # 50 steps at the model's guidance, image 0's key of seed 0
  own_guidance, _ = eng.recover(image, sampler=recovery.Sampler(guidance=eng.guidance),
                                keys=engine_lib.image_keys(0, [0]))
  bagel_s, _ = eng.recover(image, sampler=recovery.Sampler(), keys=engine_lib.image_keys(0, [0]))
  np.testing.assert_array_equal(by_default, own_guidance)
  assert np.abs(by_default.astype(int) - bagel_s).mean() > 1
  # One batch takes one VAE size; a 60 x 100 image and a 64 x 64 one are two.
  with pytest.raises(ValueError, match=r"VAE sizes \[\(32, 64\), \(64, 64\)\] in one batch"):
    eng.recover([_image(64, 64, 0), _image(60, 100, 1)])


def test_a_loaded_model_recovers_and_asks_by_its_own_instruction(model_dir, tmp_path,
                                                                 monkeypatch):
  """A model trained with its own `config.instruction` keeps it beside itself; `recover`, the
  evaluation and the answer loop's prompt use it (they used the paper's whatever the model)."""
  import shutil

  from robust_u1_jax.eval import evaluation
  from robust_u1_jax.inference import recovery

  words = "Make this picture clean again."
  assert engine_lib.Engine.load(model_dir).instruction == recovery.INSTRUCTION  # none saved
  own = shutil.copytree(model_dir, tmp_path / "model")
  recovery.save_instruction(str(own), words)
  eng = engine_lib.Engine.load(str(own))
  assert eng.instruction == words
  image, few = [_image(64, 64, 0)], recovery.Sampler(num_steps=3, guidance=eng.guidance)
  by_default, _ = eng.recover(image, sampler=few)
  in_its_words, _ = eng.recover(image, sampler=few, instruction=words)
  in_the_paper_s, _ = eng.recover(image, sampler=few, instruction=recovery.INSTRUCTION)
  np.testing.assert_array_equal(by_default, in_its_words)
  assert not np.array_equal(by_default, in_the_paper_s)
  assert evaluation.Evaluator(eng, recovery_steps=3, batch_size=1,
                              max_new_tokens=1).instruction == words
  monkeypatch.setattr(engine_lib.Conversation, "generate_text",
                      _fake_model_text([("<ANSWER>A<ANSWER_END>", "endoftext")]))
  exchange = reasoner.answer(eng, image[0], "Which colour?", ["red", "blue"])
  assert words in exchange.prompt and recovery.INSTRUCTION not in exchange.prompt


def test_the_engine_names_what_is_wrong_with_an_input(model_dir):
  # A library caller's first mistakes ended deep in the model: "shape must have length equal to
  # the number of dimensions of x", "Need at least one array to stack", an unknown posterior
  # taken as 'mean', a float image refused by a resize three calls down.
  eng = engine_lib.Engine.load(model_dir)
  image = _image(64, 64, 0)
  cases = [
      ((image,), {}, r"recover: takes a list of images .*got one image of shape \(64, 64, 3\): "
                     r"give \[image\]"),
      (([image / 255.0],), {}, r"recover: takes uint8 H x W x 3 \(RGB\) images, got float64 "
                               r"\(a float image in \[0, 1\]: robust_u1_jax.pixels.to_uint8"),
      (([image[..., 0]],), {}, r"got shape \(64, 64\) \(convert a gray or RGBA image"),
      (([],), {}, "recover: no images"),
      # Below the smallest side `recover` and `answer` hold files to: it came back 32 x 32.
      (([image[:8, :12]],), {}, r"recover: an image of 12 x 8 pixels: a side below the smallest "
                                r"usable 16 \(one VAE stride or ViT patch"),
      (([image],), {"posterior": "bogus"}, "vae_posterior 'bogus' is unknown"),
      (([image, image],), {"keys": engine_lib.image_keys(0, [0])},
       r"keys of shape \(1, 2\) for 2 images; give one key per image"),
  ]
  for args, kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      eng.recover(*args, **kwargs)
  with pytest.raises(ValueError, match="add_image: takes uint8"):
    eng.conversation().add_image(image.astype(np.float32))
  with pytest.raises(ValueError, match="add_image: an image of 8 x 8 pixels: a side below"):
    eng.conversation().add_image(image[:8, :8])
  with pytest.raises(engine_lib.ModelError, match=r"^no model directory given \(an empty path\)$"):
    engine_lib.Engine.load("")  # it said ": no such model directory"
  assert eng.round_trip(np.stack([_image(60, 100, 1)])).shape == (1, 32, 64, 3)  # resized
  assert re.fullmatch(r"Engine\([\d,]+ parameters, 2 LLM layers, images up to 64 px, guidance "
                      r"4\.0 / 2\.0, mesh None\)", repr(eng))


def test_an_exchange_s_record_needs_a_path_per_image():
  image = reasoner.Step("image", image=np.zeros((8, 8, 3), np.uint8))
  exchange = reasoner.Exchange("p", [reasoner.Step("text", text="t"), image], "t", "", "end", {})
  assert [s.get("image") for s in exchange.record(["step_02.png"])["steps"]] == [None,
                                                                                  "step_02.png"]
  with pytest.raises(ValueError, match="record: 0 image paths for 1 image steps"):
    exchange.record()  # it raised a bare StopIteration


def test_reasoner_settings_name_a_bad_value():
  for kwargs, message in (({"max_iterations": 0}, "max_iterations must be >= 1, got 0"),
                          ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
                          ({"temperature": float("nan")}, "temperature must be >= 0")):
    with pytest.raises(ValueError, match=message):
      reasoner.Settings(**kwargs)


def test_the_untrained_note_names_the_demo_s_later_parts_beside_it(tmp_path):
  """A demo elsewhere than runs/demo: the note named runs/demo/rl, which was not there."""
  for part in ("vae", "rl", "reason"):
    os.makedirs(tmp_path / part / "model")
  recovery.save_no_recovery(str(tmp_path / "vae" / "model"), "bootstrap_vae")
  note = recovery.untrained_note(str(tmp_path / "vae" / "model"))
  assert note.endswith(f"(the demo's: {tmp_path}/rl or {tmp_path}/reason)")
  alone = tmp_path / "elsewhere" / "vae" / "model"
  os.makedirs(alone)
  recovery.save_no_recovery(str(alone), "bootstrap_vae")
  assert recovery.untrained_note(str(alone)).endswith(
      "(the demo's: runs/demo/rl or runs/demo/reason)")
