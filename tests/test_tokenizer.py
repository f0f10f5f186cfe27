"""Tests of the built-in tokenizer: round trips, special tokens, transformers loading, caching."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import tokenizers
import transformers

from robust_u1_jax.data import answer_format
from robust_u1_jax.data import shapes
from robust_u1_jax.data import shapes_answers
from robust_u1_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> pathlib.Path:
  return pathlib.Path(tokenizer_lib.build_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
  return tokenizer_lib.load_tokenizer(tok_dir)


def _texts(num_records: int = 25) -> list[str]:
  """Every kind of text of a sample of records of every split, as the pipeline forms them."""
  names = [None, "gaussian_noise", "imagenet_c/pixelate", "robust_r1/lens_flare"]
  texts = []
  for split in shapes.SPLITS:
    world = shapes.ShapesWorld(split, size=num_records, seed=5)
    for i in range(num_records):
      rec = world.record(i, render=False)
      texts.append(rec["caption"])
      for j, q in enumerate(rec["questions"]):
        prompt = answer_format.format_question(q)
        texts += [prompt, f"{prompt}\n{tokenizer_lib.RECOVERY_INSTRUCTION}",
                  shapes_answers.answer_text(q, names[j % 4], strength=0.23 if j % 2 else None)]
  return texts


def test_loads_through_the_qwen2_class(tok, tok_dir):
  assert isinstance(tok, transformers.Qwen2Tokenizer)
  assert isinstance(transformers.AutoTokenizer.from_pretrained(str(tok_dir)),
                    transformers.Qwen2Tokenizer)
  assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
      p.name for p in tok_dir.iterdir()}
  assert len(tok) < 2000
  assert tok.eos_token == tokenizer_lib.IM_END and tok.pad_token == tokenizer_lib.ENDOFTEXT


def test_qwen2_directories_load_without_pytorch(tok_dir):
  """Ours (and Qwen2's, BAGEL's) declare Qwen2's class, loaded without AutoTokenizer's import of
  the model configs, which imports PyTorch (about 1.4 s of every command)."""
  probe = ("import sys; from robust_u1_jax.data import tokenizer as t; "
           "tok = t.load_tokenizer(sys.argv[1]); print(type(tok).__name__, 'torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", probe, str(tok_dir)], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["Qwen2Tokenizer", "False"]


def test_another_declared_class_loads_through_auto_tokenizer(tok, tok_dir, tmp_path):
  for f in tok_dir.iterdir():
    (tmp_path / f.name).write_bytes(f.read_bytes())
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  other = tokenizer_lib.load_tokenizer(tmp_path)
  assert not isinstance(other, transformers.Qwen2Tokenizer)
  for text in _texts(3):
    assert other.encode(text, add_special_tokens=False) == tok.encode(text,
                                                                      add_special_tokens=False)


def test_round_trip_and_same_ids_as_the_raw_backend(tok, tok_dir):
  raw = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
  for text in _texts():
    ids = tok.encode(text, add_special_tokens=False)
    # Byte-level BPE on NFC-normal ASCII text: the round trip is exact, whitespace included.
    assert tok.decode(ids) == text
    assert raw.encode(text).ids == ids
    assert tokenizer_lib.special_token_ids(tok)["endoftext"] not in ids


def test_world_vocabulary_is_compact(tok):
  words = [*shapes.COLOR_NAMES, *shapes.SHAPES, *shapes.PLURALS.values(), "yes", "no", "left",
           "right", "top", "bottom", "restore", "corrupted", "noise", "blur"]
  for word in words:
    assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
  text = tokenizer_lib.RECOVERY_INSTRUCTION
  assert len(tok.encode(text, add_special_tokens=False)) <= 12


def test_unknown_text_falls_back_to_bytes(tok):
  for text in ("xylophone quokka", "ünïcödé ✓ 🙂 日本語", "\t tabs  and   spaces \n\n"):
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and tok.decode(ids) == text


def test_special_tokens(tok):
  ids = tokenizer_lib.special_token_ids(tok)
  assert set(ids) == {"im_start", "im_end", "vision_start", "vision_end", "endoftext", "pad"}
  assert ids["pad"] == ids["endoftext"]
  assert len({v for k, v in ids.items() if k != "pad"}) == 5
  for token in tokenizer_lib.SPECIAL_TOKENS:
    assert tok.encode(token, add_special_tokens=False) == [tok.convert_tokens_to_ids(token)]
  block = tokenizer_lib.text_block("What color is the star?")
  assert block == "<|im_start|>What color is the star?<|im_end|>"
  framed = tokenizer_lib.encode_text_block(tok, "What color is the star?")
  assert framed[0] == ids["im_start"] and framed[-1] == ids["im_end"]
  assert framed == tok.encode(block, add_special_tokens=False)
  image = tokenizer_lib.VISION_START + tokenizer_lib.VISION_END
  assert tok.encode(image, add_special_tokens=False) == [ids["vision_start"], ids["vision_end"]]
  assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello",
                                                                    add_special_tokens=False)


def test_build_is_deterministic(tok_dir, tmp_path):
  again = pathlib.Path(tokenizer_lib.build_tokenizer(tmp_path / "again"))
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert (again / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_reloads_what_transformers_writes(tok, tmp_path):
  # A directory written by transformers itself (as a hub Qwen2 tokenizer is) loads the same.
  tok.save_pretrained(tmp_path)
  again = tokenizer_lib.load_tokenizer(tmp_path)
  assert isinstance(again, transformers.Qwen2Tokenizer)
  assert tokenizer_lib.special_token_ids(again) == tokenizer_lib.special_token_ids(tok)
  for text in _texts(5):
    assert again.encode(text) == tok.encode(text)


def test_vocab_and_merges_directory_without_special_tokens(tok_dir, tmp_path):
  # The older Qwen2 layout (vocab.json + merges.txt) loads; a tokenizer lacking BAGEL's special
  # tokens is refused by name instead of silently mapping them to another id.
  model = json.loads((tok_dir / "tokenizer.json").read_text())["model"]
  (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
  merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  plain = tokenizer_lib.load_tokenizer(tmp_path)
  assert isinstance(plain, transformers.Qwen2Tokenizer)
  text = "A red circle at the top left."
  assert plain.decode(plain.encode(text, add_special_tokens=False)) == text
  with pytest.raises(KeyError, match="im_start"):
    tokenizer_lib.special_token_ids(plain)


def _edited_copy(tok_dir: pathlib.Path, out: pathlib.Path, edit) -> pathlib.Path:
  out.mkdir()
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    (out / name).write_bytes((tok_dir / name).read_bytes())
  data = json.loads((tok_dir / "tokenizer.json").read_text())
  edit(data["model"])
  (out / "tokenizer.json").write_text(json.dumps(data))
  return out


def test_reading_difference_names_moved_ids_and_other_merges(tok, tok_dir, tmp_path):
  # The same vocabulary written by transformers reads alike; two ordinary tokens with swapped ids
  # and a missing merge do not, and the line says which and where.
  tok.save_pretrained(tmp_path / "saved")
  assert tokenizer_lib.reading_difference(tok, tokenizer_lib.load_tokenizer(tmp_path / "saved")
                                          ) is None

  def swap(model):
    vocab = model["vocab"]
    vocab["Ġred"], vocab["Ġblue"] = vocab["Ġblue"], vocab["Ġred"]

  swapped = tokenizer_lib.load_tokenizer(_edited_copy(tok_dir, tmp_path / "swapped", swap))
  first = min(tok.convert_tokens_to_ids(["Ġred", "Ġblue"]))
  token = tok.convert_ids_to_tokens(first)
  line = tokenizer_lib.reading_difference(tok, swapped, "the model's")
  assert line == (f"2 of its {len(tok.get_vocab())} tokens have other ids in the model's (the "
                  f"first: {token!r} is {first}, the model's gives "
                  f"{swapped.convert_tokens_to_ids(token)})")

  def drop_last_merge(model):
    model["merges"] = model["merges"][:-1]

  fewer = tokenizer_lib.load_tokenizer(_edited_copy(tok_dir, tmp_path / "fewer", drop_last_merge))
  n = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["merges"])
  assert tokenizer_lib.reading_difference(tok, fewer) == (
      f"its BPE merges differ from the other's from merge {n - 1} on ({n} merges against "
      f"{n - 1})")


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.load_tokenizer(tmp_path / "missing")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json.*notes.txt"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_default_dir_is_built_once_into_the_cache(tok_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("ROBUST_U1_CACHE", str(tmp_path))
  tokenizer_lib._default_tokenizer_dir.cache_clear()
  path = pathlib.Path(tokenizer_lib.default_tokenizer_dir())
  assert path.parent == tmp_path / "shapes_tokenizer"
  assert (path / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
  stamp = os.stat(path / "tokenizer.json").st_mtime_ns
  tokenizer_lib._default_tokenizer_dir.cache_clear()  # as a fresh process would
  assert tokenizer_lib.default_tokenizer_dir() == str(path)
  assert os.stat(path / "tokenizer.json").st_mtime_ns == stamp
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary directory left
  assert isinstance(tokenizer_lib.load_tokenizer(None), transformers.Qwen2Tokenizer)
  tokenizer_lib._default_tokenizer_dir.cache_clear()
