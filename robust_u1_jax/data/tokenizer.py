"""The built-in world's tokenizer: a small byte-level BPE with Qwen2's exact text pipeline.

The tokenizer is trained here, deterministically, on every kind of text the shapes world produces
(captions, prompts, answers in the Robust-R1 format, corruption names, the recovery instruction)
and written in the on-disk format of a Qwen2 tokenizer directory. It is loaded through the same
transformers class as a real Qwen2/BAGEL tokenizer (`Qwen2Tokenizer`, transformers 5's fast
tokenizer), so the tiny model and BAGEL-7B share one code path. Because it is byte-level, any text
encodes (unknown words fall back to bytes) and decode(encode(text)) == NFC(text) exactly.

Special tokens follow Qwen2/BAGEL: `<|endoftext|>` (also the pad token, as in Qwen2),
`<|im_start|>` / `<|im_end|>` around every text block (BAGEL's bos / eos), and
`<|vision_start|>` / `<|vision_end|>` around every image block.
"""

from collections.abc import Iterable
import collections
import functools
import hashlib
import heapq
import json
import os
import pathlib
import shutil
import string
import tempfile

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from robust_u1_jax import cache_dirs
from robust_u1_jax.data import answer_format, shapes_answers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
PAD = ENDOFTEXT  # as in Qwen2: packing masks padding explicitly, so it needs no token of its own
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END)
RECOVERY_INSTRUCTION = answer_format.RESTORE
MAX_VOCAB = 2000
_BUILD_VERSION = "1"  # bump when the construction (not the corpus) changes


def _qwen2_pretokenize_regex() -> str:
  # Qwen2's own split pattern, so encodings match the transformers class that loads the files.
  from transformers.models.qwen2 import tokenization_qwen2  # deferred: transformers is heavy

  return tokenization_qwen2.PRETOKENIZE_REGEX


def _pre_tokenizer(regex: str) -> pre_tokenizers.PreTokenizer:
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])


def _byte_alphabet() -> list[str]:
  """GPT-2's byte-to-unicode table in byte-rank order (Qwen2's first 256 ids)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


# ------------------------------------------------------------------------------------- corpus

def corruption_names() -> list[str]:
  """Corruption names for TYPE/INFLUENCE text: the registry's when importable, else the list of
  docs/design.md#corruptions that the shapes world knows."""
  names = set(shapes_answers.CORRUPTION_EFFECTS)
  try:
    from robust_u1_jax.data import corruptions  # deferred: imports JAX
  except ImportError:
    return sorted(names)
  lister = getattr(corruptions, "list_corruptions", None)
  if lister is not None:
    names.update(entry[0].split("/")[-1] if isinstance(entry, tuple) else str(entry).split("/")[-1]
                 for entry in lister())
  return sorted(names)


def corpus_texts() -> list[str]:
  """The deterministic training corpus."""
  return [*shapes_answers.text_corpus(corruption_names()), RECOVERY_INSTRUCTION,
          answer_format.ANSWER_FROM_RESTORED,
          string.ascii_letters, string.digits, string.punctuation,
          " ".join(string.ascii_uppercase), " ".join(string.digits)]


def _learn_merges(word_counts: dict[str, int], max_merges: int) -> list[tuple[str, str]]:
  """Byte-pair merges, most frequent pair first (ties: smallest pair), until every word is one
  symbol or `max_merges`. Done here rather than by `tokenizers.trainers.BpeTrainer`, whose merge
  order on count ties follows hash-map iteration order and so changes from run to run."""
  words = sorted(word_counts)
  symbols = [list(w) for w in words]
  counts = [word_counts[w] for w in words]
  pair_counts: collections.Counter = collections.Counter()
  where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)

  def account(i: int, sign: int) -> None:
    for pair in zip(symbols[i], symbols[i][1:]):
      pair_counts[pair] += sign * counts[i]
      if sign > 0:
        where[pair].add(i)
      heapq.heappush(heap, (-pair_counts[pair], pair))

  heap: list = []
  for i in range(len(words)):
    account(i, +1)
  merges: list[tuple[str, str]] = []
  while heap and len(merges) < max_merges:
    neg, pair = heapq.heappop(heap)
    if pair_counts.get(pair, 0) != -neg or -neg <= 0:
      continue  # stale heap entry
    merges.append(pair)
    a, b = pair
    for i in sorted(where.pop(pair)):
      account(i, -1)
      syms, out, j = symbols[i], [], 0
      while j < len(syms):
        if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
          out.append(a + b)
          j += 2
        else:
          out.append(syms[j])
          j += 1
      symbols[i] = out
      account(i, +1)
    pair_counts.pop(pair, None)
  return merges


def _build_backend(texts: Iterable[str]) -> tokenizers.Tokenizer:
  regex = _qwen2_pretokenize_regex()
  pre = _pre_tokenizer(regex)
  normalizer = normalizers.NFC()
  counts: collections.Counter = collections.Counter()
  for text in texts:
    counts.update(piece for piece, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
  alphabet = _byte_alphabet()
  merges = _learn_merges(dict(counts), MAX_VOCAB - len(alphabet) - len(SPECIAL_TOKENS))
  vocab = {c: i for i, c in enumerate(alphabet)}
  for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
  # The same model settings Qwen2Tokenizer.__init__ rebuilds from these files.
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
      end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # Special tokens come after the BPE vocabulary, as in Qwen2.
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t in SPECIAL_TOKENS])
  return tok


def _config_files(tok: tokenizers.Tokenizer) -> dict[str, dict]:
  added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                     "rstrip": False, "single_word": False, "special": True}
           for t in SPECIAL_TOKENS}
  extra = [IM_START, IM_END, VISION_START, VISION_END]
  config = {
      "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
      "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": IM_END,
      "errors": "replace", "extra_special_tokens": extra, "model_max_length": 32768,
      "pad_token": PAD, "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
      "unk_token": None,
  }
  special_map = {"additional_special_tokens": extra, "eos_token": IM_END, "pad_token": PAD}
  return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def _write(out_dir: pathlib.Path, texts: list[str]) -> None:
  tok = _build_backend(texts)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
  for name, content in _config_files(tok).items():
    (out_dir / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n",
                                encoding="utf-8")


def build_tokenizer(out_dir: str | os.PathLike) -> str:
  """Trains the shapes-world tokenizer and writes tokenizer.json, tokenizer_config.json and
  special_tokens_map.json into `out_dir`; the same inputs always give byte-identical files."""
  out = pathlib.Path(out_dir)
  _write(out, corpus_texts())
  return str(out)


def default_tokenizer_dir() -> str:
  """The built-in tokenizer's directory, built on first use.

  Lives in <cache_dirs.root()>/shapes_tokenizer/<corpus digest>, so a changed corpus (new corruption
  names, new templates) gets a new directory instead of a stale one. Written into a temporary
  directory and renamed into place, so concurrent processes never see a half-written tokenizer.
  """
  return _default_tokenizer_dir(str(cache_dirs.root()))


@functools.lru_cache(maxsize=None)
def _default_tokenizer_dir(root: str) -> str:
  # Once per process and cache root: hashing the corpus means generating it (about 0.2 s).
  texts = corpus_texts()
  digest = hashlib.sha256(json.dumps([_BUILD_VERSION, texts]).encode()).hexdigest()[:16]
  target = pathlib.Path(root) / "shapes_tokenizer" / digest
  if (target / "tokenizer_config.json").is_file():
    return str(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
  try:
    _write(tmp, texts)
    try:
      os.rename(tmp, target)
    except OSError:
      if not (target / "tokenizer_config.json").is_file():  # not a concurrent build that won
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return str(target)


def load_tokenizer(path: str | os.PathLike | None = None):
  """Loads a tokenizer directory through transformers (ours, or a real Qwen2 / BAGEL one).

  `path` None or "" means the built-in tokenizer. Returns the class the directory declares in
  tokenizer_config.json (`Qwen2Tokenizer` for ours and Qwen2's); a directory with only
  tokenizer.json or vocab.json + merges.txt is read as Qwen2.
  """
  import transformers  # deferred: heavy, and only needed when text is tokenised

  path = pathlib.Path(path) if path else pathlib.Path(default_tokenizer_dir())
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory {path} does not exist")
  files = {p.name for p in path.iterdir()}
  if not files & {"tokenizer.json", "vocab.json"}:
    raise FileNotFoundError(
        f"tokenizer directory {path} has neither tokenizer.json nor vocab.json + merges.txt "
        f"(found: {', '.join(sorted(files)) or 'nothing'})")
  if "tokenizer_config.json" in files and _declared_class(path) not in _QWEN2_CLASSES:
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  # The class AutoTokenizer would pick, without its import of the model configs, which imports
  # PyTorch: 0.9 s instead of 2.3 s a process.
  return transformers.Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)


# tokenizer_config.json's names for the class AutoTokenizer loads as transformers.Qwen2Tokenizer:
# ours, Qwen2's and BAGEL's.
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


def _declared_class(path: pathlib.Path) -> str | None:
  try:
    with open(path / "tokenizer_config.json", encoding="utf-8") as f:
      return json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    return None  # AutoTokenizer then says what is wrong with the file


def special_token_ids(tok) -> dict[str, int]:
  """Ids of im_start, im_end (BAGEL's bos/eos), vision_start, vision_end, endoftext and pad."""
  names = {"im_start": IM_START, "im_end": IM_END, "vision_start": VISION_START,
           "vision_end": VISION_END, "endoftext": ENDOFTEXT}
  ids = {}
  for key, token in names.items():
    i = tok.convert_tokens_to_ids(token)
    if i is None or tok.convert_ids_to_tokens(i) != token:
      raise KeyError(f"tokenizer {getattr(tok, 'name_or_path', tok)!r} has no special token "
                     f"{token}: BAGEL needs all of {', '.join(SPECIAL_TOKENS)}")
    ids[key] = i
  ids["pad"] = tok.pad_token_id if tok.pad_token_id is not None else ids["endoftext"]
  return ids


def reading_difference(tok, other, other_name: str = "the other") -> str | None:
  """How `tok` reads text other than `other` (called `other_name`) does, in words: the ids of its
  tokens or its BPE merges; None when they agree. Compares what is loaded, so one vocabulary
  saved as tokenizer.json and as vocab.json + merges.txt agrees with itself."""
  vocab, theirs = tok.get_vocab(), other.get_vocab()
  moved = sorted((i, t) for t, i in vocab.items() if theirs.get(t) != i)
  if moved:
    i, t = moved[0]
    there = "has none" if theirs.get(t) is None else f"gives {theirs[t]}"
    return (f"{len(moved)} of its {len(vocab)} tokens have other ids in {other_name} (the first: "
            f"{t!r} is {i}, {other_name} {there})")
  if len(theirs) != len(vocab):
    return f"{other_name} has {len(theirs) - len(vocab)} tokens more"
  merges = [json.loads(t.backend_tokenizer.to_str())["model"].get("merges", [])
            for t in (tok, other)]
  if merges[0] != merges[1]:
    k = next((k for k, (a, b) in enumerate(zip(*merges)) if a != b), min(map(len, merges)))
    return (f"its BPE merges differ from {other_name}'s from merge {k} on ({len(merges[0])} "
            f"merges against {len(merges[1])})")
  return None


def text_block(text: str) -> str:
  """A text block as BAGEL frames it: `<|im_start|>text<|im_end|>`."""
  return f"{IM_START}{text}{IM_END}"


def encode_text_block(tok, text: str) -> list[int]:
  """Token ids of `text_block(text)`: im_start, the text's ids, im_end."""
  ids = special_token_ids(tok)
  return [ids["im_start"], *tok.encode(text, add_special_tokens=False), ids["im_end"]]
